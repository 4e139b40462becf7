"""Single-label image classification on a prepared TFDS dataset (CIFAR, ImageNet, ...).

Training and evaluation data come from `dhm_keras.data.pipeline`; the
network from `dhm_keras.models.build`; the score is B0's top-1 accuracy.
Served requests are decoded and resized exactly as the evaluation split is
(`augment.eval_image_transform`), so a served image scores what evaluation
scored.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from dhm_keras import errors
from dhm_keras import models
from dhm_keras.data import augment
from dhm_keras.data import pipeline
from dhm_keras.data import reid as reid_data
from dhm_keras.data import stats as stats_lib
from dhm_keras.data.input_errors import input_errors_are_clear
from dhm_keras.model import HEAD_ACCURACY
from official.core import base_task, task_factory


def check_image_size(image_size) -> Optional[tuple]:
    """`dataset.image_size` is None or two positive ints (H, W)."""
    if image_size is None:
        return None
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise errors.ImageSizeError(
            f"dataset.image_size must be (height, width) with positive ints, got {image_size!r}"
        )
    return size


@task_factory.register_task("image_classification")
class ImageClassificationTask(base_task.Task):
    """A TFDS dataset with `image` and `label` features."""

    # Every head's accuracies are recorded; the main head's top-1 picks "best".
    scoring = HEAD_ACCURACY

    def __init__(self, config):
        super().__init__(config)
        self._info = None
        self._require_prepared = True

    def without_records(self) -> "ImageClassificationTask":
        """A TFDS dataset that is registered but not prepared (imagenet2012
        before its manual download) still names its classes."""
        task = type(self)(self.config)
        task._require_prepared = False
        return task

    # -- data -----------------------------------------------------------------
    def dataset_info(self):
        if self._info is None:
            self._info = self.read_dataset_info()
            expected = self.config.model.num_classes
            if expected is not None and int(expected) != self._info.num_classes:
                raise errors.ClassCountError(
                    f"model.num_classes = {expected} but dataset {self._info.name} has "
                    f"{self._info.num_classes} classes; fix model.num_classes or dataset.name"
                )
        return self._info

    def read_dataset_info(self):
        """The dataset's metadata (overridden by tasks that read other formats)."""
        dataset = self.config.dataset
        if reid_data.is_reid_dataset(dataset.name):
            # Older Gin files chose re-ID by the dataset's name; say what to set.
            raise ValueError(
                f"dataset {dataset.name} is a person re-identification dataset: set "
                "task.name = 'person_reid' (gin/reid/reid_recipe.gin does)"
            )
        if dataset.random_erasing:
            raise ValueError("dataset.random_erasing is only supported by task.name = 'person_reid'")
        return pipeline.dataset_info(dataset.name, dataset.data_dir, require_prepared=self._require_prepared)

    def image_shape(self) -> tuple:
        """(H, W, 3) the network takes: `dataset.image_size`, else the dataset's own."""
        info = self.dataset_info()
        size = check_image_size(self.config.dataset.image_size) or tuple(info.image_shape[:2])
        if None in size:
            raise errors.ImageSizeError(
                f"dataset {info.name} has images of varying size {info.image_shape}; "
                "set dataset.image_size = (H, W)"
            )
        return (*size, 3)

    def steps_per_epoch(self) -> int:
        dataset, train = self.config.dataset, self.config.train
        examples = self.dataset_info().num_examples(dataset.train_split)
        if examples < train.batch_size:
            raise errors.TrainSplitTooSmallError(
                f"dataset.train_split {dataset.train_split!r} of {dataset.name} has {examples} "
                f"examples, fewer than one batch (train.batch_size = {train.batch_size}, global): "
                "an epoch would take no step, since the incomplete last batch is dropped; use a "
                "larger split or a smaller train.batch_size"
            )
        return examples // train.batch_size

    def check_inputs(self, training: bool) -> None:
        dataset = self.config.dataset
        splits = [dataset.train_split, dataset.eval_split] if training else [dataset.eval_split]
        for split in splits:
            pipeline.check_split(dataset.name, split, dataset.data_dir)

    def _common(self) -> dict:
        dataset, train = self.config.dataset, self.config.train
        return dict(
            data_dir=dataset.data_dir,
            global_batch_size=train.batch_size,
            seed=train.seed,
            image_size=self.image_shape()[:2],
            cache=dataset.cache,
            mean=dataset.mean,
            std=dataset.std,
        )

    def build_train_inputs(
        self, first_epoch: int = 0, input_context: Optional[tf.distribute.InputContext] = None
    ) -> tf.data.Dataset:
        """Seeded epochs from `first_epoch`; with `input_context`, this worker's
        files of the split (see `pipeline.make_training_stream`)."""
        dataset, train = self.config.dataset, self.config.train
        return pipeline.make_training_stream(
            dataset.name,
            dataset.train_split,
            first_epoch=first_epoch,
            input_context=input_context,
            augmentation=dataset.augmentation,
            padding=dataset.padding,
            label_noise=dataset.label_noise,
            label_noise_seed=(
                train.seed if dataset.label_noise_seed is None else dataset.label_noise_seed
            ),
            **self._common(),
        )

    def build_eval_inputs(self, raw_pixels: bool = False) -> tf.data.Dataset:
        """The evaluation split; with `raw_pixels`, 0..255 pixels instead of
        normalised ones (what an export, which normalises itself, takes)."""
        dataset = self.config.dataset
        options = self._common()
        if raw_pixels:  # mean 0, std 1/255: the normalisation is the identity
            options.update(cache=False, mean=(0.0, 0.0, 0.0), std=(1 / 255.0,) * 3)
        return pipeline.make_dataset(
            dataset.name, dataset.eval_split, training=False, eval_resize=dataset.eval_resize, **options
        )

    def evaluate_export(self, export_path: str) -> dict:
        """Top-1/top-5 of an exported B0 (its `serving_float` signature, i.e. with
        the export's own preprocessing) on the evaluation split."""
        served = tf.saved_model.load(export_path).signatures["serving_float"]
        export_hw = tuple(served.structured_input_signature[1]["images"].shape[1:3])
        info, image_hw = self.dataset_info(), self.image_shape()[:2]
        if tuple(image_hw) != export_hw:
            raise errors.ImageSizeError(
                f"export {export_path} takes {export_hw[0]}x{export_hw[1]} images but the eval "
                f"split of {info.name} gives {image_hw[0]}x{image_hw[1]}; set "
                f"dataset.image_size = {export_hw}"
            )
        num_classes = int(served.structured_outputs["logits"].shape[-1])
        if num_classes != info.num_classes:
            raise errors.ClassCountError(
                f"export {export_path} predicts {num_classes} classes but dataset "
                f"{info.name} has {info.num_classes}"
            )
        top1 = top5 = count = 0
        with input_errors_are_clear("evaluation"):
            for images, labels in self.build_eval_inputs(raw_pixels=True):
                logits = served(images=tf.clip_by_value(images, 0.0, 255.0))["logits"]
                labels = tf.cast(labels, tf.int32)
                hits = lambda k: int(tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k), tf.int32)))  # noqa: E731
                top1, top5 = top1 + hits(1), top5 + hits(min(5, num_classes))
                count += int(tf.shape(labels)[0])
        return {
            "export": export_path,
            "metrics": {"top1/b0": top1 / max(count, 1), "top5/b0": top5 / max(count, 1), "examples": count},
        }

    def build_network(self, image_shape: Optional[Sequence[int]], num_classes: Optional[int] = None) -> keras.Model:
        """The multi-head network; images too small for it are a clear error.

        `num_classes` defaults to the dataset's; `image_shape` None means the
        architecture's default input (tools that only read weights).
        """
        model = self.config.model
        if num_classes is None:
            num_classes = self.dataset_info().num_classes
        try:
            return models.build(
                model.name,
                int(num_classes),
                mode=model.mode,
                input_shape=tuple(image_shape) if image_shape else None,
                sync_batchnorm=model.sync_batchnorm,
                **(model.overrides or {}),
            )
        except ValueError as e:
            if "size would be zero or negative" not in str(e):
                raise
            raise errors.ImageSizeError(
                f"{image_shape[0]}x{image_shape[1]} images are too small for {model.name}: "
                "its feature maps shrink to nothing; use a larger dataset.image_size"
            ) from e

    # -- serving --------------------------------------------------------------
    def class_names(self):
        """The TFDS label names (CIFAR-10: 'airplane', ..., 'truck'), or None."""
        return list(getattr(self.dataset_info(), "class_names", ()) or ()) or None

    def serving_decode(self, hw):
        eval_resize = self.config.dataset.eval_resize
        return lambda encoded: augment.eval_image_transform(encoded, hw, eval_resize)

    def serving_preprocess(self):
        dataset = self.config.dataset
        mean, std = stats_lib.channel_stats(dataset.name, dataset.mean, dataset.std)
        return lambda pixels: stats_lib.normalize(pixels, mean, std)
