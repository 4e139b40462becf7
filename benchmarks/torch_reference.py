"""A small PyTorch re-implementation of the DHM reference CIFAR ResNet-32 (yardstick only).

Written after the authors' reference (d-li14/DHM, models/cifar/resnet.py, cifar.py,
utils/metric.py) so that the Keras port can be checked against it number by number and
timed against it. PyTorch is NOT a dependency of dhm_keras: see benchmarks/requirements.txt.

* `build_reference(num_classes)`: ResNet-32 with auxiliary branches, module names as in
  the reference (conv1/bn1/layer1..3/fc, layer2_head2/layer3_head2/fc_head2,
  layer3_head1/fc_head1); forward returns (b0, b1, b2) logits like the reference.
* `dhm_loss(outputs, labels, T, alpha, epsilon)`: sum of every head's CE + alpha * sum
  over ordered (student, teacher) pairs of T^2 * KL(stopgrad(p_teacher) || p_student).
  epsilon=0 is the exact KL (log_softmax); epsilon=1e-8 is the reference's smoothing.
* `port_keras_weights(keras_model, torch_model)`: copy the weights of
  `dhm_keras.models.build("resnet32", C, mode="dhm")` into the torch model by layer name.
* `step_closure(batch, num_classes)`: one warmed-up DHM train step as a callable (what
  train_throughput.py and cpu_settings.py time); `train_throughput(batch, steps)`: its
  images/s on CPU.

Run `python benchmarks/torch_reference.py` for the parameter counts and the throughput.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("b0", "b1", "b2")
# Reference parameter counts (docs/models.md) for 100 classes.
EXPECTED_PARAMS_100 = {"b0": 470_004, "b1": 1_379_428, "b2": 298_212}


# ----------------------------------------------------------------------------- model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add, ReLU; shortcut avgpool 2x2 + zero channels."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x
        if self.downsample is not None:
            residual = self.downsample(x)
            extra = out.shape[1] - residual.shape[1]
            if extra:
                residual = torch.cat(
                    [residual, residual.new_zeros(residual.shape[0], extra, *residual.shape[2:])],
                    dim=1,
                )
        return F.relu(out + residual)


class CifarResNetDHM(nn.Module):
    """Reference CIFAR ResNet (depth 6n+2) with B1 (after layer2) and B2 (after layer1)."""

    def __init__(self, depth: int = 32, branch_layers=((5, 3), (5,)), num_classes: int = 10):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth should be 6n+2"
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n)
        inplanes_head2 = self.inplanes
        self.layer2 = self._make_layer(32, n, stride=2)
        inplanes_head1 = self.inplanes
        self.layer3 = self._make_layer(64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)

        self.inplanes = inplanes_head2
        self.layer2_head2 = self._make_layer(32, branch_layers[0][0], stride=2)
        self.layer3_head2 = self._make_layer(64, branch_layers[0][1], stride=2)
        self.fc_head2 = nn.Linear(64, num_classes)

        self.inplanes = inplanes_head1
        self.layer3_head1 = self._make_layer(128, branch_layers[1][0], stride=2)
        self.fc_head1 = nn.Linear(128, num_classes)

        # The reference's init; nn.Linear keeps PyTorch's default U(+-1/sqrt(fan_in)).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.AvgPool2d(kernel_size=2, stride=2)
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @staticmethod
    def _pool(x):
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = node2 = self.layer1(x)
        x = node1 = self.layer2(x)
        x0 = self.fc(self._pool(self.layer3(x)))
        x2 = self.fc_head2(self._pool(self.layer3_head2(self.layer2_head2(node2))))
        x1 = self.fc_head1(self._pool(self.layer3_head1(node1)))
        return x0, x1, x2


def head_of_param(name: str) -> str:
    if "_head1" in name:
        return "b1"
    if "_head2" in name:
        return "b2"
    return "b0"


def param_counts(model: nn.Module) -> dict:
    counts = {h: 0 for h in HEADS}
    for name, p in model.named_parameters():
        counts[head_of_param(name)] += p.numel()
    return counts


def build_reference(num_classes: int = 10, depth: int = 32) -> CifarResNetDHM:
    if depth != 32:
        raise ValueError("only ResNet-32 is provided")
    model = CifarResNetDHM(32, ((5, 3), (5,)), num_classes)
    if num_classes == 100:
        counts = param_counts(model)
        assert counts == EXPECTED_PARAMS_100, counts
    return model


# ----------------------------------------------------------------------------- loss


Outputs = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def _as_list(outputs: Outputs) -> list:
    if isinstance(outputs, Mapping):
        return [outputs[h] for h in sorted(outputs, key=lambda h: int(h[1:]))]
    return list(outputs)


def kl_div(student_logits, teacher_logits, T: float = 1.0, epsilon: float = 0.0):
    """T^2 * batch mean KL(stopgrad(p_teacher) || p_student).

    epsilon=0: exact, in log space. epsilon>0: the reference's utils/metric.py KLDivLoss,
    p <- (p + eps) / (1 + C eps) for both distributions, then p * log(p / q).
    """
    teacher_logits = teacher_logits.detach()
    if not epsilon:
        log_p = F.log_softmax(teacher_logits / T, dim=1)
        log_q = F.log_softmax(student_logits / T, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    else:
        c = student_logits.shape[1]
        p = (F.softmax(teacher_logits / T, dim=1) + epsilon) / (1.0 + c * epsilon)
        q = (F.softmax(student_logits / T, dim=1) + epsilon) / (1.0 + c * epsilon)
        kl = (p * torch.log(p / q)).sum(dim=1)
    return (T**2) * kl.mean()


def dhm_loss(outputs: Outputs, labels, T: float = 1.0, alpha: float = 1.0,
             epsilon: float = 0.0, mode: str = "dhm", return_parts: bool = False):
    """The reference objective: sum_h CE(z_h) [+ alpha * sum_{h != g} M(h <- g)]."""
    outs = _as_list(outputs)
    if mode == "baseline":
        outs = outs[:1]
    ce = [F.cross_entropy(o, labels) for o in outs]
    kl = {}
    if mode == "dhm":
        for s, student in enumerate(outs):
            for t, teacher in enumerate(outs):
                if s != t:
                    kl[f"b{t}->b{s}"] = alpha * kl_div(student, teacher, T, epsilon)
    total = sum(ce) + sum(kl.values()) if kl else sum(ce)
    if return_parts:
        return total, ce, kl
    return total


def make_optimizer(model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- porting

_BLOCK = re.compile(r"^(b[12]_)?stage(\d)_block(\d+)_(conv1|bn1|conv2|bn2)$")


def keras_to_torch_name(layer_name: str) -> str | None:
    """Torch module path of a Keras layer name; None for parameter-free layers."""
    fixed = {
        "stem_conv": "conv1",
        "stem_bn": "bn1",
        "b0_classifier": "fc",
        "b1_classifier": "fc_head1",
        "b2_classifier": "fc_head2",
    }
    if layer_name in fixed:
        return fixed[layer_name]
    m = _BLOCK.match(layer_name)
    if not m:
        return None
    prefix, stage, block, part = m.groups()
    suffix = {None: "", "b1_": "_head1", "b2_": "_head2"}[prefix]
    return f"layer{int(stage)}{suffix}.{int(block)}.{part}"


def _assign(param: torch.Tensor, value: np.ndarray, what: str):
    value = torch.as_tensor(np.ascontiguousarray(value), dtype=param.dtype)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{what}: shape {tuple(value.shape)} != torch {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def port_keras_weights(keras_model, torch_model: nn.Module) -> int:
    """Copy every conv/BN/dense weight of the Keras model into `torch_model`.

    Conv kernels HWIO -> OIHW; BN gamma/beta/moving mean/variance -> weight/bias/
    running_mean/running_var; Dense kernel (in, out) -> (out, in), bias as is.
    Every torch parameter and BN buffer must be written exactly once. Returns the
    number of Keras layers ported.
    """
    modules = dict(torch_model.named_modules())
    written = set()
    ported = 0
    for layer in keras_model.layers:
        if not layer.weights:
            continue
        target = keras_to_torch_name(layer.name)
        if target is None or target not in modules:
            raise ValueError(f"no torch module for Keras layer {layer.name!r} ({target})")
        mod = modules[target]
        kind = type(layer).__name__
        values = [np.asarray(w) for w in layer.get_weights()]
        if kind == "Conv2D":
            (kernel,) = values
            _assign(mod.weight, kernel.transpose(3, 2, 0, 1), layer.name)
            written.add(f"{target}.weight")
        elif kind == "BatchNormalization":
            gamma, beta, mean, var = values
            _assign(mod.weight, gamma, layer.name)
            _assign(mod.bias, beta, layer.name)
            _assign(mod.running_mean, mean, layer.name)
            _assign(mod.running_var, var, layer.name)
            written.update(f"{target}.{n}" for n in ("weight", "bias", "running_mean", "running_var"))
        elif kind == "Dense":
            kernel, bias = values
            _assign(mod.weight, kernel.T, layer.name)
            _assign(mod.bias, bias, layer.name)
            written.update(f"{target}.{n}" for n in ("weight", "bias"))
        else:
            raise ValueError(f"unexpected layer type {kind} for {layer.name}")
        ported += 1
    expected = {n for n, _ in torch_model.named_parameters()}
    expected |= {n for n, _ in torch_model.named_buffers() if not n.endswith("num_batches_tracked")}
    missing = expected - written
    if missing:
        raise ValueError(f"torch tensors not written: {sorted(missing)[:10]}")
    return ported


def torch_weight_for(torch_model: nn.Module, keras_layer_name: str, index: int = 0) -> np.ndarray:
    """A torch weight laid out like Keras' `layer.get_weights()[index]` (for comparisons)."""
    mod = dict(torch_model.named_modules())[keras_to_torch_name(keras_layer_name)]
    if isinstance(mod, nn.Conv2d):
        return mod.weight.detach().numpy().transpose(2, 3, 1, 0)
    if isinstance(mod, nn.BatchNorm2d):
        return [mod.weight, mod.bias, mod.running_mean, mod.running_var][index].detach().numpy()
    if isinstance(mod, nn.Linear):
        return (mod.weight.detach().numpy().T if index == 0 else mod.bias.detach().numpy())
    raise TypeError(type(mod))


