"""The serving export: signatures as documented, loadable in a fresh process,
usable from saved_model_cli, consistent between its tensor, float and bytes
inputs, and scorable with `--mode=eval`.

A small untrained network is enough here (the trained quick-start export is
checked against the training model in test_main_e2e.py); its weights are set
so that logits are not near-ties, making class comparisons meaningful.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_report_script
from dhm_keras import data as data_lib
from dhm_keras import models
from dhm_keras.model import DHMModel
from official.core import export as export_lib

SHAPE = (32, 32, 3)
MEAN, STD = data_lib.channel_stats("cifar10")
BIN = os.path.dirname(sys.executable)


def env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    network = models.build("resnet32", 10, mode="dhm", input_shape=SHAPE, blocks_per_stage=1)
    model = DHMModel(network, mode="dhm")
    path = export_lib.export_image_classifier(
        model.main_branch(), str(base / "export"), SHAPE,
        preprocess=lambda x: data_lib.normalize(x, MEAN, STD),
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, *SHAPE), dtype=np.uint8)
    expected = model.main_branch()(data_lib.normalize(images, MEAN, STD), training=False).numpy()
    return {"base": base, "path": path, "images": images, "expected": expected, "model": model}


def test_versioned_layout(exported):
    assert exported["path"] == str(exported["base"] / "export" / "1")
    assert export_lib.next_version(str(exported["base"] / "export")) == 2


def test_saved_model_cli_show_lists_documented_signatures(exported):
    out = subprocess.run(
        [os.path.join(BIN, "saved_model_cli"), "show", "--dir", exported["path"], "--all"],
        capture_output=True, text=True, env=env(), timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    blocks = {}
    for name in export_lib.SIGNATURES:
        match = re.search(rf"signature_def\['{name}'\]:(.*?)(?=signature_def\[|\Z)", text, re.S)
        assert match, f"{name} missing from saved_model_cli show --all"
        blocks[name] = match.group(1)
    assert re.search(r"inputs\['images'\].*?dtype: DT_UINT8.*?shape: \(-1, 32, 32, 3\)", blocks["serving_default"], re.S)
    assert re.search(r"inputs\['images'\].*?dtype: DT_FLOAT.*?shape: \(-1, 32, 32, 3\)", blocks["serving_float"], re.S)
    assert re.search(r"inputs\['image_bytes'\].*?dtype: DT_STRING.*?shape: \(-1\)", blocks["serving_bytes"], re.S)
    for name, block in blocks.items():
        for output, dtype, shape in [("logits", "DT_FLOAT", r"\(-1, 10\)"), ("probabilities", "DT_FLOAT", r"\(-1, 10\)"),
                                     ("classes", "DT_INT32", r"\(-1, 5\)"), ("scores", "DT_FLOAT", r"\(-1, 5\)")]:
            assert re.search(rf"outputs\['{output}'\].*?dtype: {dtype}.*?shape: {shape}", block, re.S), (name, output)


def test_saved_model_cli_run_gives_the_models_logits(exported, tmp_path):
    np.save(tmp_path / "images.npy", exported["images"])
    out = subprocess.run(
        [os.path.join(BIN, "saved_model_cli"), "run", "--dir", exported["path"], "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
         "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env(), timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "logits.npy"), exported["expected"], atol=1e-5)


def test_loads_in_a_fresh_process_with_saved_model_load_and_tfsmlayer(exported, tmp_path):
    np.save(tmp_path / "images.npy", exported["images"])
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf, keras
        images = np.load({str(tmp_path / 'images.npy')!r})
        loaded = tf.saved_model.load({exported['path']!r})
        a = loaded.signatures["serving_default"](images=tf.constant(images))["logits"].numpy()
        layer = keras.layers.TFSMLayer({exported['path']!r}, call_endpoint="serving_default")
        b = layer(tf.constant(images))["logits"].numpy()
        np.save({str(tmp_path / 'a.npy')!r}, a); np.save({str(tmp_path / 'b.npy')!r}, b)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("a.npy", "b.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), exported["expected"], atol=1e-5)


def test_float_and_bytes_signatures_agree_with_the_uint8_one(exported):
    loaded = tf.saved_model.load(exported["path"])
    images = exported["images"]
    by_uint8 = loaded.signatures["serving_default"](images=tf.constant(images))
    by_float = loaded.signatures["serving_float"](images=tf.constant(images, tf.float32))
    np.testing.assert_array_equal(by_float["logits"].numpy(), by_uint8["logits"].numpy())
    # PNG is lossless: the decoded pixels, hence every output, are the same.
    png = tf.stack([tf.io.encode_png(im) for im in images])
    by_png = loaded.signatures["serving_bytes"](image_bytes=png)
    np.testing.assert_allclose(by_png["logits"].numpy(), by_uint8["logits"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(by_png["classes"].numpy(), by_uint8["classes"].numpy())
    # JPEG is lossy; high quality keeps the top class on these images.
    jpeg = tf.stack([tf.io.encode_jpeg(im, quality=100) for im in images])
    by_jpeg = loaded.signatures["serving_bytes"](image_bytes=jpeg)
    decoded = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpeg.numpy()])
    by_decoded = loaded.signatures["serving_default"](images=tf.constant(decoded))
    np.testing.assert_array_equal(by_jpeg["classes"].numpy(), by_decoded["classes"].numpy())
    probabilities = by_uint8["probabilities"].numpy()
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(by_uint8["classes"].numpy(), np.argsort(-probabilities, -1)[:, :5])
    np.testing.assert_allclose(by_uint8["scores"].numpy(), np.sort(probabilities, -1)[:, ::-1][:, :5], rtol=1e-6)


def test_eval_mode_scores_an_export(exported, tmp_path):
    split = "test[:200]"
    result = subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", "--gin_file=gin/quickstart.gin", "--mode=eval",
         f"--gin_param=dataset.eval_split = '{split}'", f"--checkpoint={exported['path']}",
         f"--model_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    # Independent: the Keras B0 on the same (normalised) images.
    ds = data_lib.make_dataset("cifar10_jpeg", split, data_dir=f"{REPO_ROOT}/quickstart_data",
                               global_batch_size=100, training=False)
    logits, labels = [], []
    for x, y in ds:
        logits.append(exported["model"].main_branch()(x, training=False).numpy())
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    top5 = np.argsort(-logits, -1)[:, :5]
    assert metrics["examples"] == 200
    # The export sees pixels that went through an identity normalisation in
    # float32 (~1e-5 off), so a near-tie of this untrained net may flip:
    # allow two of the 200 examples.
    tolerance = 2 / 200 + 1e-9
    assert metrics["top1/b0"] == pytest.approx((top5[:, 0] == labels).mean(), abs=tolerance)
    assert metrics["top5/b0"] == pytest.approx((top5 == labels[:, None]).any(-1).mean(), abs=tolerance)


def test_eval_of_an_export_with_another_image_size_is_refused(exported, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", "--gin_file=gin/quickstart.gin", "--mode=eval",
         "--gin_param=dataset.image_size = (40, 40)", f"--checkpoint={exported['path']}",
         f"--model_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env(), timeout=600,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ImageSizeError:") and "32x32" in last and "40x40" in last


def tiny_classifier(hw=(32, 32), classes=7):
    import keras

    keras.utils.set_random_seed(0)
    images = keras.Input((*hw, 3))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(images)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(classes)(x))


def test_versions_appear_whole_and_a_taken_number_is_skipped(tmp_path, monkeypatch):
    base = str(tmp_path / "export")
    model = tiny_classifier()
    first = export_lib.export_image_classifier(model, base, SHAPE, preprocess=lambda x: x / 255.0)
    # Another exporter takes version 2 between our numbering and our rename:
    # next_version still answers 2 once; the rename must move on to 3.
    answers = iter([2])
    real_next_version = export_lib.next_version
    monkeypatch.setattr(export_lib, "next_version", lambda d: next(answers, None) or real_next_version(d))
    os.makedirs(os.path.join(base, "2"))
    third = export_lib.export_image_classifier(model, base, SHAPE, preprocess=lambda x: x / 255.0)
    assert (first, third) == (os.path.join(base, "1"), os.path.join(base, "3"))
    assert os.path.exists(os.path.join(third, "saved_model.pb"))
    with pytest.raises(tf.errors.OpError):  # an explicit version that exists is not overwritten
        export_lib.export_image_classifier(model, base, SHAPE, preprocess=lambda x: x / 255.0, version=1)
    assert sorted(os.listdir(base)) == ["1", "2", "3"]  # no staging folder left behind


@pytest.mark.parametrize("eval_resize", [None, 40])
def test_bytes_signature_sees_what_evaluation_sees(tmp_path, eval_resize):
    """serving_bytes brings an image of any size to the model the way the
    evaluation pipeline does (antialiased resize; with eval_resize, shorter
    side then centre crop), not by squashing it."""
    import dataclasses

    from dhm_keras import config as cfg
    from dhm_keras import experiment
    from dhm_keras.tasks import ImageClassificationTask
    model = tiny_classifier()
    config = dataclasses.replace(
        experiment.from_gin(), dataset=cfg.DatasetConfig(name="cifar10_jpeg", eval_resize=eval_resize)
    )
    path = export_lib.export_image_classifier(
        model, str(tmp_path / "export"), SHAPE, preprocess=lambda x: x / 255.0,
        decode=ImageClassificationTask(config).serving_decode(SHAPE[:2]),
    )
    served = tf.saved_model.load(path).signatures
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png = tf.io.encode_png(image)
    if eval_resize:  # 48x64 -> 40x53, centre 32x32 (rows 4..35, columns 10..41)
        resized = tf.image.resize(image, (40, 53), antialias=True)
        pixels = resized[4:36, 10:42]
    else:
        pixels = tf.image.resize(image, (32, 32), antialias=True)
    pixels = tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)[None]
    by_bytes = served["serving_bytes"](image_bytes=png[None])["logits"].numpy()
    by_pixels = served["serving_default"](images=pixels)["logits"].numpy()
    np.testing.assert_allclose(by_bytes, by_pixels, atol=1e-5)
    squashed = tf.cast(tf.image.resize(image, (32, 32)), tf.uint8)[None]
    if eval_resize:  # and the test can tell the crop from a squash
        assert np.abs(served["serving_default"](images=squashed)["logits"].numpy() - by_bytes).max() > 1e-3


def test_scoring_an_export_applies_eval_resize(tmp_path, monkeypatch):
    """`--mode=eval` on an export crops like checkpoint evaluation does."""
    import gin

    from dhm_keras import experiment, tasks
    from dhm_keras.data import pipeline
    from dhm_keras.main import parse_gin

    hw, split = (24, 24), "test[:64]"
    model = tiny_classifier(hw, classes=10)
    path = export_lib.export_image_classifier(
        model, str(tmp_path / "export"), (*hw, 3), preprocess=lambda x: data_lib.normalize(x, MEAN, STD)
    )
    requests = []
    make_dataset = data_lib.make_dataset
    monkeypatch.setattr(pipeline, "make_dataset", lambda *a, **k: requests.append(k) or make_dataset(*a, **k))
    gin.clear_config()
    try:
        parse_gin(["gin/quickstart.gin"], [f"dataset.eval_split = '{split}'",
                                           f"dataset.image_size = {hw}", "dataset.eval_resize = 28"])
        config = experiment.from_gin(f"{REPO_ROOT}/quickstart_data")
        metrics = tasks.get_task(config).evaluate_export(path)["metrics"]
    finally:
        gin.clear_config()
    ds = make_dataset("cifar10_jpeg", split, data_dir=f"{REPO_ROOT}/quickstart_data",
                      global_batch_size=64, training=False, image_size=hw, eval_resize=28)
    x, y = next(iter(ds))
    top1 = float(np.mean(np.argmax(model(x).numpy(), -1) == y.numpy()))
    squashed = make_dataset("cifar10_jpeg", split, data_dir=f"{REPO_ROOT}/quickstart_data",
                            global_batch_size=64, training=False, image_size=hw)
    xs, _ = next(iter(squashed))
    assert not np.allclose(x.numpy(), xs.numpy(), atol=1.0)  # the crop is not the squash
    assert [(r["image_size"], r["eval_resize"]) for r in requests] == [(hw, 28)]
    assert metrics["examples"] == 64
    assert metrics["top1/b0"] == pytest.approx(top1, abs=1 / 64 + 1e-9)  # one near-tie may flip


# Every bad request the serving process may receive, as (name, signature,
# input key, Python expression for the value, words its error must contain).
# The expressions run in the child process below, where `np`, `tf`, `good`
# (6 valid uint8 images) and `png` (their PNG bytes) are defined.
IMAGES_SHAPE = "of shape [N, 32, 32, 3]"
BAD_REQUESTS = [
    ("rank 3 (one image, no batch)", "serving_default", "images", "good[0]", [IMAGES_SHAPE, "uint8", "[32,32,3]"]),
    ("rank 3 float", "serving_float", "images", "good[0].astype(np.float32)", [IMAGES_SHAPE, "float32"]),
    ("rank 5, a batch of batches", "serving_default", "images", "good[None]", [IMAGES_SHAPE, "[1,6,32,32,3]"]),
    ("rank 5, trailing axis", "serving_default", "images", "good[..., None]", [IMAGES_SHAPE, "[6,32,32,3,1]"]),
    ("rank 0", "serving_default", "images", "np.uint8(7)", [IMAGES_SHAPE, "[]"]),
    ("wrong height", "serving_default", "images", "np.zeros((2, 64, 32, 3), np.uint8)", [IMAGES_SHAPE, "[2,64,32,3]"]),
    ("wrong width", "serving_float", "images", "np.zeros((2, 32, 31, 3), np.float32)", [IMAGES_SHAPE, "[2,32,31,3]"]),
    ("1 channel", "serving_default", "images", "good[..., :1]", [IMAGES_SHAPE, "[6,32,32,1]"]),
    ("4 channels", "serving_default", "images", "np.concatenate([good, good[..., :1]], -1)", [IMAGES_SHAPE, "[6,32,32,4]"]),
    ("empty images, wrong size", "serving_default", "images", "np.zeros((0, 16, 16, 3), np.uint8)", [IMAGES_SHAPE, "[0,16,16,3]"]),
    # A loaded signature refuses another dtype before its graph runs; TF's own
    # message names the dtype it expected.
    ("float32 to the uint8 signature", "serving_default", "images", "good.astype(np.float32)", ["uint8"]),
    ("int32 to the uint8 signature", "serving_default", "images", "good.astype(np.int32)", ["uint8"]),
    ("uint8 to the float signature", "serving_float", "images", "good", ["float"]),
    ("one NaN pixel", "serving_float", "images", "with_value(np.nan)", [IMAGES_SHAPE, "NaN"]),
    ("one inf pixel", "serving_float", "images", "with_value(np.inf)", [IMAGES_SHAPE, "NaN or inf"]),
    ("one -inf pixel", "serving_float", "images", "with_value(-np.inf)", [IMAGES_SHAPE, "NaN or inf"]),
    ("a value above 255", "serving_float", "images", "with_value(300.0)", [IMAGES_SHAPE, "0..255", "300"]),
    ("normalised pixels (negative)", "serving_float", "images", "((good - 127.5) / 64.0).astype(np.float32)", [IMAGES_SHAPE, "0..255"]),
    ("garbage bytes", "serving_bytes", "image_bytes", "np.array([b'not an image'])", ["JPEG", "PNG"]),
    ("an empty string", "serving_bytes", "image_bytes", "np.array([b''])", ["empty"]),
    ("garbage after a good PNG", "serving_bytes", "image_bytes", "np.array([png[0], b'GIF89a garbage'])", []),
    ("a truncated PNG", "serving_bytes", "image_bytes", "np.array([png[0][:60]])", []),
    ("bytes of rank 0", "serving_bytes", "image_bytes", "np.array(png[0])", ["of shape [N]", "[]"]),
    ("bytes of rank 2", "serving_bytes", "image_bytes", "png[:2].reshape(1, 2)", ["of shape [N]", "[1,2]"]),
    ("pixels to the bytes signature", "serving_bytes", "image_bytes", "good", ["string"]),
]


def test_one_server_process_survives_every_bad_request_then_answers_correctly(exported, tmp_path):
    """The serving test drives every bad request through one loaded export in
    one process and then checks a good request's answer.

    A bad request must come back as an InvalidArgumentError that says what was
    expected (today a rank-3 batch aborts the process in oneDNN, and others
    are answered with garbage); an empty batch gets empty outputs. The child
    process reports each answer as it goes, so a crash shows which request
    killed it, and a crash fails this test instead of pytest.
    """
    np.save(tmp_path / "good.npy", exported["images"])
    cases = [(name, signature, key, value) for name, signature, key, value, _ in BAD_REQUESTS]
    script = textwrap.dedent(f"""
        import json
        import official  # oneDNN on, as in training and serving
        import numpy as np, tensorflow as tf
        good = np.load({str(tmp_path / 'good.npy')!r})
        png = np.array([tf.io.encode_png(im).numpy() for im in good], dtype=object)

        def with_value(value):
            images = good.astype(np.float32)
            images[3, 5, 7, 1] = value
            return images

        signatures = tf.saved_model.load({exported['path']!r}).signatures
        answers = {{}}
        for name, signature, key, value in {cases!r}:
            print("request:", name, flush=True)
            try:
                out = signatures[signature](**{{key: tf.constant(eval(value))}})
                answers[name] = {{"answered": {{k: list(v.shape) for k, v in out.items()}}}}
            except Exception as e:
                answers[name] = {{"error": type(e).__name__, "message": str(e)}}
        empty = {{}}
        for signature, value in [("serving_default", np.zeros((0, 32, 32, 3), np.uint8)),
                                 ("serving_float", np.zeros((0, 32, 32, 3), np.float32)),
                                 ("serving_bytes", np.zeros((0,), object))]:
            print("request: empty batch to", signature, flush=True)
            key = "image_bytes" if signature == "serving_bytes" else "images"
            out = signatures[signature](**{{key: tf.constant(value, tf.string if value.dtype == object else None)}})
            empty[signature] = {{k: [list(v.shape), v.dtype.name] for k, v in out.items()}}
        print("request: good ones", flush=True)
        logits = {{
            "serving_default": signatures["serving_default"](images=tf.constant(good))["logits"].numpy(),
            "serving_float": signatures["serving_float"](images=tf.constant(good, tf.float32))["logits"].numpy(),
            "serving_bytes": signatures["serving_bytes"](image_bytes=tf.constant(list(png)))["logits"].numpy(),
        }}
        print("REPORT " + json.dumps({{"answers": answers, "empty": empty,
                                       "logits": {{k: v.tolist() for k, v in logits.items()}}}}))
    """)
    report = run_report_script(script)
    wrong = []
    for name, signature, _, _, words in BAD_REQUESTS:
        answer = report["answers"][name]
        if answer.get("error") != "InvalidArgumentError":
            wrong.append(f"{name} -> {signature}: {answer}")
        else:
            missing = [w for w in words if w not in answer["message"]]
            if missing:
                wrong.append(f"{name} -> {signature}: message lacks {missing}: {answer['message'][:600]}")
    assert not wrong, "\n".join(wrong)
    expected_empty = {"logits": [[0, 10], "float32"], "probabilities": [[0, 10], "float32"],
                      "classes": [[0, 5], "int32"], "scores": [[0, 5], "float32"]}
    assert report["empty"] == {name: expected_empty for name in export_lib.SIGNATURES}
    for signature, logits in report["logits"].items():  # PNG is lossless: same pixels, same logits
        np.testing.assert_allclose(np.array(logits), exported["expected"], atol=1e-5, err_msg=signature)


def test_a_staging_folder_of_a_dead_export_is_removed_by_the_next_one(tmp_path, caplog):
    """A kill during export leaves `.staging-<pid>-...`; the next export on this
    host removes the folders of processes that are gone and keeps those of live
    ones (an export running now) and of other hosts (which it cannot check)."""
    base = tmp_path / "export"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # reaped by run(): no process has this pid now
    stale = base / f".staging-{dead_pid}-0badf00d"
    live = base / f".staging-{os.getpid()}-0000beef"
    elsewhere = base / f".staging-{dead_pid}-1234abcd-some-other-host"
    for folder in (stale, live, elsewhere):
        (folder / "variables").mkdir(parents=True)
        (folder / "saved_model.pb").write_bytes(b"half written")
    with caplog.at_level("INFO", logger="absl"):
        path = export_lib.export_image_classifier(tiny_classifier(), str(base), SHAPE, preprocess=lambda x: x / 255.0)
    assert path == str(base / "1")
    assert sorted(os.listdir(base)) == sorted(["1", live.name, elsewhere.name])
    assert any(stale.name in r.getMessage() and str(dead_pid) in r.getMessage() for r in caplog.records)


def test_an_export_that_fails_while_writing_leaves_no_staging_folder(tmp_path, monkeypatch):
    """An error (or Ctrl-C) during the write removes the staging folder at once;
    only a kill leaves one for the next export to remove."""
    import keras

    def write_half(self, path, **kwargs):
        os.makedirs(os.path.join(path, "variables"))
        raise OSError(28, "No space left on device")

    # keras.export.ExportArchive() builds the backend's subclass: patch that.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", write_half)
    base = tmp_path / "export"
    with pytest.raises(OSError, match="No space"):
        export_lib.export_image_classifier(tiny_classifier(), str(base), SHAPE, preprocess=lambda x: x / 255.0)
    assert os.listdir(base) == []
