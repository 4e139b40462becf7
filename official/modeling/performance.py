"""Numeric precision and compilation switches shared by every trainer."""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import gin
import keras
from absl import logging

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
AUTO = "auto"

# x86 flags (Linux /proc/cpuinfo names) of native bfloat16 arithmetic that
# oneDNN uses for bfloat16 convolutions and matmuls: AVX-512 BF16 (Intel
# Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later) and AMX-BF16
# (Intel Sapphire Rapids and later). Without one of them oneDNN emulates
# bfloat16 and the mixed step was ~14x slower than float32 (docs/performance.md).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# NVIDIA GPUs compute bfloat16 natively from Ampere (compute capability 8.0) on.
MIN_BF16_COMPUTE_CAPABILITY = (8, 0)
CPUINFO = "/proc/cpuinfo"


def read_cpu_flags(cpuinfo: str = CPUINFO) -> frozenset:
    """The CPU's feature flags from `/proc/cpuinfo` (empty where it cannot be read).

    x86 lists them on "flags" lines, ARM on "Features" lines; the first such
    line is taken (every core of one machine reports the same).
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def read_cpu_model(cpuinfo: str = CPUINFO) -> str:
    """The CPU's model name from `/proc/cpuinfo` ("unknown CPU" where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Processor"):
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def native_bf16_flags(flags: Iterable[str]) -> Tuple[str, ...]:
    """Those of `CPU_BF16_FLAGS` that `flags` holds, in `CPU_BF16_FLAGS` order."""
    flags = set(flags)
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def cpu_description(cpuinfo: str = CPUINFO) -> str:
    """One line naming the CPU and its bfloat16 support, printed next to benchmark numbers:
    'Intel(R) Xeon(R) Processor, 2 cores, native BF16: avx512_bf16, amx_bf16'."""
    flags = native_bf16_flags(read_cpu_flags(cpuinfo))
    bf16 = f"native BF16: {', '.join(flags)}" if flags else f"no native BF16 (none of {', '.join(CPU_BF16_FLAGS)})"
    return f"{read_cpu_model(cpuinfo)}, {os.cpu_count()} cores, {bf16}"


def local_accelerators() -> list:
    """The accelerators TensorFlow sees, as the resolver's `accelerators` argument.

    One dict per device: {"type": "GPU", "name": ..., "compute_capability": (major, minor)
    or None} or {"type": "TPU", "name": ...}. TPUs are listed only once the TPU system is
    initialised (after `get_strategy(name='tpu')`), so resolve after building the strategy.
    """
    import tensorflow as tf

    devices = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # noqa: BLE001  (details are best effort; unknown -> float32)
            details = {}
        capability = details.get("compute_capability")
        devices.append({
            "type": "GPU",
            "name": details.get("device_name", gpu.name),
            "compute_capability": tuple(capability) if capability else None,
        })
    tpus = tf.config.list_physical_devices("TPU") or tf.config.list_logical_devices("TPU")
    devices += [{"type": "TPU", "name": tpu.name} for tpu in tpus]
    return devices


def onednn_enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """False only where TF_ENABLE_ONEDNN_OPTS turns oneDNN off (importing `official`
    turns it on unless it was set): without oneDNN, TensorFlow has no native
    bfloat16 CPU kernels whatever the CPU."""
    value = (os.environ if environ is None else environ).get("TF_ENABLE_ONEDNN_OPTS", "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def resolve_precision_policy(
    policy: str,
    cpu_flags: Optional[Iterable[str]] = None,
    accelerators: Optional[Sequence[Mapping]] = None,
    onednn: Optional[bool] = None,
) -> Tuple[str, str]:
    """(policy to use, why): turns `policy` ("auto" or one of `PRECISIONS`) into a
    Keras policy name. Pure given its arguments; those left None are read from
    this machine (`read_cpu_flags()`, `local_accelerators()`, `onednn_enabled()`).

    An explicit policy is returned as is. "auto" picks "mixed_bfloat16" where
    the device that computes has native bfloat16 arithmetic, "float32" elsewhere:

    * with accelerators, they compute: TPUs (all have bfloat16), or GPUs when
      every one has compute capability >= 8.0 (Ampere and later); an older or
      unidentified GPU -> float32;
    * without, the CPU: one of `CPU_BF16_FLAGS` (avx512_bf16, amx_bf16) and
      oneDNN on -> mixed_bfloat16.

    "auto" never picks "mixed_float16" (it needs loss scaling, and a Volta/Turing
    GPU is a choice to make explicitly).
    """
    if policy in PRECISIONS:
        return policy, f"set explicitly to {policy}"
    if policy != AUTO:
        raise ValueError(
            f"Unknown precision policy {policy!r}; expected {AUTO!r} or one of {PRECISIONS}"
        )
    if accelerators is None:
        accelerators = local_accelerators()
    accelerators = list(accelerators)
    if accelerators:
        tpus = [a for a in accelerators if a.get("type") == "TPU"]
        if tpus:
            return "mixed_bfloat16", f"auto: {len(tpus)} TPU core(s), which compute bfloat16 natively"
        gpus = [a for a in accelerators if a.get("type") == "GPU"]
        if gpus:
            def describe(gpu):
                capability = gpu.get("compute_capability")
                shown = ".".join(str(c) for c in capability) if capability else "unknown"
                return f"{gpu.get('name', 'GPU')} (compute capability {shown})"

            lacking = [
                g for g in gpus
                if not g.get("compute_capability")
                or tuple(g["compute_capability"]) < MIN_BF16_COMPUTE_CAPABILITY
            ]
            if lacking:
                return "float32", (
                    f"auto: GPU {describe(lacking[0])} has no native bfloat16 "
                    f"(needs compute capability >= {MIN_BF16_COMPUTE_CAPABILITY[0]}.{MIN_BF16_COMPUTE_CAPABILITY[1]})"
                )
            return "mixed_bfloat16", (
                f"auto: every GPU has native bfloat16: {', '.join(describe(g) for g in gpus)}"
            )
    flags = native_bf16_flags(read_cpu_flags() if cpu_flags is None else cpu_flags)
    if not flags:
        return "float32", (
            f"auto: CPU without native bfloat16 (none of {', '.join(CPU_BF16_FLAGS)} in "
            f"{CPUINFO}); bfloat16 would be emulated, many times slower"
        )
    if not (onednn_enabled() if onednn is None else onednn):
        return "float32", (
            f"auto: CPU has {', '.join(flags)} but TF_ENABLE_ONEDNN_OPTS turns oneDNN off, "
            "and TensorFlow's other CPU kernels emulate bfloat16"
        )
    return "mixed_bfloat16", f"auto: CPU with native bfloat16 ({', '.join(flags)}) and oneDNN on"


