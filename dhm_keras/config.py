"""The experiment's knobs, bound by Gin.

Each dataclass is one concern; a Gin file sets its fields by the short names
used below (``dataset.name = 'cifar100'``, ``model.name = 'resnet32'``,
``mimicking.alpha = 1.0``, ``train.epochs = 164``). Optimizer, strategy and
precision knobs live with their builders in `official/` (``build_sgd.*``,
``get_strategy.*``, ``set_precision_policy.*``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import gin


@gin.configurable("task")
@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which kind of problem the run solves: a name registered with
    `official.core.task_factory` ('image_classification', the default, or
    'person_reid'; a user's own task registers itself on import, e.g. through
    a Gin ``import`` statement)."""

    name: str = "image_classification"


@gin.configurable("dataset")
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which TFDS dataset, where, and which splits.

    ``data_dir`` may also come from ``--data_dir`` (the flag wins); None lets
    TFDS use TFDS_DATA_DIR or its default folder.
    """

    name: str = "cifar100"
    data_dir: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    image_size: Optional[Sequence[int]] = None
    padding: int = 4
    cache: bool = True
    # Per-channel RGB statistics in [0, 1] units; None = the built-in table
    # of `dhm_keras.data.stats` (an unknown dataset then needs them set here).
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    # Appendix E: fraction of TRAINING labels replaced by uniformly random
    # ones, fixed per example for the whole run (seed: label_noise_seed,
    # default train.seed). Evaluation labels always stay clean.
    label_noise: float = 0.0
    label_noise_seed: Optional[int] = None
    # Training augmentation: "pad_crop_flip" (CIFAR recipe: zero-pad by
    # `padding`, random crop back, flip) or "random_resized_crop" (ImageNet
    # recipe: Inception crop of scale 0.08-1 resized to image_size, flip) or
    # "none" (shuffle only; the memorisation regime of noisy-label demos).
    augmentation: str = "pad_crop_flip"
    # Evaluation: resize the shorter side to `eval_resize` and centre-crop
    # image_size (ImageNet: 256 -> 224); None resizes straight to image_size.
    eval_resize: Optional[int] = None
    # Re-ID only: random erasing probability (Zhong et al.), 0 = off.
    random_erasing: float = 0.0


@gin.configurable("model")
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture name (see `dhm_keras.models.available_models`) and training mode."""

    name: str = "resnet32"
    mode: str = "dhm"
    overrides: Optional[dict] = None
    # The class count is read from the dataset; setting it here states an
    # expectation, and a dataset with another count is refused early.
    num_classes: Optional[int] = None
    # Synchronised batch normalisation across replicas (global-batch
    # statistics); off by default, like the reference.
    sync_batchnorm: bool = False


@gin.configurable("mimicking")
@dataclasses.dataclass(frozen=True)
class MimickingConfig:
    """The mimicking term: weight alpha, temperature T, reference smoothing
    epsilon (0 = exact KL), the Bernoulli participation probability of
    Appendix D (None = every branch in every epoch) and the graph of who
    mimics whom: a preset of `dhm_keras.mimicking_graph` ('all_pairs' = DHM,
    'main_teaches', 'deep_teaches_shallow', 'shallow_teaches_deep') or a list
    of (teacher, student[, weight]) edges such as [('b0', 'b1'), ('b1', 'b2', 0.5)]."""

    alpha: float = 1.0
    temperature: float = 1.0
    epsilon: float = 0.0
    bernoulli_p: Optional[float] = None
    graph: object = "all_pairs"


@gin.configurable("train")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop-level settings. ``batch_size`` is global (split across replicas).

    ``jit_compile``: True, False or "auto" (XLA on a single GPU, off on CPU
    where it measured slower, and off under multi-replica strategies where
    Keras cannot compile the replicated step).
    """

    epochs: int = 164
    batch_size: int = 128
    seed: int = 0
    jit_compile: object = "auto"
    deterministic: bool = False
    # Evaluate every N epochs, and always after the last one (evaluation of
    # a large test split can cost as much as an epoch of a small train split).
    eval_every: int = 1
    # Cross-entropy label smoothing of every head (0 = off, as in the
    # reference recipes); the mimicking terms are unaffected.
    label_smoothing: float = 0.0
    verbose: int = 1
    # Epoch checkpoints to keep in checkpoints/: None keeps all; N keeps the
    # newest N plus the best epoch's (results.json "best"). ResNet-50 DHM
    # weights with optimizer slots are ~0.4 GB per epoch.
    keep_checkpoints: Optional[int] = None

    def __post_init__(self):
        # Checked when the config is first read, before anything is written to
        # model_dir: a bad value must not leave a config.json behind.
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be an integer >= 1, got {value!r}")
        keep = self.keep_checkpoints
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"train.keep_checkpoints must be None or an integer >= 1, got {keep!r}")


@gin.configurable("diagnostics")
@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Measurements that leave training unchanged (kept out of config.json, so
    turning them on never makes a model_dir "another experiment").

    ``gradient_consistency_every``: every N optimizer steps (0 = off), the
    cosine between the cross-entropy gradients of each auxiliary head and of
    b0 on their shared backbone (Appendix C), on the first evaluation batch;
    TensorBoard ``gradient_cosine/bK`` in logs/train (see
    `dhm_keras.gradient_consistency`).
    """

    gradient_consistency_every: int = 0
