"""Person re-identification (Market-1501, DukeMTMC-reID), trained as identity classification.

Training reads the dataset's folder layout (`dhm_keras.data.reid`) and
classifies training identities; evaluation is retrieval: B0's pooled
features of the query split ranked against the gallery split, scored by CMC
rank-k and mAP (`dhm_keras.evaluation.reid`). "Best epoch" maximises rank-1.
"""

from __future__ import annotations

import tensorflow as tf

from dhm_keras import errors
from dhm_keras.data import augment
from dhm_keras.data import reid as reid_data
from dhm_keras.evaluation import reid as reid_eval
from dhm_keras.tasks.image_classification import ImageClassificationTask
from official.core import base_task, task_factory


@task_factory.register_task("person_reid")
class PersonReidTask(ImageClassificationTask):
    """Identity classification for training, retrieval for evaluation."""

    scoring = base_task.Scoring(result_metrics=("rank1", "rank5", "rank10", "mAP"), score_metrics=("rank1",))

    def read_dataset_info(self):
        dataset = self.config.dataset
        if dataset.label_noise:
            raise ValueError("dataset.label_noise is not supported for re-ID datasets")
        return reid_data.reid_info(dataset.name, dataset.data_dir)

    def check_inputs(self, training: bool) -> None:
        del training  # reid_info (dataset_info) has listed every folder already

    def _split(self, split: str, training: bool, first_epoch: int = 0) -> tf.data.Dataset:
        dataset, options = self.config.dataset, self._common()
        if training:
            return reid_data.make_reid_training_stream(
                dataset.name, split, first_epoch=first_epoch, padding=dataset.padding,
                random_erasing=dataset.random_erasing, **options,
            )
        return reid_data.make_reid_dataset(dataset.name, split, training=False, **options)

    def build_train_inputs(self, first_epoch: int = 0) -> tf.data.Dataset:
        return self._split(self.config.dataset.train_split, True, first_epoch)

    def build_eval_inputs(self):
        return None  # scored by retrieval (evaluation_callbacks), not by Keras' evaluate

    def query_and_gallery(self):
        return self._split(self.config.dataset.eval_split, False), self._split("gallery", False)

    def evaluation_callbacks(self, every: int):
        query, gallery = self.query_and_gallery()
        return [reid_eval.RetrievalEvaluator(query, gallery, every=every)]

    def evaluate(self, model, verbose: int = 0) -> dict:
        del verbose
        query, gallery = self.query_and_gallery()
        network = getattr(model, "network", model)
        return reid_eval.evaluate_model(reid_eval.feature_extractor(network), query, gallery)

    def evaluate_export(self, export_path: str) -> dict:
        raise errors.CheckpointError(
            f"--checkpoint={export_path} is an export, which serves b0's class logits; "
            "re-ID evaluation ranks the gallery by the network's embedding, so pass a "
            "weights file (<model_dir>/checkpoints/epoch_NNN.weights.h5) instead"
        )

    def serving_decode(self, hw):
        # Re-ID images are resized whole (no eval_resize crop), as evaluation does.
        return lambda encoded: augment.eval_image_transform(encoded, hw)
