"""Where the time of one DHM training step goes, by op type and by part of the network.

Traces `--steps` steps of the ResNet-32 DHM `train_step` (synthetic input, after
warm-up) with the TensorFlow profiler and sums the executed ops' durations from the
trace (`*.xplane.pb`, parsed with the protobuf TensorFlow ships), so no TensorBoard
plugin is needed:

    .venv/bin/python benchmarks/profile_step.py            # fused BN (the default)
    .venv/bin/python benchmarks/profile_step.py --keras_bn # Keras' unfused BN

Op time is summed over threads (two cores busy = twice the wall time), so read
the shares, not the absolute milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import glob
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import official  # noqa: E402,F401  (oneDNN before TensorFlow loads)

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from train_throughput import compiled_model, synthetic_batches  # noqa: E402  (same model, optimizer, data)

# Op-type prefixes -> category (first match wins; oneDNN kernels are "_MklNative...").
CATEGORIES = (
    ("Conv2DBackpropFilter", "conv: weight gradient"),
    ("Conv2DBackpropInput", "conv: input gradient"),
    ("Conv2D", "conv: forward"),
    ("FusedBatchNorm", "batch norm (fused kernels)"),
    ("Relu", "relu (and its gradient)"),
)
ELEMENTWISE = {"Mul", "Sub", "AddV2", "AddN", "Mean", "Sum", "Tile", "SquaredDifference",
               "Rsqrt", "RsqrtGrad", "Square", "Neg", "RealDiv", "BroadcastTo", "Reshape"}


def category(op_type: str) -> str:
    for prefix, name in CATEGORIES:
        if prefix in op_type:
            return name
    if op_type in ELEMENTWISE:
        return "elementwise/reductions (BN, loss, SGD)"
    return "other"


def part(op_name: str) -> str:
    """Which part of the DHM network an op belongs to, from its layer name."""
    for piece in op_name.split("/"):
        if piece.startswith(("b1_", "b2_", "b3_")):
            return f"branch {piece[:2].upper()}"
    if "/resnet" in op_name:
        return "backbone (B0)"
    return "loss, optimizer, bookkeeping"


def op_times(trace_dir: str):
    """{(op name, op type): picoseconds} summed over the trace's TF op events."""
    times = collections.Counter()
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(path).read_bytes())
        for plane in space.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    # TF op events are "<op name>:<op type>"; the rest are executor frames.
                    if ":" in name and not name.startswith(("Threadpool", "Executor")):
                        op_name, op_type = name.rsplit(":", 1)
                        times[(op_name, op_type)] += event.duration_ps
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--keras_bn", action="store_true", help="Keras' unfused BN instead")
    args = parser.parse_args()

    model = compiled_model("resnet32", "dhm", 100, jit_compile=False, fused_bn=not args.keras_bn)
    model.fit(synthetic_batches(args.batch, 100, 2), verbose=0)  # trace and warm up

    trace_dir = tempfile.mkdtemp(prefix="dhm_profile_")
    tf.profiler.experimental.start(trace_dir)
    model.fit(synthetic_batches(args.batch, 100, args.steps), verbose=0)
    tf.profiler.experimental.stop()
    times = op_times(trace_dir)
    total = sum(times.values())
    if not total:
        raise SystemExit(f"no TF op events found in {trace_dir}")

    def table(title, key, top=None):
        sums = collections.Counter()
        for (op_name, op_type), ps in times.items():
            sums[key(op_name, op_type)] += ps
        print(title)
        for name, ps in sums.most_common(top):
            print(f"  {name:42s} {100 * ps / total:5.1f}%  ({ps / 1e9 / args.steps:7.1f} ms/step)")

    print(f"ResNet-32 DHM train step, batch {args.batch}, {args.steps} traced steps, "
          f"BN: {'Keras unfused' if args.keras_bn else 'fused'}; op time summed over threads")
    table("by kind of op:", lambda name, op_type: category(op_type))
    table("by part of the network:", lambda name, op_type: part(name))
    table("top op types:", lambda name, op_type: op_type, top=10)


if __name__ == "__main__":
    main()
