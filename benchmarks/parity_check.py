"""Keras DHM ResNet-32 vs the PyTorch reference, number by number (prints; not a test).

Default run (random N(0,1) data, 10 classes, batch 32, float32):
  (a) training-mode logits of every head after porting the Keras weights into torch,
  (b) the DHM loss value,
  (c) weights after ONE SGD step (lr 0.1, momentum 0.9, wd 1e-4): Keras
      DHMModel.train_on_batch with official.modeling.optimization.build_sgd vs
      torch.optim.SGD on the reference loss,
  (d) `--steps` more steps on the same batches in both, loss trajectories side by side.

`--cifar N` instead trains both from the SAME (ported) initial weights for N steps on
the same real CIFAR-10 batches (dhm_keras.data.make_dataset("cifar10_jpeg", ...)) and
prints the per-step losses, gradient norms at init split into CE and mimicking parts,
and torch variants (exact KL, reference epsilon=1e-8, lr warm-up).

    TF_ENABLE_ONEDNN_OPTS=1 PYTHONPATH=. .venv/bin/python benchmarks/parity_check.py
    TF_ENABLE_ONEDNN_OPTS=1 PYTHONPATH=. .venv/bin/python benchmarks/parity_check.py \
        --cifar 80 --batch 128

Findings (ResNet-32, 10 classes): one step agrees to ~3e-4 on weights that move by up to
0.65. On real CIFAR-10 at lr 0.1 the reference explodes exactly like Keras (9.63 -> 71.5
-> 187 from the same ported init) and ends in the same uniform-prediction collapse with
dead last-stage ReLUs. So this is how the recipe behaves at this init, not a Keras bug.
eps=1e-8 caps the spike but does not prevent the collapse, and neither does the
reference's 1-epoch lr=0.01 --warmup (the spike just moves to the jump to 0.1). A linear
warm-up over 5 epochs, or lr 0.02, trains normally.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import torch_reference as tr  # noqa: E402
from dhm_keras import losses as keras_losses  # noqa: E402
from dhm_keras.model import DHMModel  # noqa: E402
from dhm_keras.models import build  # noqa: E402
from official.modeling.optimization import build_sgd  # noqa: E402

COMPARED_LAYERS = (
    "stem_conv",
    "stage1_block0_conv1",
    "stage3_block4_bn2",
    "b0_classifier",
    "b1_stage3_block0_conv1",
    "b1_classifier",
    "b2_stage3_block2_conv2",
    "b2_classifier",
)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def keras_setup(num_classes: int, seed: int, lr: float, wd: float, epsilon: float = 0.0):
    keras.utils.set_random_seed(seed)
    network = build("resnet32", num_classes, mode="dhm")
    model = DHMModel(network, mode="dhm", epsilon=epsilon)
    model.compile(
        optimizer=build_sgd(steps_per_epoch=100, learning_rate=lr, weight_decay=wd),
        jit_compile=False,
    )
    return network, model


def torch_setup(network, num_classes: int, lr: float, wd: float):
    torch.manual_seed(0)
    ref = tr.build_reference(num_classes).train()
    tr.port_keras_weights(network, ref)
    return ref, tr.make_optimizer(ref, lr=lr, weight_decay=wd)


def keras_step(model, x, y) -> float:
    logs = model.train_on_batch(x, y, return_dict=True)
    return float(logs["loss"])


def torch_step(ref, opt, x, y, **loss_kwargs) -> float:
    return float(tr.train_step(ref, opt, to_nchw(x), torch.from_numpy(y).long(), **loss_kwargs))


def weight_diffs(network, ref) -> tuple[dict, float, str]:
    """Per compared layer max |keras - torch| and the max over every weight."""
    per_layer, worst, worst_name = {}, 0.0, ""
    for layer in network.layers:
        if not layer.weights:
            continue
        for i, w in enumerate(layer.get_weights()):
            diff = float(np.max(np.abs(w - tr.torch_weight_for(ref, layer.name, i))))
            kind = type(layer).__name__
            is_stat = kind == "BatchNormalization" and i >= 2
            if layer.name in COMPARED_LAYERS:
                per_layer[f"{layer.name}[{i}]"] = diff
            if not is_stat and diff > worst:
                worst, worst_name = diff, f"{layer.name}[{i}]"
    return per_layer, worst, worst_name


# ----------------------------------------------------------------------------- parity


def parity(args):
    rng = np.random.default_rng(args.seed)
    num_classes, batch = 10, args.batch
    network, model = keras_setup(num_classes, args.seed, args.lr, args.wd)
    initial = network.get_weights()
    ref, opt = torch_setup(network, num_classes, args.lr, args.wd)

    x = rng.standard_normal((batch, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, num_classes, batch).astype(np.int32)

    # (a) + (b): training-mode forward (updates BN moving stats in both; restored below).
    k_logits = {h: v.numpy() for h, v in network(x, training=True).items()}
    with torch.no_grad():
        t_out = ref(to_nchw(x))
    t_logits = dict(zip(tr.HEADS, (o.numpy() for o in t_out)))
    print("(a) training-mode logits, max |keras - torch| (and logit scale):")
    for h in tr.HEADS:
        print(f"    {h}: {np.max(np.abs(k_logits[h] - t_logits[h])):.3e}"
              f"   (max |logit| {np.max(np.abs(k_logits[h])):.3f})")
    k_total, k_ce, k_pairs = keras_losses.dhm_loss(
        tf.constant(y), {h: tf.constant(v) for h, v in k_logits.items()}, mode="dhm")
    t_total, t_ce, t_pairs = tr.dhm_loss(t_out, torch.from_numpy(y).long(), return_parts=True)
    print(f"(b) DHM loss: keras {float(k_total):.6f}  torch {float(t_total):.6f}"
          f"  |diff| {abs(float(k_total) - float(t_total)):.3e}")
    print("    pairs (teacher->student) keras / torch: " + ", ".join(
        f"{p} {float(k_pairs[p]):.4f}/{float(t_pairs[p]):.4f}" for p in sorted(k_pairs)))

    # (c) one SGD step from the same weights.
    network.set_weights(initial)
    ref, opt = torch_setup(network, num_classes, args.lr, args.wd)
    k_loss = keras_step(model, x, y)
    t_loss = torch_step(ref, opt, x, y)
    per_layer, worst, worst_name = weight_diffs(network, ref)
    print(f"(c) one SGD step (lr {args.lr}, momentum 0.9, wd {args.wd}): step loss keras "
          f"{k_loss:.6f} torch {t_loss:.6f}")
    for name, d in per_layer.items():
        print(f"    {name:32s} max |diff| {d:.3e}")
    print(f"    max |diff| over every trainable weight: {worst:.3e} ({worst_name})")
    print("    (BN moving variance [3] differs by design at ~1e-5: Keras updates it with the "
          "biased batch variance, PyTorch with the unbiased one)")
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(network.get_weights(), initial))
    print(f"    (largest weight change of the step itself: {moved:.3e})")

    # (d) more steps on the same batches.
    batches = [(rng.standard_normal((batch, 32, 32, 3), dtype=np.float32),
                rng.integers(0, num_classes, batch).astype(np.int32)) for _ in range(args.steps)]
    print(f"(d) {args.steps} more steps, same batches (random data):")
    print("    step   keras loss   torch loss    |diff|")
    for i, (bx, by) in enumerate(batches, start=2):
        kl, tl = keras_step(model, bx, by), torch_step(ref, opt, bx, by)
        print(f"    {i:4d} {kl:12.6f} {tl:12.6f} {abs(kl - tl):9.2e}")
    _, worst, worst_name = weight_diffs(network, ref)
    print(f"    after step {args.steps + 1}: max |diff| over every trainable weight "
          f"{worst:.3e} ({worst_name})")


# ----------------------------------------------------------------------------- CIFAR

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "quickstart_data")


def cifar_batches(n: int, batch: int, seed: int = 0, data_dir: str = DATA_DIR):
    """The first `n` training batches of make_dataset("cifar10_jpeg", ...) as numpy,
    iterating over as many epochs as needed (the dataset reshuffles every epoch)."""
    from dhm_keras.data import make_dataset

    ds = make_dataset("cifar10_jpeg", "train", data_dir=data_dir, global_batch_size=batch,
                      training=True, seed=seed)
    per_epoch = int(ds.cardinality())  # known: batched with drop_remainder
    out = []
    while len(out) < n:
        for x, y in ds:
            out.append((x.numpy(), y.numpy().astype(np.int32)))
            if len(out) == n:
                break
    return out, (per_epoch if per_epoch > 0 else n)


def grad_norms(ref, x, y, **loss_kwargs):
    """Global grad norms of the CE part and the mimicking part, and the classifier share."""
    out = ref(to_nchw(x))
    _, ce, kl = tr.dhm_loss(out, torch.from_numpy(y).long(), return_parts=True, **loss_kwargs)
    res = {}
    for name, part in (("ce", sum(ce)), ("mimic", sum(kl.values()))):
        grads = torch.autograd.grad(part, list(ref.parameters()), retain_graph=True)
        sq = {n: float(g.pow(2).sum()) for (n, _), g in zip(ref.named_parameters(), grads)}
        fc = sum(v for n, v in sq.items() if n.startswith("fc")) ** 0.5
        res[name] = (sum(sq.values()) ** 0.5, fc)
    return res


def _stats(logits: dict, y: np.ndarray) -> dict:
    """Per head: accuracy, mean max-probability, std over the batch of the logits."""
    out = {}
    for h, z in logits.items():
        z = np.asarray(z, np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[h] = (float((z.argmax(1) == y).mean()), float(p.max(1).mean()),
                  float(z.std(0).mean()))
    return out


def run_torch(initial_keras_weights, network, batches, lr_fn, wd, epsilon=0.0, mode="dhm"):
    network.set_weights(initial_keras_weights)
    ref, opt = torch_setup(network, 10, lr_fn(0), wd)
    losses, stats = [], []
    for i, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_fn(i)
        out = ref(to_nchw(x))
        loss = tr.dhm_loss(out, torch.from_numpy(y).long(), epsilon=epsilon, mode=mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        stats.append(_stats({h: o.detach().numpy() for h, o in zip(tr.HEADS, out)}, y))
    return losses, stats


def run_keras(initial_keras_weights, network, batches, lr_fn, wd, epsilon=0.0, mode="dhm"):
    """Keras DHMModel.train_on_batch. lr_fn must be constant (build_sgd's schedule)."""
    network.set_weights(initial_keras_weights)
    model = DHMModel(network, mode=mode, epsilon=epsilon)
    model.compile(optimizer=build_sgd(steps_per_epoch=100, learning_rate=lr_fn(0),
                                      weight_decay=wd), jit_compile=False)
    losses, stats = [], []
    for x, y in batches:
        # Only the loss and top-1 come back from train_on_batch (max-prob / logit std
        # would need an extra forward pass, which would also move the BN statistics).
        logs = model.train_on_batch(x, y, return_dict=True)
        losses.append(float(logs["loss"]))
        stats.append({h: (float(logs[f"top1/{h}"]), float("nan"), float("nan"))
                      for h in tr.HEADS})
    return losses, stats


def cifar(args):
    lr, wd = args.lr, args.wd
    print(f"loading {args.cifar} CIFAR-10 (cifar10_jpeg quickstart) batches of {args.batch}",
          flush=True)
    batches, per_epoch = cifar_batches(args.cifar, args.batch, seed=0)
    print(f"{len(batches)} steps, {per_epoch} steps per epoch")
    keras.utils.set_random_seed(args.seed)
    network = build("resnet32", 10, mode="dhm")
    initial = network.get_weights()
    ref, _ = torch_setup(network, 10, lr, wd)
    x0, y0 = batches[0]
    for name, (total, fc) in grad_norms(ref, x0, y0).items():
        print(f"init grad norm of the {name:5s} part (first batch): total {total:7.3f}, "
              f"of which classifier kernels+biases {fc:7.3f}")

    warm = args.warmup_steps or per_epoch
    variants = {
        "keras dhm": (run_keras, dict(lr_fn=lambda i: lr)),
        "torch dhm": (run_torch, dict(lr_fn=lambda i: lr)),
        "torch dhm eps=1e-8": (run_torch, dict(lr_fn=lambda i: lr, epsilon=1e-8)),
        f"torch dhm lr.01x{warm}": (run_torch, dict(lr_fn=lambda i: 0.01 if i < warm else lr)),
        "torch dsl": (run_torch, dict(lr_fn=lambda i: lr, mode="dsl")),
    }
    if args.variants:
        keep = [v.strip() for v in args.variants.split(",")]
        variants = {k: v for k, v in variants.items() if any(s in k for s in keep)}
    results = {}
    for name, (fn, kw) in variants.items():
        t = time.time()
        results[name] = fn(initial, network, batches, wd=wd, **kw)
        print(f"  ran {name} in {time.time() - t:.0f}s", flush=True)
    names = list(results)
    print("per-step training loss (loss of the batch before the step):")
    print("step " + " ".join(f"{n:>20s}" for n in names))
    for i in range(len(batches)):
        if i < 12 or (i + 1) % 5 == 0 or i == len(batches) - 1:
            print(f"{i + 1:4d} " + " ".join(f"{results[n][0][i]:20.4f}" for n in names))
    print("per epoch: mean loss | b0 top-1 | b0 mean max-prob | b0 logit std over batch "
          "(max-prob 0.1 and std 0 = uniform collapse)")
    for n in names:
        losses, stats = results[n]
        for e in range(0, len(batches), per_epoch):
            sl = slice(e, e + per_epoch)
            st = stats[sl]
            acc = np.mean([s["b0"][0] for s in st])
            mp = np.mean([s["b0"][1] for s in st])
            sd = np.mean([s["b0"][2] for s in st])
            print(f"  {n:22s} epoch {e // per_epoch + 1}: loss {np.mean(losses[sl]):9.3f} "
                  f"top1 {acc:.3f} maxp {mp:.3f} std {sd:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--wd", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cifar", type=int, default=0,
                        help="instead: N steps on real CIFAR-10 batches (use --batch 128)")
    parser.add_argument("--variants", default="",
                        help="--cifar: comma-separated substrings selecting the runs")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="--cifar: steps at lr 0.01 (default: one epoch, like --warmup)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.cifar:
        cifar(args)
    else:
        parity(args)
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
