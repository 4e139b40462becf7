"""`--mode=import`: checkpoints of the authors' PyTorch code, converted and served.

The yardstick is `torch_reference_models`, PyTorch definitions written from
the reference model files with the reference's module names: each test gives
one random weights and BatchNorm statistics, saves it the way the reference
scripts do, imports it through the CLI, and compares logits with PyTorch's own.
Every architecture's own test is in `test_pytorch_import_architectures.py`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

torch = pytest.importorskip(
    "torch", reason="PyTorch is the optional [torch] extra that --mode=import needs (CI installs it)"
)
import torch_reference_models as reference  # noqa: E402  (needs torch)
from reference_checkpoints import (  # noqa: E402
    REFERENCE_MEAN, REFERENCE_STD, gin_text, input_size, max_relative_difference, reference_model,
    run_cli, save_reference, torch_logits,
)


def serve(export_dir, images_uint8):
    import tensorflow as tf

    served = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    return served(images=tf.constant(images_uint8))["logits"].numpy()


def reference_normalised(images_uint8):
    return ((images_uint8.astype("float32") / 255.0 - np.float32(REFERENCE_MEAN)) / np.float32(REFERENCE_STD)).astype(
        "float32"
    )


@pytest.mark.parametrize("arch", ["resnet32", "densenet_40_12", "resnet50"])
def test_export_of_main_branch_checkpoint_serves_reference_logits(tmp_path, arch):
    """A checkpoint of the backbone and `fc` only imports into B0 (baseline)
    and serves B0's logits on uint8 images, normalisation included. The
    staging folder a killed import left beside the model directory goes."""
    from official.core import export as export_lib

    model = reference_model(arch, seed=3)
    checkpoint = save_reference(model, tmp_path / "main.pth", wrapped=True, state=reference.main_branch_state_dict(model))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / export_lib.staging_name().replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-", 1)
    (leftover / "checkpoints").mkdir(parents=True)
    proc = run_cli(tmp_path, arch, tmp_path / "run", checkpoint, mode="baseline")
    assert not leftover.exists()
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["imported"]["heads"] == ["b0"]
    size = input_size(arch)
    images = np.random.default_rng(2).integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
    want = torch_logits(model, reference_normalised(images))[0]
    assert max_relative_difference(serve(summary["export"], images), want) <= 1e-4


def test_imagenet_classes_import_and_serve_without_imagenet(tmp_path):
    """The authors' ImageNet models can be converted and served before (or
    without) preparing imagenet2012: TFDS knows its 1,000 classes and their
    names, the recipe the input size and the normalisation."""
    model = reference_model("resnet18", num_classes=1000, seed=7)
    checkpoint = save_reference(model, tmp_path / "resnet18.pth", wrapped=False, state=reference.main_branch_state_dict(model))
    empty = tmp_path / "tfds"
    empty.mkdir()
    gin = (
        "include 'gin/imagenet/resnet18_baseline.gin'\n"
        f"dataset.data_dir = '{empty}'\n"
        "dataset.image_size = [64, 64]\n"  # small for the test; the recipe's is 224
    )
    proc = run_cli(tmp_path, "resnet18", tmp_path / "run", checkpoint, gin=gin)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    images = np.random.default_rng(8).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    imagenet_mean, imagenet_std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    want = torch_logits(model, ((images / np.float32(255.0) - imagenet_mean) / imagenet_std).astype("float32"))[0]
    assert max_relative_difference(serve(summary["export"], images), want) <= 1e-4
    names = (tmp_path / "run" / "export" / "1" / "assets" / "class_names.txt").read_text().split()
    assert len(names) == 1000 and names[0] == "n01440764"


def test_full_checkpoint_export_serves_b0_and_eval_and_training_continue(tmp_path):
    """The export of a full DHM import serves B0; --mode=eval scores the
    imported checkpoint; --mode=train in the same directory starts from it."""
    arch = "resnet32"
    model = reference_model(arch, seed=5)
    checkpoint = save_reference(model, tmp_path / "full.pth.tar", wrapped=False)
    extra = (
        "dataset.train_split = 'train[:128]'\ndataset.eval_split = 'test[:64]'\n"
        "train.batch_size = 64\ntrain.epochs = 1\ntrain.collapse_check_steps = 0\n"
        # lr 0 and no decay: training must leave every kernel as imported,
        # which shows that it started from the imported weights.
        "build_sgd.learning_rate = 0.0\nbuild_sgd.weight_decay = 0.0\nbuild_sgd.warmup_epochs = 0\n"
    )
    model_dir = tmp_path / "run"
    proc = run_cli(tmp_path, arch, model_dir, checkpoint, extra=extra)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    images = np.random.default_rng(4).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    want = torch_logits(model, reference_normalised(images))[0]
    assert max_relative_difference(serve(summary["export"], images), want) <= 1e-4
    record = json.loads((model_dir / "import.json").read_text())
    assert record["reference_metadata"] == {} and record["heads"] == ["b0", "b1", "b2"]

    evaluated = run_cli(tmp_path, arch, model_dir, None, extra=extra, cli_mode="eval")
    assert json.loads((model_dir / "eval.json").read_text())["checkpoint"].endswith("epoch_000.weights.h5"), evaluated.stdout

    trained = run_cli(tmp_path, arch, model_dir, None, extra=extra, cli_mode="train")
    assert "after epoch 0" in trained.stderr
    results = json.loads((model_dir / "results.json").read_text())
    assert results["completed"]
    import h5py

    def kernels(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if "conv" in name and getattr(obj, "ndim", 0) == 4 else None)
        return found

    before = kernels(model_dir / "checkpoints" / "epoch_000.weights.h5")
    after = kernels(model_dir / "checkpoints" / "epoch_001.weights.h5")
    assert before and before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


# ----------------------------------------------------------------------------- errors


def one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def assert_untouched(model_dir, tmp_path, existed=False):
    if existed:
        assert os.listdir(model_dir) == []
    else:
        assert not model_dir.exists()
    assert not [p for p in os.listdir(model_dir.parent) if p.startswith(".staging-")], "staging directory left behind"


def test_main_branch_checkpoint_into_dhm_names_missing_heads(tmp_path):
    model = reference_model("resnet32")
    checkpoint = save_reference(model, tmp_path / "main.pth", wrapped=False, state=reference.main_branch_state_dict(model))
    model_dir = tmp_path / "run"
    line = one_line_error(run_cli(tmp_path, "resnet32", model_dir, checkpoint, check=False))
    assert "CheckpointImportError" in line and "tensors missing" in line and "fc_head1.weight" in line
    assert "model.name = 'resnet32' with the main branch only (model.mode = 'baseline')" in line
    assert_untouched(model_dir, tmp_path)


def test_full_checkpoint_into_baseline_names_left_over_tensors(tmp_path):
    model = reference_model("wrn_16_8")
    checkpoint = save_reference(model, tmp_path / "full.pth.tar", wrapped=True)
    model_dir = tmp_path / "run"
    model_dir.mkdir()  # an existing empty directory stays as it was
    line = one_line_error(run_cli(tmp_path, "wrn_16_8", model_dir, checkpoint, mode="baseline", check=False))
    assert "tensors left over (bn_head1.bias, bn_head1.running_mean" in line
    assert "model.name = 'wrn_16_8' with every head" in line
    assert_untouched(model_dir, tmp_path, existed=True)


def test_other_architecture_is_named(tmp_path):
    model = reference_model("resnet110")
    checkpoint = save_reference(model, tmp_path / "r110.pth.tar", wrapped=True)
    line = one_line_error(run_cli(tmp_path, "resnet32", tmp_path / "run", checkpoint, check=False))
    assert "model.name = 'resnet110'" in line and "left over" in line


def test_bottleneck_and_basic_resnets_with_the_same_block_counts_are_told_apart(tmp_path):
    from dhm_keras import pytorch_import

    for arch in ("resnet34", "resnet50"):
        state = reference.build(arch, 5, native_pooling=False).state_dict()
        found = pytorch_import.ReferenceCheckpoint("x.pth", {k: v.numpy() for k, v in state.items()}, {})
        assert pytorch_import.looks_like(found) == (
            f"it looks like model.name = '{arch}' with every head (model.mode = 'dsl' or 'dhm')"
        )


def test_class_count_mismatch_names_both_shapes(tmp_path):
    model = reference_model("resnet32", num_classes=100)
    checkpoint = save_reference(model, tmp_path / "c100.pth.tar", wrapped=True)
    model_dir = tmp_path / "run"
    line = one_line_error(run_cli(tmp_path, "resnet32", model_dir, checkpoint, check=False))
    assert "(100, 64)" in line and "(10, 64)" in line and "100 classes" in line
    assert_untouched(model_dir, tmp_path)


def test_file_that_is_not_a_pytorch_checkpoint(tmp_path):
    bogus = tmp_path / "weights.h5"
    bogus.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(256))
    model_dir = tmp_path / "run"
    line = one_line_error(run_cli(tmp_path, "resnet32", model_dir, bogus, check=False))
    assert "is not a PyTorch checkpoint, or a damaged one (Unsupported operand" in line
    assert "weights_only" not in line  # torch's own advice is to load it unsafely
    assert_untouched(model_dir, tmp_path)


def test_not_empty_model_dir_is_refused_untouched(tmp_path):
    model = reference_model("resnet32")
    checkpoint = save_reference(model, tmp_path / "r32.pth", wrapped=False)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("mine")
    line = one_line_error(run_cli(tmp_path, "resnet32", model_dir, checkpoint, check=False))
    assert "not empty" in line
    assert os.listdir(model_dir) == ["notes.txt"]


def test_failure_after_conversion_leaves_no_trace(tmp_path, monkeypatch):
    """A failure while the run is being written (here: the export) removes the
    staging directory: nothing appears under --model_dir."""
    import gin

    from dhm_keras import experiment, train_lib
    from dhm_keras.gin_utils import parse_gin

    checkpoint = save_reference(reference_model("resnet32"), tmp_path / "r32.pth", wrapped=False)
    gin_file = tmp_path / "r32.gin"
    gin_file.write_text(gin_text("resnet32"))
    monkeypatch.chdir(REPO_ROOT)
    parse_gin([str(gin_file)], [])
    try:
        config = experiment.from_gin()

        def broken_export(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(train_lib, "export_main_branch", broken_export)
        model_dir = tmp_path / "run"
        with pytest.raises(OSError, match="No space"):
            train_lib.import_checkpoint(str(model_dir), str(checkpoint), config=config)
        assert_untouched(model_dir, tmp_path)
    finally:
        gin.clear_config()


def test_model_dir_that_is_a_file_or_an_architecture_without_reference_fails_first(tmp_path):
    checkpoint = save_reference(reference_model("resnet18"), tmp_path / "r18.pth", wrapped=False)
    a_file = tmp_path / "run"
    a_file.write_text("x")
    line = one_line_error(run_cli(tmp_path, "resnet18", a_file, checkpoint, check=False))
    assert "is a file" in line
    gin = gin_text("resnet18") + "model.overrides = {'branches': ('b1', 'b2', 'b3')}\n"
    line = one_line_error(run_cli(tmp_path, "resnet18", tmp_path / "b3", checkpoint, check=False, gin=gin))
    assert "defines no resnet18 with branch b3" in line
    assert_untouched(tmp_path / "b3", tmp_path)


def read(tmp_path, state, name="x.pth"):
    from dhm_keras import pytorch_import

    torch.save(state, tmp_path / name)
    return pytorch_import.read_checkpoint(str(tmp_path / name))


def test_tensors_that_cannot_be_weights_are_refused(tmp_path):
    from dhm_keras import errors

    fine = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2, dtype=torch.float16)}
    assert read(tmp_path, fine).tensors["fc.bias"].dtype == np.float32
    cases = {
        "twice": ({"fc.weight": torch.ones(2, 3), "module.fc.weight": torch.zeros(2, 3)}, "'fc.weight' twice"),
        "nan": ({"fc.weight": torch.tensor([[1.0, float("nan")]])}, "NaN or infinite values (1 of 2)"),
        "sparse": ({"fc.weight": torch.eye(3).to_sparse()}, "sparse_coo layout"),
        "complex": ({"fc.weight": torch.ones(2, dtype=torch.complex64)}, "complex64"),
    }
    for name, (state, message) in cases.items():
        with pytest.raises(errors.CheckpointImportError, match=re.escape(message)):
            read(tmp_path, state, f"{name}.pth")


class NotATensor:
    pass


def test_pickled_objects_are_not_loaded_and_the_message_says_why(tmp_path):
    from dhm_keras import errors

    with pytest.raises(errors.CheckpointImportError) as raised:
        read(tmp_path, {"state_dict": {"fc.weight": torch.ones(1)}, "extra": NotATensor()})
    message = str(raised.value)
    assert "holds Python objects besides tensors" in message and "NotATensor" in message
    assert "weights_only" not in message and "\x1b[" not in message


def test_damaged_and_empty_files_are_named_as_such(tmp_path):
    from dhm_keras import errors, pytorch_import

    torch.save({"fc.weight": torch.ones(100)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, why in (("half.pth", "PytorchStreamReader failed reading zip archive"), ("empty.pth", "the file is empty")):
        with pytest.raises(errors.CheckpointImportError, match=f"damaged one \\({why}") as raised:
            pytorch_import.read_checkpoint(str(tmp_path / name))
        assert "weights_only" not in str(raised.value)
