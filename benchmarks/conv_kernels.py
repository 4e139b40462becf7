"""Single 3x3 convolutions of ResNet-32's shapes: TensorFlow/oneDNN against PyTorch, NHWC against NCHW.

The profile (`profile_step.py`) says ~84% of a ResNet-32 DHM step is
convolution. This script answers the two questions that follow:

* are TensorFlow's convolution kernels slower than PyTorch's (forward, input
  gradient, weight gradient, batch 128, each of ResNet-32's three stage
  shapes)? If they were, the step could gain by routing around them;
* would channels-first (NCHW) tensors be faster on oneDNN, as they are the
  layout PyTorch uses? Timed on a stack of conv + fused BN + ReLU layers with
  ResNet-32's channel plan, forward and backward.

    .venv/bin/python benchmarks/conv_kernels.py --rounds 3          # + PyTorch if installed

Both libraries run 2 threads' worth of work; milliseconds per call are the
median of `--rounds` interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import official  # noqa: E402,F401  (oneDNN on before TensorFlow loads)

import tensorflow as tf  # noqa: E402

BATCH = 128
# (height = width, input channels, output channels) of ResNet-32's three stages.
STAGES = ((32, 16, 16), (16, 32, 32), (8, 64, 64))


def per_call_ms(fn, calls: int) -> float:
    fn()  # warm up (primitive creation, tracing)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1000


def tf_kernels(hw: int, cin: int, cout: int) -> dict:
    x = tf.random.normal((BATCH, hw, hw, cin), seed=0)
    dy = tf.random.normal((BATCH, hw, hw, cout), seed=1)
    w = tf.random.normal((3, 3, cin, cout), seed=2)
    strides = [1, 1, 1, 1]
    forward = tf.function(lambda: tf.nn.conv2d(x, w, strides, "SAME"))
    input_grad = tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
        input_sizes=x.shape, filter=w, out_backprop=dy, strides=strides, padding="SAME"))
    weight_grad = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=w.shape, out_backprop=dy, strides=strides, padding="SAME"))
    return {"forward": lambda: forward().numpy(), "input grad": lambda: input_grad().numpy(),
            "weight grad": lambda: weight_grad().numpy()}


def torch_kernels(hw: int, cin: int, cout: int) -> dict:
    import torch

    torch.set_num_threads(2)
    x, dy = torch.randn(BATCH, cin, hw, hw), torch.randn(BATCH, cout, hw, hw)
    w = torch.randn(cout, cin, 3, 3)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    return {"forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
            "input grad": backward([True, False, False]),
            "weight grad": backward([False, True, False])}


def layout_step(data_format: str):
    """One training step of a conv/BN/ReLU stack with ResNet-32's channel plan."""
    plan = [(3, 16, 1)] + [(16, 16, 1)] * 10 + [(16, 32, 2)] + [(32, 32, 1)] * 9
    plan += [(32, 64, 2)] + [(64, 64, 1)] * 9
    kernels = [tf.Variable(tf.random.normal((3, 3, a, b), stddev=0.1, seed=i))
               for i, (a, b, _) in enumerate(plan)]
    scales = [tf.Variable(tf.ones((b,))) for _, b, _ in plan]
    offsets = [tf.Variable(tf.zeros((b,))) for _, b, _ in plan]
    shape = (BATCH, 32, 32, 3) if data_format == "NHWC" else (BATCH, 3, 32, 32)
    images = tf.random.normal(shape, seed=0)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            h = images
            for (_, _, s), k, g, b in zip(plan, kernels, scales, offsets):
                strides = [1, s, s, 1] if data_format == "NHWC" else [1, 1, s, s]
                h = tf.nn.conv2d(h, k, strides, "SAME", data_format=data_format)
                h = tf.raw_ops.FusedBatchNormV3(
                    x=h, scale=g, offset=b, mean=tf.zeros_like(g), variance=tf.ones_like(g),
                    is_training=True, data_format=data_format)[0]
                h = tf.nn.relu(h)
            loss = tf.reduce_mean(h)
        variables = kernels + scales + offsets
        for v, grad in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(0.01 * grad)
        return loss

    return lambda: step().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10, help="calls per kernel and round")
    parser.add_argument("--no_torch", action="store_true")
    args = parser.parse_args()

    libraries = {"tf": tf_kernels}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            libraries["torch"] = torch_kernels
        except ImportError:
            print("PyTorch not installed: TensorFlow only (pip install -r benchmarks/requirements.txt)")
    kernels = {(lib, stage): make(*stage) for lib, make in libraries.items() for stage in STAGES}
    steps = {fmt: layout_step(fmt) for fmt in ("NHWC", "NCHW")}

    times = {}
    for _ in range(args.rounds):
        for (lib, stage), fns in kernels.items():
            for name, fn in fns.items():
                times.setdefault((lib, stage, name), []).append(per_call_ms(fn, args.calls))
        for fmt, fn in steps.items():
            times.setdefault(("layout", fmt), []).append(per_call_ms(fn, max(2, args.calls // 3)))

    print(f"3x3 convolution, batch {BATCH}, ms per call (median of {args.rounds} interleaved rounds)")
    for stage in STAGES:
        hw, cin, cout = stage
        for name in ("forward", "input grad", "weight grad"):
            cells = "  ".join(f"{lib} {statistics.median(times[(lib, stage, name)]):6.1f}"
                              for lib in libraries)
            ratio = ""
            if "torch" in libraries:
                theirs = statistics.median(times[("torch", stage, name)])
                ratio = f"  torch/tf {theirs / statistics.median(times[('tf', stage, name)]):.2f}"
            print(f"  {hw:2d}x{hw:<2d} {cin:2d}->{cout:2d} {name:11s}  {cells}{ratio}")
    nhwc, nchw = (statistics.median(times[("layout", f)]) for f in ("NHWC", "NCHW"))
    print(f"conv/BN/ReLU stack (ResNet-32 channels), one training step: NHWC {nhwc:.0f} ms, "
          f"NCHW {nchw:.0f} ms, NCHW/NHWC time {nchw / nhwc:.2f}")


if __name__ == "__main__":
    main()
