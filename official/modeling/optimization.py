"""Optimizers and learning-rate schedules, method-agnostic.

Two pieces that Keras does not ship in the form the classic CNN recipes use:

* ``L2SGD``: SGD with momentum where weight decay is *coupled* the PyTorch way,
  ``g <- g + wd * w`` before the momentum update, on every trainable weight.
  Keras' own ``weight_decay`` argument is decoupled (``w <- w - lr * wd * w``
  after the update), which is a different optimizer once momentum is used.
* ``EpochStepDecay``: ``lr = base * gamma ** (number of milestones reached)``
  where milestones are given in epochs, like PyTorch's ``MultiStepLR`` stepped
  once per epoch, with an optional linear warm-up given in epochs or in steps.
"""

from __future__ import annotations

from typing import Sequence

import gin
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="official")
class EpochStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant learning rate with boundaries given in epochs.

    The step passed in is the optimizer's iteration count before the update, so
    step ``k * steps_per_epoch`` is the first step of epoch ``k`` (0-based) and
    already uses the decayed rate when ``k`` is a milestone: epochs
    ``0 .. m-1`` train at the previous rate, exactly like ``MultiStepLR``.

    Warm-up multiplies step ``k`` by ``min(1, (k + 1) / W)``. ``W`` is given
    either in epochs (``warmup_epochs * steps_per_epoch``) or directly in steps
    (``warmup_steps``): on a small training subset an epoch is only a few dozen
    steps, so a warm-up that protects a run from the early collapse must be
    sized in steps, not in passes over the data. Giving both is refused: one
    knob owns the ramp's length.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        steps_per_epoch: int,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
    ):
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if warmup_steps < 0 or int(warmup_steps) != warmup_steps:
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {warmup_steps}")
        if warmup_epochs and warmup_steps:
            raise ValueError(
                f"give the warm-up in epochs or in steps, not both "
                f"(warmup_epochs={warmup_epochs}, warmup_steps={warmup_steps})"
            )
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_steps = int(warmup_steps)

    @property
    def warmup_length(self) -> float:
        """Length of the linear ramp in optimizer steps (0: no warm-up)."""
        return float(self.warmup_steps) or self.warmup_epochs * self.steps_per_epoch

    def __call__(self, step):
        epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
        reached = tf.zeros([], tf.float32)
        for milestone in self.milestones:
            reached += tf.cast(epoch >= milestone, tf.float32)
        rate = self.initial_learning_rate * tf.pow(self.gamma, reached)
        if self.warmup_length:
            # Linear ramp over the first warmup steps: step k uses (k + 1) / warmup.
            ramp = (tf.cast(step, tf.float32) + 1.0) / self.warmup_length
            rate = rate * tf.minimum(1.0, ramp)
        return rate

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "milestones": self.milestones,
            "gamma": self.gamma,
            "warmup_epochs": self.warmup_epochs,
            "warmup_steps": self.warmup_steps,
        }


@keras.saving.register_keras_serializable(package="official")
class L2SGD(keras.optimizers.SGD):
    """SGD (momentum, optional Nesterov) with PyTorch-style coupled weight decay.

    ``update_step`` receives the already all-reduced gradient of one variable,
    so adding ``l2 * w`` here is replica-count independent and costs no extra
    loss term.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, l2=0.0, nesterov=False, **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError("L2SGD couples decay into the gradient: pass `l2`, not `weight_decay`.")
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        """PyTorch's SGD: ``buf = mu * buf + (g + l2 * w)``; ``w -= lr * buf``.

        Keras' SGD folds the learning rate into the velocity
        (``m = mu * m - lr * g``), which differs from the reference for the
        steps right after a learning-rate milestone; this keeps the reference's
        order so milestone transitions match too.
        """
        dtype = variable.dtype
        learning_rate = tf.cast(learning_rate, dtype)
        gradient = tf.cast(gradient, dtype)
        if self.l2:
            gradient = gradient + tf.cast(self.l2, dtype) * tf.convert_to_tensor(variable)
        if not self.momentums:
            self.assign_sub(variable, learning_rate * gradient)
            return
        momentum = tf.cast(self.momentum, dtype)
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, momentum * buf + gradient)
        step = gradient + momentum * buf if self.nesterov else buf
        self.assign_sub(variable, learning_rate * step)

    def get_config(self):
        config = super().get_config()
        config["l2"] = self.l2
        return config


@gin.configurable(module="official")
def build_sgd(
    steps_per_epoch: int,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    nesterov: bool = False,
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
) -> L2SGD:
    """The reference CNN recipe: step-decayed SGD with coupled weight decay.

    `warmup_epochs` or `warmup_steps` > 0 adds a linear learning-rate ramp (off
    in the reference); use steps when an epoch is short (a training subset).
    """
    schedule = EpochStepDecay(
        learning_rate, steps_per_epoch, milestones, gamma, warmup_epochs, warmup_steps
    )
    return L2SGD(learning_rate=schedule, momentum=momentum, l2=weight_decay, nesterov=nesterov)