# ----------------------------------------------------------------------------- timing


def train_step(model, optimizer, images, labels, **loss_kwargs):
    outputs = model(images)
    loss = dhm_loss(outputs, labels, **loss_kwargs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def step_closure(batch: int = 128, num_classes: int = 100, threads: int = 2,
                 warmup: int = 2) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one full DHM train step (forward 3 heads,
    loss, backward, SGD) on a fixed synthetic N(0,1) batch, already warmed up.

    The one set-up every benchmark times, so they all time the same thing.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_reference(num_classes).train()
    optimizer = make_optimizer(model)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, num_classes, (batch,))
    for _ in range(warmup):
        train_step(model, optimizer, images, labels)
    return lambda: train_step(model, optimizer, images, labels)


def train_throughput(batch: int = 128, steps: int = 10, warmup: int = 3,
                     num_classes: int = 100, threads: int = 2, repeats: int = 1) -> list:
    """Images/s of the full DHM train step; one rate per repeat."""
    step = step_closure(batch, num_classes, threads, warmup)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    counts = param_counts(build_reference(100))
    print("torch reference resnet32 params (100 classes):", counts,
          "total", sum(counts.values()))
    rates = train_throughput(args.batch, args.steps, repeats=args.repeats, threads=args.threads)
    print(f"torch {torch.__version__} DHM train step, batch {args.batch}, "
          f"{args.threads} threads: " + ", ".join(f"{r:.1f}" for r in rates)
          + f" images/s (median {sorted(rates)[len(rates) // 2]:.1f})")
