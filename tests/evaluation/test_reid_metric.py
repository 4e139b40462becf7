"""Re-ID retrieval metrics (CMC, mAP) against an independent brute-force reference.

The reference below walks every query's ranking element by element, the way the
protocol is written down (Market-1501 benchmark / torchreid's eval_market1501),
sharing no code with `dhm_keras.evaluation.reid`'s vectorised version.
"""

from __future__ import annotations

import numpy as np
import pytest

from dhm_keras.evaluation import reid
from dhm_keras.evaluation.reid import evaluate, evaluate_detailed, pairwise_distances


def brute_force(dist, q_ids, g_ids, q_cams, g_cams, max_rank):
    """Per query: drop junk and same-id-same-camera gallery entries, rank the rest
    (ties by gallery index), first-hit CMC and AP = mean precision at the hits."""
    cmcs, aps = [], []
    for i in range(len(q_ids)):
        ranking = sorted(
            (float(dist[i, j]), j)
            for j in range(len(g_ids))
            if g_ids[j] != -1 and not (g_ids[j] == q_ids[i] and g_cams[j] == q_cams[i])
        )
        flags = [g_ids[j] == q_ids[i] for _, j in ranking]
        if not any(flags):
            continue
        first = flags.index(True) + 1  # 1-based
        cmcs.append([1.0 if first <= k else 0.0 for k in range(1, max_rank + 1)])
        found, precisions = 0, []
        for position, flag in enumerate(flags, start=1):
            if flag:
                found += 1
                precisions.append(found / position)
        aps.append(sum(precisions) / len(precisions))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), len(aps)


def random_problem(seed, num_query=40, num_gallery=200, num_ids=12, num_cams=4, dim=16):
    rng = np.random.default_rng(seed)
    # ids -1 (junk) and 0 (distractor) included on both sides.
    q_ids = rng.integers(-1, num_ids, num_query)
    g_ids = rng.integers(-1, num_ids, num_gallery)
    q_cams = rng.integers(0, num_cams, num_query)
    g_cams = rng.integers(0, num_cams, num_gallery)
    # Features correlated with identity so rankings are not pure noise.
    centres = rng.normal(size=(num_ids + 1, dim))
    q = centres[q_ids + 1] + rng.normal(scale=1.5, size=(num_query, dim))
    g = centres[g_ids + 1] + rng.normal(scale=1.5, size=(num_gallery, dim))
    return q, g, q_ids, g_ids, q_cams, g_cams


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_matches_brute_force_on_random_data(seed, metric, monkeypatch):
    monkeypatch.setattr(reid, "_CHUNK", 7)  # several chunks, a ragged last one
    q, g, q_ids, g_ids, q_cams, g_cams = random_problem(seed)
    dist = pairwise_distances(q, g, metric)
    cmc, mean_ap = evaluate(dist, q_ids, g_ids, q_cams, g_cams, max_rank=20)
    want_cmc, want_ap, num_valid = brute_force(dist, q_ids, g_ids, q_cams, g_cams, 20)
    result = evaluate_detailed(dist, q_ids, g_ids, q_cams, g_cams, max_rank=20)
    assert cmc.shape == (20,)
    np.testing.assert_allclose(cmc, want_cmc, atol=1e-12)
    assert mean_ap == pytest.approx(want_ap, abs=1e-12)
    assert result.num_valid == num_valid and result.num_skipped == len(q_ids) - num_valid
    # The generator makes junk queries, which can never be valid.
    assert result.num_skipped >= int((q_ids == -1).sum()) > 0
    assert np.all(np.diff(cmc) >= 0) and 0 < cmc[0] <= cmc[-1] <= 1


