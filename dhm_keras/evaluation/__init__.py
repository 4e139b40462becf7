"""Evaluation beyond the training loop's accuracies: re-identification retrieval.

`reid` ranks a gallery for every query with B0's pooled features and reports
CMC (rank-k accuracy) and mAP under the Market-1501 protocol, as functions
and as a Keras callback that adds them to the epoch logs.
"""

from dhm_keras.evaluation.reid import (
    RetrievalEvaluator,
    RetrievalResult,
    evaluate,
    evaluate_detailed,
    evaluate_model,
    extract_features,
    feature_extractor,
    pairwise_distances,
)

__all__ = [
    "RetrievalEvaluator",
    "RetrievalResult",
    "evaluate",
    "evaluate_detailed",
    "evaluate_model",
    "extract_features",
    "feature_extractor",
    "pairwise_distances",
]
