"""Re-identification through the CLI: a Market-1501-layout folder -> DHM training of the
Table 5 MobileNet -> retrieval metrics in results.json -> export -> eval of a checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from conftest import REPO_ROOT


def write_market(root, rng):
    folders = {f: root / "market1501" / f for f in ("bounding_box_train", "query", "bounding_box_test")}
    for folder in folders.values():
        folder.mkdir(parents=True)

    def jpeg(path):
        tf.io.write_file(str(path), tf.io.encode_jpeg(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)))

    for pid in (1, 4, 6, 9):
        for cam in (1, 2):
            for frame in range(4):
                jpeg(folders["bounding_box_train"] / f"{pid:04d}_c{cam}s1_{frame:06d}_01.jpg")
    for pid in (2, 3, 5):
        jpeg(folders["query"] / f"{pid:04d}_c1s1_000001_00.jpg")
        for cam in (1, 2, 3):
            jpeg(folders["bounding_box_test"] / f"{pid:04d}_c{cam}s1_000002_01.jpg")
    jpeg(folders["bounding_box_test"] / "0000_c1s1_000003_01.jpg")  # distractor
    jpeg(folders["bounding_box_test"] / "-1_c2s1_000004_01.jpg")  # junk


def run_main(*args):
    result = subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", "--gin_file=gin/reid/market1501_mobilenet_dhm.gin",
         "--gin_param=dataset.image_size = (64, 32)", "--gin_param=train.batch_size = 16",
         "--gin_param=train.epochs = 2", "--gin_param=train.verbose = 0",
         "--gin_param=model.overrides = {'blocks_per_stage': 1}", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_export_and_evaluate_market_layout(tmp_path):
    data, model_dir = tmp_path / "data", tmp_path / "run"
    write_market(data, np.random.default_rng(0))
    run_main(f"--data_dir={data}", f"--model_dir={model_dir}")
    results = json.loads((model_dir / "results.json").read_text())
    assert results["completed"] and [e["epoch"] for e in results["history"]] == [1, 2]
    assert results["split"] == "eval"
    last = results["last"]
    assert last["epoch"] == 2  # eval_every = 5 in the recipe, but the last epoch is always scored
    assert set(last) >= {"rank1", "rank5", "rank10", "mAP"}
    assert 0.0 <= last["mAP"] <= 1.0 and 0.0 <= last["rank1"] <= last["rank5"] <= last["rank10"] <= 1.0
    assert (model_dir / "export" / "1" / "saved_model.pb").exists()
    loaded = tf.saved_model.load(str(model_dir / "export" / "1"))
    out = loaded.signatures["serving_default"](images=tf.zeros([2, 64, 32, 3], tf.uint8))
    assert out["logits"].shape == (2, 4)  # four training identities
    run_main(f"--data_dir={data}", f"--model_dir={model_dir}", "--mode=eval")
    evaluated = json.loads((model_dir / "eval.json").read_text())["metrics"]
    assert abs(evaluated["rank1"] - last["rank1"]) < 1e-6 and abs(evaluated["mAP"] - last["mAP"]) < 1e-6
