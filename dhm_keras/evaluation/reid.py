"""Person re-identification evaluation: CMC and mAP under the Market-1501 protocol.

A re-ID model is not judged by its classifier (query and gallery people are
not training identities) but by retrieval: B0's pooled features of every
query image rank the gallery by distance, and a query is answered correctly
at rank k if one of the k nearest gallery images shows the same person.

The protocol, exactly as implemented by `evaluate` (it is the one of the
Market-1501 benchmark code, open-reid and torchreid's `eval_market1501`):

* For each query, gallery entries with the SAME person id AND the SAME
  camera are removed from its ranking: finding the same person in the same
  camera view is too easy to count, and such images are not negatives either.
  Same id in another camera = a true match; any other id = a negative.
* Junk gallery images (person id -1: detector boxes with less than 20%
  overlap with a person) are removed from every ranking; the readers of
  `dhm_keras.data.reid` never load them, and `evaluate` drops any it is given.
* Distractors (person id 0, "0000" in Market-1501 file names: boxes of
  background or of people outside the benchmark) stay in the gallery as
  negatives for every query.
* A query with no true match left after the removals (possible on
  DukeMTMC-reID and on subsets; a junk query, id -1, never has one) is
  skipped and counted in `RetrievalResult.num_skipped`; every average is
  over the remaining ("valid") queries. If no query is valid, ValueError.
* Ranking sorts distances ascending with a STABLE sort: equal distances keep
  gallery order (NumPy's argsort; torchreid uses the default quicksort, so
  exact ties may rank differently there).
* CMC: `cmc[k - 1]` = fraction of valid queries whose first true match is
  among their k nearest remaining gallery entries. A query whose ranking has
  fewer than k entries counts as its whole ranking (it holds a match, so 1):
  the curve is always `max_rank` long, whatever the gallery size.
* AP of one query = mean, over its true matches, of the precision at each
  match's position in the ranking (torchreid's formula, i.e. the area under
  the non-interpolated precision-recall curve); mAP = mean AP over valid
  queries. The original Market-1501 MATLAB code instead averages the
  precisions before and after each match (trapezoid rule), which reads a
  little higher.

Everything here is NumPy on host memory, processed in chunks of queries
(`_CHUNK` rows of the distance matrix at a time), so ranking the full
Market-1501 evaluation (3,368 x 15,913) holds ~200 MB of temporaries at most.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dhm_keras import heads as heads_lib

JUNK_ID = -1
DISTRACTOR_ID = 0
METRICS = ("euclidean", "sqeuclidean", "cosine")
# Ranks reported by `evaluate_model` and the callback.
REPORTED_RANKS = (1, 5, 10)
_CHUNK = 256  # query rows ranked at a time


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """Everything `evaluate` computes.

    `cmc[k - 1]` is the rank-k accuracy (length `max_rank`); `average_precision`
    has one entry per valid query (in query order); `valid` marks which
    queries were valid (had a true match after the removals).
    """

    cmc: np.ndarray
    mean_ap: float
    average_precision: np.ndarray
    valid: np.ndarray

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def num_skipped(self) -> int:
        return int(self.valid.size - self.valid.sum())


def _as_1d_int(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_inputs(distances, query_ids, gallery_ids, query_cams, gallery_cams, max_rank):
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(
            f"distances must be 2-D [num_query, num_gallery], got shape {distances.shape}"
        )
    num_query, num_gallery = distances.shape
    query_ids = _as_1d_int(query_ids, "query_ids")
    gallery_ids = _as_1d_int(gallery_ids, "gallery_ids")
    query_cams = _as_1d_int(query_cams, "query_cams")
    gallery_cams = _as_1d_int(gallery_cams, "gallery_cams")
    for name, array, want in (
        ("query_ids", query_ids, num_query),
        ("query_cams", query_cams, num_query),
        ("gallery_ids", gallery_ids, num_gallery),
        ("gallery_cams", gallery_cams, num_gallery),
    ):
        if array.shape[0] != want:
            raise ValueError(
                f"{name} has {array.shape[0]} entries but distances has shape "
                f"{distances.shape} (expected {want})"
            )
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"empty query or gallery: distances shape {distances.shape}")
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if not np.issubdtype(distances.dtype, np.number):
        raise ValueError(f"distances must be numeric, got dtype {distances.dtype}")
    if np.isnan(distances).any():
        raise ValueError("distances contain NaN (broken features?)")
    return distances, query_ids, gallery_ids, query_cams, gallery_cams, int(max_rank)


def evaluate_detailed(
    distances,
    query_ids,
    gallery_ids,
    query_cams,
    gallery_cams,
    max_rank: int = 50,
) -> RetrievalResult:
    """`evaluate` with per-query details (see the module docstring for the protocol)."""
    distances, q_ids, g_ids, q_cams, g_cams, max_rank = _check_inputs(
        distances, query_ids, gallery_ids, query_cams, gallery_cams, max_rank
    )
    # Junk gallery images take part in no ranking.
    keep = g_ids != JUNK_ID
    distances, g_ids, g_cams = distances[:, keep], g_ids[keep], g_cams[keep]
    num_query = distances.shape[0]
    ranks = np.arange(1, max_rank + 1)
    hits = np.zeros(max_rank, np.int64)
    valid = np.zeros(num_query, bool)
    aps = []
    if distances.shape[1] == 0:
        raise ValueError("no gallery image left after removing junk (id -1) entries")
    for start in range(0, num_query, _CHUNK):
        stop = min(start + _CHUNK, num_query)
        order = np.argsort(distances[start:stop], axis=1, kind="stable")
        ids, cams = g_ids[order], g_cams[order]  # [chunk, G] in ranked order
        same_id = ids == q_ids[start:stop, None]
        counted = ~(same_id & (cams == q_cams[start:stop, None]))
        match = same_id & counted
        # 1-based position of each entry among the entries that count.
        position = np.cumsum(counted, axis=1)
        num_matches = match.sum(axis=1)
        ok = num_matches > 0
        valid[start:stop] = ok
        if not ok.any():
            continue
        match, position, num_matches = match[ok], position[ok], num_matches[ok]
        first = position[np.arange(match.shape[0]), match.argmax(axis=1)]
        hits += (first[:, None] <= ranks[None, :]).sum(axis=0)
        # Precision at a match = matches so far / its position.
        precision = np.cumsum(match, axis=1) / position.clip(min=1)
        aps.append((precision * match).sum(axis=1) / num_matches)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"none of the {num_query} queries has a true match in the gallery (same "
            "person id, other camera, id != -1): check the ids/cameras or the splits"
        )
    average_precision = np.concatenate(aps)
    return RetrievalResult(
        cmc=hits.astype(np.float64) / num_valid,
        mean_ap=float(average_precision.mean()),
        average_precision=average_precision,
        valid=valid,
    )


def evaluate(
    distances,
    query_ids,
    gallery_ids,
    query_cams,
    gallery_cams,
    max_rank: int = 50,
) -> Tuple[np.ndarray, float]:
    """CMC curve and mAP of a query x gallery distance matrix (Market-1501 protocol).

    Args:
      distances: [num_query, num_gallery], smaller = more similar.
      query_ids, gallery_ids: person ids (-1 junk, 0 distractor, see the module doc).
      query_cams, gallery_cams: camera ids (any consistent numbering).
      max_rank: length of the CMC curve.

    Returns:
      `(cmc, mean_ap)`: float64 array with `cmc[k - 1]` = rank-k accuracy, and mAP,
      both in [0, 1] and averaged over the queries that have a true match.

    Raises:
      ValueError: malformed shapes, NaN distances, or no query with a true match.
    """
    result = evaluate_detailed(
        distances, query_ids, gallery_ids, query_cams, gallery_cams, max_rank
    )
    return result.cmc, result.mean_ap


# ----------------------------------------------------------------------------- features


def pairwise_distances(query_features, gallery_features, metric: str = "euclidean") -> np.ndarray:
    """[num_query, num_gallery] float32 distances between rows, in NumPy.

    metric:
      "euclidean": ||q - g||;
      "sqeuclidean": ||q - g||^2 (same ranking as "euclidean", hence the same CMC/mAP);
      "cosine": 1 - cos(q, g), rows L2-normalised first (zero rows stay zero).
    The squared distance is expanded as ||q||^2 + ||g||^2 - 2 q.g (one matrix
    product) and clipped at 0 against rounding; in float32 a pair of
    near-identical features can come out ~1e-6 * ||q||^2 off.
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}")
    q = np.asarray(query_features, np.float32)
    g = np.asarray(gallery_features, np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"features must be 2-D with equal widths, got {q.shape} and {g.shape}"
        )
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return (1.0 - q @ g.T).astype(np.float32)
    squared = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
    squared = np.maximum(squared, 0.0)
    return squared if metric == "sqeuclidean" else np.sqrt(squared)


