"""File-sharded training input across two local workers, exact evaluation.

The committed sample is rewritten as 4 training files of 64 records and 4
test files of 25 (tools/reshard_tfds.py); two workers train 2 epochs on it
(no augmentation, so an image identifies its example). Checks: each worker
was handed an input context and read its own 2 files, disjoint, together all
4; in each epoch the two workers' streams hold every example of the split
exactly once; and the run's evaluation (DATA-sharded, 100 examples in a full
and a partial batch) scores exactly what a single-process evaluation of the
same checkpoint scores. Pipeline-level checks run in this process.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_cli
from test_multi_worker import bindings, run_workers
from tools.reshard_tfds import reshard

from dhm_keras.data import pipeline

SAMPLE = REPO_ROOT / "quickstart_data" / "cifar10_jpeg" / "1.0.0"


@pytest.fixture(scope="module")
def four_files(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    reshard(str(SAMPLE), str(data_dir), 4, {"train": 256, "test": 100})
    return data_dir


def sharded_bindings(data_dir):
    changed = {
        "dataset.data_dir": f"'{data_dir}'",
        "dataset.train_split": "'train'",
        "dataset.eval_split": "'test'",
    }
    out = []
    for line in bindings(data_dir):
        name = line.split(" = ")[0]
        out.append(f"{name} = {changed[name]}" if name in changed else line)
    return out + ["dataset.augmentation = 'none'"]


def labels_of(ds, batches):
    return np.concatenate([y.numpy() for _, y in ds.take(batches)])


def context(workers, worker):
    return tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                      num_replicas_in_sync=workers)


def test_fewer_files_than_workers_falls_back_to_data_sharding(caplog):
    kw = dict(data_dir=str(REPO_ROOT / "quickstart_data"), global_batch_size=64, seed=0, cache=False)
    single = pipeline.make_training_stream("cifar10_jpeg", "train[:256]", **kw)
    with caplog.at_level("INFO"):
        shares = [pipeline.make_training_stream("cifar10_jpeg", "train[:256]", input_context=context(2, i), **kw)
                  for i in range(2)]
    assert "fewer than the 2 workers" in caplog.text
    # Worker i holds rows [32 i, 32 i + 32) of each global batch of the single-process stream.
    for (x, y), (x0, y0), (x1, y1) in zip(single.take(4), shares[0].take(4), shares[1].take(4)):
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)


def test_single_process_stream_is_unchanged_by_sharded_files(four_files):
    kw = dict(global_batch_size=64, seed=0, cache=False)
    a = labels_of(pipeline.make_training_stream("cifar10_jpeg", "train", data_dir=str(four_files), **kw), 8)
    b = labels_of(pipeline.make_training_stream("cifar10_jpeg", "train", data_dir=str(four_files), **kw), 8)
    np.testing.assert_array_equal(a, b)


def test_label_noise_keeps_data_sharding(four_files, caplog):
    with caplog.at_level("INFO"):
        read = pipeline.read_split("cifar10_jpeg", "train", data_dir=str(four_files), hw=None, encoded=False,
                                   label_noise=0.2, input_context=context(2, 1))
    assert read.workers == 1 and read.count == 256
    assert "label_noise is keyed by an example's position in the whole split" in caplog.text


def test_two_workers_read_disjoint_files_and_evaluate_exactly(tmp_path, four_files):
    model_dir, outs, _, seconds = run_workers(
        tmp_path, sharded_bindings(four_files), worker_env={i: {"DHM_TEST_RECORD_INPUTS": "1"} for i in range(2)}
    )
    reports = [json.loads((out / "report.json").read_text()) for out in outs]
    assert [r["contexts"] for r in reports] == [[[2, 0]], [[2, 1]]]

    train_reads = [[read for read in r["reads"] if "-train." in read["all_files"][0]] for r in reports]
    read0, read1 = train_reads[0][0], train_reads[1][0]  # the run's (more follow from the recording)
    assert (read0["workers"], read0["worker"], read1["worker"]) == (2, 0, 1)
    assert len(read0["all_files"]) == 4
    assert not set(read0["files"]) & set(read1["files"])
    assert sorted(read0["files"] + read1["files"]) == sorted(read0["all_files"])

    whole = reports[0]["whole_split"]
    assert len(set(whole)) == 256  # 4 steps of 64: the whole split, no image twice
    for epoch in range(2):
        seen = reports[0]["epochs"][epoch] + reports[1]["epochs"][epoch]
        assert len(seen) == 256 and sorted(seen) == sorted(whole), f"epoch {epoch + 1}"
    assert reports[0]["epochs"][0] != reports[0]["epochs"][1]  # reshuffled per epoch

    # Evaluation: the run's last validation against one process scoring the same checkpoint.
    results = json.loads((model_dir / "results.json").read_text())
    run_eval = results["history"][-1]["eval"]
    checkpoint = model_dir / "checkpoints" / "epoch_002.weights.h5"
    params = [b for b in sharded_bindings(four_files) if not b.startswith("get_strategy.")]
    single = run_cli(f"--model_dir={model_dir}", "--mode=eval", f"--checkpoint={checkpoint}",
                     *(f"--gin_param={b}" for b in params), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    single_eval = json.loads((model_dir / "eval.json").read_text())["metrics"]
    accuracies = [k for k in run_eval if k.startswith(("top1/", "top5/"))]
    assert len(accuracies) >= 4
    for name in accuracies:
        assert run_eval[name] == pytest.approx(single_eval[name], abs=1e-6), name
    print(f"two-worker sharded run: {seconds:.0f} s")
