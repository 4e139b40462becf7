"""Input data for DHM: TFDS pipelines and the normalisation statistics.

`make_dataset` builds batched, normalised (image, label) datasets from any
prepared TFDS image-classification dataset; `stats` holds the per-channel
mean/std shared by training and the exported serving model.
"""

from dhm_keras.data.pipeline import (
    DatasetInfo,
    DatasetNotFoundError,
    dataset_info,
    make_dataset,
)
from dhm_keras.data.stats import (
    channel_stats,
    known_datasets,
    normalize,
    normalize_reference_np,
)

__all__ = [
    "DatasetInfo",
    "DatasetNotFoundError",
    "channel_stats",
    "dataset_info",
    "known_datasets",
    "make_dataset",
    "normalize",
    "normalize_reference_np",
]