def _b0_logits(network: keras.Model):
    outputs = network.output
    if isinstance(outputs, dict):
        return heads_lib.check_outputs(outputs, network.name)[heads_lib.MAIN]
    if isinstance(outputs, (list, tuple)):
        raise ValueError(f"{network.name}: expected dict outputs or a single tensor")
    return outputs  # a single-output model such as DHMModel.main_branch()


def feature_extractor(network: keras.Model) -> keras.Model:
    """images -> B0's pooled features, the input of B0's final Dense layer.

    Found through the graph, not by name: the layer that produces the b0
    logits (`network.output["b0"]`, or the only output of a b0-only model)
    must be a Dense, and its input is the feature. For every model of
    `dhm_keras.models` that is the float32 global average pool "b0_gap".
    The returned model shares layers (and so weights) with `network`: built
    once, it always sees the current weights.
    """
    logits = _b0_logits(network)
    history = getattr(logits, "_keras_history", None)
    layer = history.operation if history is not None else None
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(
            f"{network.name}: the b0 output is produced by "
            f"{type(layer).__name__ if layer is not None else 'nothing'}, not a Dense "
            "classifier; cannot locate the pooled features"
        )
    node = layer._inbound_nodes[history.node_index]
    features = node.input_tensors[0]
    return keras.Model(network.inputs, features, name=f"{network.name}_b0_features")


