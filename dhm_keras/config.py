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
    # What training prints to stdout (`dhm_keras.progress`): 0 nothing, 1 one
    # compact line every `log_every_steps` steps (in a terminal: one line
    # updated in place) and one line per epoch, 2 only the epoch lines. Never
    # Keras' progress bar: 19 metrics with ANSI codes per step made ~51 MB of
    # log for one Table 1 run.
    verbose: int = 1
    # Steps between progress lines and between the step-level TensorBoard
    # scalars (step_loss, step_learning_rate, step_steps_per_second,
    # step_images_per_second in logs/train).
    log_every_steps: int = 100
    # After this many optimizer steps (None: one epoch, at least
    # `callbacks.MIN_COLLAPSE_CHECK_STEPS`), stop with TrainingCollapsedError
    # if every head sits at the label prior (cross-entropy ln C, top-1 at
    # chance); 0 turns the check off (`callbacks.CollapseGuard`).
    collapse_check_steps: Optional[int] = None
    # Epoch checkpoints to keep in checkpoints/: the newest N plus the best
    # epoch's (results.json "best"); None keeps all. Bounded by default: a
    # 200-epoch WRN-28-10 DHM run keeping all would write ~263 GB (1.3 GB per
    # epoch with optimizer slots). Resuming never needs them (backup/ does).
    keep_checkpoints: Optional[int] = 3

    def __post_init__(self):
        # Checked when the config is first read, before anything is written to
        # model_dir: a bad value must not leave a config.json behind.
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be an integer >= 1, got {value!r}")
        if self.verbose not in (0, 1, 2) or isinstance(self.verbose, bool):
            raise ValueError(f"train.verbose must be 0, 1 or 2, got {self.verbose!r}")
        every = self.log_every_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"train.log_every_steps must be an integer >= 1, got {every!r}")
        check = self.collapse_check_steps
        if check is not None and (isinstance(check, bool) or not isinstance(check, int) or check < 0):
            raise ValueError(
                f"train.collapse_check_steps must be None (one epoch), 0 (off) or a positive integer, got {check!r}"
            )
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
