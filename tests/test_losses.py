"""The DHM losses against an independent NumPy implementation of docs/method.md."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from dhm_keras import heads, losses


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_mimic_pair(teacher, student, T, eps=0.0):
    """T^2 * mean_batch sum_c p_t (log p_t - log p_s), reference smoothing optional."""
    pt = np_softmax(teacher.astype(np.float64) / T)
    ps = np_softmax(student.astype(np.float64) / T)
    if eps:
        c = pt.shape[-1]
        pt = (pt + eps) / (1 + c * eps)
        ps = (ps + eps) / (1 + c * eps)
    return T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1))


def np_ce(labels, logits):
    p = np_softmax(logits.astype(np.float64))
    return np.mean(-np.log(p[np.arange(len(labels)), labels]))


def random_logits(batch, classes=10, heads=("b0", "b1", "b2"), scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return {h: (scale * rng.standard_normal((batch, classes))).astype(np.float32) for h in heads}


@pytest.mark.parametrize(
    "T,alpha,batch", list(itertools.product([1.0, 4.0], [0.5, 1.0], [1, 7, 32]))
)
def test_mimicking_matches_numpy(T, alpha, batch):
    logits = random_logits(batch, seed=batch)
    expected_pairs = {
        f"{t}->{s}": np_mimic_pair(logits[t], logits[s], T)
        for s in logits
        for t in logits
        if s != t
    }
    total, pairs = losses.mimicking_loss(
        {k: tf.constant(v) for k, v in logits.items()}, temperature=T, alpha=alpha, return_pairs=True
    )
    assert set(pairs) == set(expected_pairs) and len(pairs) == 6
    for name, value in expected_pairs.items():
        np.testing.assert_allclose(pairs[name].numpy(), value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total.numpy(), alpha * sum(expected_pairs.values()), rtol=1e-5, atol=1e-5)


def test_reference_smoothing_matches_numpy_and_differs_for_confident_heads():
    logits = random_logits(16, classes=100, heads=("b0", "b1"), scale=6.0, seed=3)
    tf_logits = {k: tf.constant(v) for k, v in logits.items()}
    exact = losses.mimicking_loss(tf_logits).numpy()
    smoothed = losses.mimicking_loss(tf_logits, epsilon=1e-8).numpy()
    expected = np_mimic_pair(logits["b1"], logits["b0"], 1.0, 1e-8) + np_mimic_pair(
        logits["b0"], logits["b1"], 1.0, 1e-8
    )
    np.testing.assert_allclose(smoothed, expected, rtol=1e-4)
    assert smoothed < 0.97 * exact  # the smoothing under-estimates confident KLs


def test_any_number_of_heads():
    logits = random_logits(4, heads=("b0", "b1", "b2", "b3"))
    _, pairs = losses.mimicking_loss({k: tf.constant(v) for k, v in logits.items()}, return_pairs=True)
    assert len(pairs) == 12
    assert heads.ordered({"b10": 0, "b2": 0, "b0": 0}) == ["b0", "b2", "b10"]


def test_teacher_role_receives_no_gradient():
    T = 2.0
    logits = random_logits(5, heads=("b0", "b1"), seed=7)
    z0, z1 = tf.Variable(logits["b0"]), tf.Variable(logits["b1"])
    with tf.GradientTape(persistent=True) as tape:
        as_teacher = losses.kl_per_example(z1, z0, T)  # b1 teaches b0
        term = tf.reduce_mean(as_teacher)
        total = losses.mimicking_loss({"b0": z0, "b1": z1}, temperature=T)
    assert tape.gradient(term, z1) is None or np.all(tape.gradient(term, z1).numpy() == 0)
    # d/dz1 of T^2 * mean KL(p0 || p1) = T * (p1 - p0) / batch: only the student role.
    p0 = np_softmax(logits["b0"] / T)
    p1 = np_softmax(logits["b1"] / T)
    np.testing.assert_allclose(tape.gradient(total, z1).numpy(), T * (p1 - p0) / 5, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, z0).numpy(), T * (p0 - p1) / 5, atol=1e-6)


def test_modes_switch_exactly_their_terms():
    logits = random_logits(8, seed=11)
    labels = np.arange(8) % 10
    tf_logits = {k: tf.constant(v) for k, v in logits.items()}
    ce = {h: np_ce(labels, logits[h]) for h in logits}
    mimic = sum(np_mimic_pair(logits[t], logits[s], 1.0) for s in logits for t in logits if s != t)

    total, ce_terms, pairs = losses.dhm_loss(labels, tf_logits, mode="baseline")
    assert set(ce_terms) == {"b0"} and pairs == {}
    np.testing.assert_allclose(total.numpy(), ce["b0"], rtol=1e-5)

    total, ce_terms, pairs = losses.dhm_loss(labels, tf_logits, mode="dsl")
    assert set(ce_terms) == {"b0", "b1", "b2"} and pairs == {}
    np.testing.assert_allclose(total.numpy(), sum(ce.values()), rtol=1e-5)

    total, ce_terms, pairs = losses.dhm_loss(labels, tf_logits, mode="dhm", alpha=0.5)
    assert len(pairs) == 6
    np.testing.assert_allclose(total.numpy(), sum(ce.values()) + 0.5 * mimic, rtol=1e-5)

    with pytest.raises(ValueError, match="Unknown mode"):
        losses.dhm_loss(labels, tf_logits, mode="kd")


def test_inactive_heads_sit_out_of_every_pair():
    logits = random_logits(6, seed=5)
    tf_logits = {k: tf.constant(v) for k, v in logits.items()}
    _, pairs = losses.mimicking_loss(tf_logits, active={"b1": 0.0, "b2": 1.0}, return_pairs=True)
    for name, value in pairs.items():
        if "b1" in name:
            assert value.numpy() == 0.0
        else:
            np.testing.assert_allclose(
                value.numpy(), np_mimic_pair(*(logits[h] for h in name.split("->")), 1.0), rtol=1e-5
            )
    # Only the main branch left: the whole term vanishes.
    assert losses.mimicking_loss(tf_logits, active=["b0"]).numpy() == 0.0
    with pytest.raises(ValueError, match="unknown heads"):
        losses.mimicking_loss(tf_logits, active=["b7"])


def test_float32_even_for_low_precision_logits():
    logits = random_logits(4, heads=("b0", "b1"))
    half = {k: tf.constant(v, tf.bfloat16) for k, v in logits.items()}
    value = losses.mimicking_loss(half)
    assert value.dtype == tf.float32


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_the_smoothed_target_formula(smoothing):
    logits = random_logits(7, classes=5)
    labels = np.array([0, 1, 2, 3, 4, 0, 1])
    classes = 5
    total, ce, _ = losses.dhm_loss(labels, logits, mode="dsl", label_smoothing=smoothing)
    for head, z in logits.items():
        z = z.numpy().astype(np.float64) if hasattr(z, "numpy") else np.asarray(z, np.float64)
        target = np.full((7, classes), smoothing / classes)
        target[np.arange(7), labels] += 1.0 - smoothing
        log_p = np.log(np_softmax(z))
        expected = float(np.mean(-(target * log_p).sum(-1)))
        np.testing.assert_allclose(float(ce[head]), expected, rtol=1e-5)
    unsmoothed = losses.dhm_loss(labels, logits, mode="dsl")[0]
    assert float(total) != pytest.approx(float(unsmoothed))
