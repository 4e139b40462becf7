"""Numeric precision and compilation switches shared by every trainer."""

from __future__ import annotations

import gin
import keras

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@gin.configurable(module="official")
def set_precision_policy(policy: str = "float32") -> str:
    """Sets Keras' global dtype policy; must run BEFORE any model is built.

    "float32": everything in float32. "mixed_bfloat16": compute in bfloat16,
    variables in float32, no loss scaling (bfloat16 has float32's exponent);
    the choice on TPUs and Ampere-or-later GPUs. "mixed_float16": compute in
    float16 with dynamic loss scaling (`compile` wraps the optimizer in a
    `LossScaleOptimizer`; `DHMModel.train_step` makes its overflow check
    cross-replica). Heads' logits and the DHM loss stay float32 under both.
    """
    if policy not in PRECISIONS:
        raise ValueError(f"Unknown precision policy {policy!r}; expected one of {PRECISIONS}")
    keras.mixed_precision.set_global_policy(policy)
    return policy


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
