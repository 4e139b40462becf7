"""Reference checkpoints for the `--mode=import` tests: made, saved and imported.

Random weights and BatchNorm statistics on the PyTorch yardstick
(`torch_reference_models`), saved the two ways the reference scripts save,
and the CLI that imports them; shared by `test_pytorch_import*.py`.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

import torch_reference_models as reference
from conftest import REPO_ROOT

# The reference cifar.py normalises CIFAR-10 and CIFAR-100 with these values.
REFERENCE_MEAN = (0.49139968, 0.48215827, 0.44653124)
REFERENCE_STD = (0.24703233, 0.24348505, 0.26158768)
IMAGENET = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
IMAGENET_TEST_SIZE = 64  # the ImageNet ResNets at 64x64: their final feature map is 2x2
NUM_CLASSES = 10  # the quick-start sample is CIFAR-10


def gin_text(arch: str, mode: str = "dhm", extra: str = "") -> str:
    lines = [
        "include 'gin/quickstart.gin'",
        f"model.name = '{arch}'",
        f"model.mode = '{mode}'",
        "include 'gin/import/authors_cifar_recipe.gin'",  # the normalisation REFERENCE_* spell out
    ]
    if arch in IMAGENET:
        lines.append(f"dataset.image_size = [{IMAGENET_TEST_SIZE}, {IMAGENET_TEST_SIZE}]")
    return "\n".join(lines) + "\n" + extra


def run_cli(tmp_path, arch, model_dir, checkpoint, mode="dhm", extra="", cli_mode="import", check=True, gin=None):
    """`python -m dhm_keras.main --mode=<cli_mode>` on `gin` (default: `gin_text`)."""
    gin_file = tmp_path / f"{arch}_{mode}.gin"
    gin_file.write_text(gin if gin is not None else gin_text(arch, mode, extra))
    args = [sys.executable, "-m", "dhm_keras.main", f"--mode={cli_mode}", f"--gin_file={gin_file}",
            f"--model_dir={model_dir}"]
    if checkpoint:
        args.append(f"--checkpoint={checkpoint}")
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def save_reference(model, path, wrapped: bool, state=None, arch=None):
    """As the reference scripts save: `save_checkpoint`'s dict around a
    DataParallel state dict (`module.` keys), or a bare state dict."""
    state = dict(model.state_dict() if state is None else state)
    if wrapped:
        torch.save({
            "epoch": 164,
            "arch": arch or getattr(model, "arch_name", "unknown"),
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_prec1": torch.tensor(71.5),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
        }, path)
    else:
        torch.save(state, path)
    return path


def input_size(arch):
    return IMAGENET_TEST_SIZE if arch in IMAGENET else 32


def reference_model(arch, num_classes=NUM_CLASSES, seed=0):
    model = reference.build(arch, num_classes, native_pooling=arch not in IMAGENET)
    model.arch_name = arch  # what the reference's save_checkpoint stores as 'arch'
    return reference.randomize_(model, seed).eval()


def torch_logits(model, images_nhwc):
    """The reference's logits of NHWC images, one head after the other. One
    thread: on a busy 2-core machine PyTorch's default threads slow a small
    batch down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            images = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
            return [t.numpy() for t in model(images)]
    finally:
        torch.set_num_threads(threads)


def max_relative_difference(got, want):
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def keras_heads(arch, checkpoint, mode="dhm"):
    """Every head's eval-mode logits function, from the imported checkpoint."""
    from dhm_keras import checkpoints, models

    size = input_size(arch)
    network = models.build(arch, NUM_CLASSES, mode=mode, input_shape=(size, size, 3))
    # The checkpoint is the training model's (DHMModel): load it into one.
    from dhm_keras.model import DHMModel
    from official.modeling.optimization import build_sgd

    model = DHMModel(network, mode=mode)
    model.compile(optimizer=build_sgd(steps_per_epoch=1), jit_compile=False)
    checkpoints.load(model, checkpoint)
    return lambda images: {k: np.asarray(v) for k, v in network(images, training=False).items()}