def resolve_for_resume(
    requested: str,
    recorded: Optional[Mapping] = None,
    **machine,
) -> Tuple[str, str]:
    """(policy to use, why) for a run that may resume one started earlier.

    `requested` is this start's `set_precision_policy.policy`; `recorded` the
    "precision" section of the model directory's config.json, or None for a
    new run. A run that asked for "auto" keeps the policy it started with
    ("resolved", or "policy" in records written before "auto" existed), even on a
    machine that would resolve otherwise; an explicit policy is returned as is
    (whether it may differ from the recorded one is the config check's call).
    Otherwise resolves like `resolve_precision_policy(requested, **machine)`.
    """
    if requested == AUTO and recorded:
        kept = recorded.get("resolved") or recorded.get("policy")
        if kept in PRECISIONS:
            fresh, _ = resolve_precision_policy(AUTO, **machine)
            note = "" if fresh == kept else f" (this machine alone would pick {fresh})"
            return kept, f"auto: resumed run keeps the policy it started with, {kept}{note}"
    return resolve_precision_policy(requested, **machine)


def apply_precision_policy(requested: str, recorded: Optional[Mapping] = None) -> dict:
    """What a trainer calls before building its model: resolves `requested` (keeping
    the policy a resumed "auto" run started with, see `resolve_for_resume`), logs
    the choice and the reason, sets Keras' global policy, and returns the
    "precision" section for config.json: {"policy": requested, "resolved": name}.

    `requested` is `set_precision_policy`'s Gin-bound `policy`; `recorded` the
    model directory's config.json "precision" section (None for a new run).
    """
    resolved, reason = resolve_for_resume(requested, recorded)
    # A machine-made choice is shown by default; an explicit one only with --verbosity.
    log = logging.warning if requested == AUTO else logging.info
    log("Precision policy %s (%s)", resolved, reason)
    keras.mixed_precision.set_global_policy(resolved)
    return {"policy": requested, "resolved": resolved}


@gin.configurable(module="official")
def set_precision_policy(policy: str = "float32") -> str:
    """Sets Keras' global dtype policy and returns its name; must run BEFORE any
    model is built.

    "float32": everything in float32. "mixed_bfloat16": compute in bfloat16,
    variables in float32, no loss scaling (bfloat16 has float32's exponent);
    the choice on TPUs, Ampere-or-later GPUs and CPUs with AVX-512 BF16 or AMX.
    "mixed_float16": compute in float16 with dynamic loss scaling (`compile`
    wraps the optimizer in a `LossScaleOptimizer`; `DHMModel.train_step` makes
    its overflow check cross-replica). Heads' logits, the DHM loss, batch-norm
    statistics and the optimizer's state stay float32 under both.
    "auto": one of the above for this machine (`resolve_precision_policy`),
    logged with the reason; the returned name is the one to record. Resolve
    after building the strategy, so that TPUs are visible.
    """
    resolved, reason = resolve_precision_policy(policy)
    logging.info("Precision policy %s (%s)", resolved, reason)
    keras.mixed_precision.set_global_policy(resolved)
    return resolved


def resolve_jit_compile(setting, strategy) -> bool:
    """Turns the `jit_compile` knob (True, False or "auto") into a decision.

    "auto" enables XLA only for a single replica on a GPU: on this project's
    CPUs a ResNet-32 DHM step ran at 0.66x with XLA (docs/performance.md), and
    Keras' compiled step fails when it spans several replicas (see
    docs/keras3-notes.md).
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU")) and replicas == 1
    if setting not in (True, False):
        raise ValueError(f"jit_compile must be True, False or 'auto', got {setting!r}")
    if setting and replicas > 1:
        raise ValueError(
            f"jit_compile=True is not supported with {replicas} replicas "
            "(Keras compiles the whole replicated step); use 'auto' or False"
        )
    return setting