def extract_features(feature_model: keras.Model, dataset, training: bool = False):
    """Runs `feature_model` over `dataset` of `(images, {"pid", "camid"})` batches.

    Returns `(features float32 [N, D], pids int64 [N], camids int64 [N])` in
    dataset order. Inference mode (BN moving statistics) unless `training`.
    """
    call = _compiled_call(feature_model, training)
    features, pids, camids = [], [], []
    for images, meta in dataset:
        features.append(np.asarray(call(images), np.float32))
        pids.append(np.asarray(meta["pid"]))
        camids.append(np.asarray(meta["camid"]))
    if not features:
        raise ValueError("empty dataset: no features extracted")
    return (
        np.concatenate(features).reshape(sum(len(f) for f in features), -1),
        np.concatenate(pids).astype(np.int64),
        np.concatenate(camids).astype(np.int64),
    )


# feature model -> {training: tf.function}; weak, so it dies with the model.
_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_call(feature_model: keras.Model, training: bool):
    # One tf.function per (model, mode): per-epoch evaluation then traces once
    # (twice with a smaller last batch) instead of running batches eagerly.
    cache = _CALLS.setdefault(feature_model, {})
    if training not in cache:
        model_ref = weakref.ref(feature_model)  # a strong one would keep the key alive
        cache[training] = tf.function(
            lambda images: model_ref()(images, training=training), reduce_retracing=True
        )
    return cache[training]


def evaluate_model(
    feature_model: keras.Model,
    query_ds,
    gallery_ds,
    metric: str = "euclidean",
    max_rank: int = 50,
) -> dict:
    """Extracts features of both splits and returns rank1/rank5/rank10/mAP (+ counts).

    Values are fractions in [0, 1]; `num_valid_queries`/`num_skipped_queries`
    say how many queries the averages cover (see the module doc). The CMC is
    computed up to `max(max_rank, 10)` so that rank10 always exists.
    """
    q_feat, q_ids, q_cams = extract_features(feature_model, query_ds)
    g_feat, g_ids, g_cams = extract_features(feature_model, gallery_ds)
    distances = pairwise_distances(q_feat, g_feat, metric)
    max_rank = max(int(max_rank), max(REPORTED_RANKS))
    result = evaluate_detailed(distances, q_ids, g_ids, q_cams, g_cams, max_rank)
    metrics = {f"rank{k}": float(result.cmc[k - 1]) for k in REPORTED_RANKS}
    metrics["mAP"] = result.mean_ap
    metrics["num_valid_queries"] = result.num_valid
    metrics["num_skipped_queries"] = result.num_skipped
    return metrics


# ----------------------------------------------------------------------------- callback


class RetrievalEvaluator(keras.callbacks.Callback):
    """Adds `val_rank1`, `val_rank5`, `val_rank10`, `val_mAP` to the epoch logs.

    Evaluates B0's pooled features (`feature_extractor`) of the training
    model's network (`model.network` of a DHMModel, else the model itself)
    after every `every`-th epoch and after the last one, so the metrics reach
    every callback placed AFTER this one in the list (TensorBoard, ResultsWriter,
    History). The counts of valid/skipped queries go to the absl log only.
    """

    def __init__(
        self,
        query_ds,
        gallery_ds,
        every: int = 1,
        metric: str = "euclidean",
        max_rank: int = 50,
        prefix: str = "val_",
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}")
        self.query_ds = query_ds
        self.gallery_ds = gallery_ds
        self.every = int(every)
        self.metric = metric
        self.max_rank = int(max_rank)
        self.prefix = prefix
        self._features: Optional[keras.Model] = None
        self._network = None

    def _feature_model(self) -> keras.Model:
        network = getattr(self.model, "network", self.model)
        if self._features is None or self._network is not network:
            self._features = feature_extractor(network)
            self._network = network
        return self._features

    def should_evaluate(self, epoch: int) -> bool:
        """0-based `epoch` (as Keras passes it): every `every`-th and the last."""
        total = (self.params or {}).get("epochs")
        return (epoch + 1) % self.every == 0 or (total is not None and epoch + 1 == total)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self.should_evaluate(epoch):
            return
        metrics = evaluate_model(
            self._feature_model(), self.query_ds, self.gallery_ds, self.metric, self.max_rank
        )
        logging.info(
            "epoch %d retrieval: rank1 %.4f mAP %.4f (%d valid, %d skipped queries)",
            epoch + 1, metrics["rank1"], metrics["mAP"],
            metrics["num_valid_queries"], metrics["num_skipped_queries"],
        )
        for key in ("rank1", "rank5", "rank10", "mAP"):
            logs[f"{self.prefix}{key}"] = metrics[key]