def test_hand_computed_case():
    # Gallery: g0 same id+cam as q0 (excluded for q0), g1 junk, g2 distractor.
    g_ids = np.array([1, -1, 0, 1, 2, 1, 2])
    g_cams = np.array([0, 1, 1, 1, 1, 2, 0])
    q_ids = np.array([1, 2, 3, 2])
    q_cams = np.array([0, 1, 0, 0])
    dist = np.array([
        # g0   g1   g2   g3   g4   g5   g6
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # q0: g2(neg) g3(hit@2) g4(neg) g5(hit@4)
        [0.3, 0.4, 0.5, 0.6, 0.05, 0.7, 0.1],  # q1: g4 same cam dropped; g6 hit@1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # q2: id 3 not in gallery -> skipped
        [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.05],  # q3: g6 same cam dropped; g0 g2 then g4 hit@3
    ])
    cmc, mean_ap = evaluate(dist, q_ids, g_ids, q_cams, g_cams, max_rank=5)
    np.testing.assert_allclose(cmc, [1 / 3, 2 / 3, 1, 1, 1])
    # APs: q0 (1/2 + 2/4) / 2 = 0.5; q1 1; q3 1/3.
    assert mean_ap == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)
    result = evaluate_detailed(dist, q_ids, g_ids, q_cams, g_cams, max_rank=5)
    np.testing.assert_allclose(result.average_precision, [0.5, 1.0, 1 / 3])
    np.testing.assert_array_equal(result.valid, [True, True, False, True])
    assert result.num_skipped == 1


def test_max_rank_beyond_gallery_size_pads_with_the_last_value():
    dist = np.array([[0.1, 0.2, 0.3]])  # the only match is last
    cmc, mean_ap = evaluate(dist, [5], [7, 8, 5], [0], [1, 1, 1], max_rank=6)
    np.testing.assert_allclose(cmc, [0, 0, 1, 1, 1, 1])
    assert mean_ap == pytest.approx(1 / 3)


def test_ties_break_by_gallery_order():
    dist = np.zeros((1, 3))
    cmc, _ = evaluate(dist, [1], [2, 1, 1], [0], [1, 1, 1], max_rank=2)
    np.testing.assert_allclose(cmc, [0, 1])


def test_no_valid_query_is_an_error():
    with pytest.raises(ValueError, match="none of the 2 queries"):
        evaluate(np.ones((2, 2)), [1, 2], [1, 2], [0, 0], [0, 0])


@pytest.mark.parametrize(
    "dist, q_ids, g_ids, q_cams, g_cams, max_rank, message",
    [
        (np.ones(3), [1], [1, 2, 3], [0], [0, 0, 0], 5, "2-D"),
        (np.ones((2, 3)), [1], [1, 2, 3], [0, 1], [0, 0, 0], 5, "query_ids has 1"),
        (np.ones((2, 3)), [1, 2], [1, 2], [0, 1], [0, 0, 0], 5, "gallery_ids has 2"),
        (np.ones((2, 3)), [1, 2], [1, 2, 3], [0], [0, 0, 0], 5, "query_cams has 1"),
        (np.ones((2, 3)), [1, 2], [1, 2, 3], [0, 1], [0, 0], 5, "gallery_cams has 2"),
        (np.ones((2, 3)), [[1, 2]], [1, 2, 3], [0, 1], [0, 0, 0], 5, "1-D"),
        (np.ones((2, 3)), [1, 2], [1, 2, 3], [0, 1], [0, 0, 0], 0, "max_rank"),
        (np.full((2, 3), np.nan), [1, 2], [1, 2, 3], [0, 1], [0, 0, 0], 5, "NaN"),
        (np.ones((0, 3)), [], [1, 2, 3], [], [0, 0, 0], 5, "empty"),
        (np.ones((1, 1)), [1.5], [1], [0], [1], 5, "integers"),
    ],
)
def test_malformed_inputs_raise(dist, q_ids, g_ids, q_cams, g_cams, max_rank, message):
    with pytest.raises(ValueError, match=message):
        evaluate(dist, q_ids, g_ids, q_cams, g_cams, max_rank=max_rank)


def test_pairwise_distances_against_definitions():
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    direct = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(pairwise_distances(q, g), direct, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pairwise_distances(q, g, "sqeuclidean"), direct**2, rtol=1e-4)
    cos = (q @ g.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(g, axis=1)[None]
    np.testing.assert_allclose(pairwise_distances(q, g, "cosine"), 1 - cos, atol=1e-5)
    # A row against itself is exactly 0, never negative (clipping).
    assert pairwise_distances(q, q).diagonal().min() >= 0
    assert pairwise_distances(q, g).dtype == np.float32
    with pytest.raises(ValueError, match="metric"):
        pairwise_distances(q, g, "manhattan")
    with pytest.raises(ValueError, match="equal widths"):
        pairwise_distances(q, g[:, :4])
