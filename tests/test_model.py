"""DHMModel: the training step, its metrics and Bernoulli branch sampling."""

import keras
import numpy as np
import pytest

from dhm_keras.model import BernoulliBranchSampler, DHMModel, sample_branch_mask
from official.modeling import optimization


def tiny_network(num_classes=7, heads=("b0", "b1", "b2"), seed=0):
    """A BN-free three-head network: deterministic, fast, any number of heads."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((6, 6, 3), name="images")
    trunk = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="trunk")(images)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(trunk)
    outputs = {}
    for head in heads:
        x = pooled if head == "b0" else keras.layers.Dense(5, activation="relu", name=f"{head}_fc")(pooled)
        outputs[head] = keras.layers.Dense(num_classes, name=f"{head}_classifier")(x)
    return keras.Model(images, outputs)


def batch(n=12, classes=7, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6, 6, 3)).astype("float32"), rng.integers(0, classes, n).astype("int32")


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_objective(logits, labels, mode, alpha=1.0, T=1.0, teachers=None):
    """The objective of docs/method.md written independently in NumPy (float64).

    `teachers` (default: `logits`) supply the teacher distributions, so that
    a finite difference can hold them fixed like the stop-gradient does.
    """
    teachers = logits if teachers is None else teachers
    heads = ["b0"] if mode == "baseline" else sorted(logits)
    ce = {h: -np.mean(np_log_softmax(logits[h].astype(np.float64))[np.arange(len(labels)), labels]) for h in heads}
    total = sum(ce.values())
    pairs = {}
    if mode == "dhm":
        for s in heads:
            for t in heads:
                if s != t:
                    lt, ls = np_log_softmax(teachers[t] / T), np_log_softmax(logits[s] / T)
                    pairs[f"{t}->{s}"] = T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
        total += alpha * sum(pairs.values())
    return total, ce, pairs


@pytest.mark.parametrize("mode", ["baseline", "dsl", "dhm"])
def test_step_metrics_match_numpy_objective(mode):
    network = tiny_network()
    model = DHMModel(network, mode=mode, alpha=0.5)
    model.compile(optimizer=optimization.L2SGD(0.1))
    x, y = batch()
    logits = {k: v.numpy() for k, v in network(x, training=False).items()}
    total, ce, pairs = np_objective(logits, y, mode, alpha=0.5)
    logs = model.test_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], total, rtol=1e-5)
    for head, value in ce.items():
        np.testing.assert_allclose(logs[f"ce/{head}"], value, rtol=1e-5)
    assert {k for k in logs if k.startswith("mimic/")} == {f"mimic/{p}" for p in pairs}
    for pair, value in pairs.items():
        np.testing.assert_allclose(logs[f"mimic/{pair}"], value, rtol=1e-4, atol=1e-6)
    top1 = np.mean(np.argmax(logits["b1"], -1) == y)
    np.testing.assert_allclose(logs["top1/b1"], top1)
    top5 = np.mean([label in np.argsort(-row)[:5] for row, label in zip(logits["b2"], y)])
    np.testing.assert_allclose(logs["top5/b2"], top5)


def test_evaluation_losses_are_means_over_examples_with_a_short_last_batch():
    """11 examples in batches of 8 and 3: the logged losses are the NumPy objective
    over all 11, not the average of the two batch means (which weights each of the
    3 last examples 8/3 times as much)."""
    network = tiny_network()
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=optimization.L2SGD(0.1))
    x, y = batch(n=11)
    logits = {k: v.numpy() for k, v in network(x, training=False).items()}
    total, ce, pairs = np_objective(logits, y, "dhm")
    logs = model.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(logs["ce/b1"], ce["b1"], rtol=1e-5)
    np.testing.assert_allclose(logs["mimic/b0->b2"], pairs["b0->b2"], rtol=1e-4, atol=1e-6)
    batch_means = [np_objective({k: v[s] for k, v in logits.items()}, y[s], "dhm")[0]
                   for s in (slice(0, 8), slice(8, 11))]
    assert abs(np.mean(batch_means) - total) > 1e-3  # the test can tell the two apart


def test_one_train_step_follows_the_objective_gradient():
    """One SGD step (no momentum history, no decay) moves weights by -lr * dL/dw."""
    network = tiny_network()
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=optimization.L2SGD(0.5, momentum=0.0))
    x, y = batch()
    before = [w.numpy().copy() for w in network.trainable_weights]
    # Central differences of the NumPy objective, teachers held at their current
    # predictions (the stop-gradient), for one trunk and one b1 weight entry.
    teachers = {k: v.numpy().astype(np.float64) for k, v in network(x, training=True).items()}

    def objective():
        logits = {k: v.numpy().astype(np.float64) for k, v in network(x, training=True).items()}
        return np_objective(logits, y, "dhm", teachers=teachers)[0]
    checks = {}
    for name in ("trunk/kernel", "b1_classifier/kernel"):
        w = next(v for v in network.trainable_weights if v.path == name)
        index = (0,) * (len(w.shape) - 1) + (1,)
        original = w.numpy()
        grads = []
        for eps in (1e-3, -1e-3):
            bumped = original.copy()
            bumped[index] += eps
            w.assign(bumped)
            grads.append(objective())
        w.assign(original)
        checks[name] = (index, (grads[0] - grads[1]) / 2e-3)
    model.train_on_batch(x, y)
    for w, old in zip(network.trainable_weights, before):
        if w.path in checks:
            index, grad = checks[w.path]
            np.testing.assert_allclose((old[index] - w.numpy()[index]) / 0.5, grad, rtol=2e-2, atol=1e-4)


def test_bernoulli_masks_reproducible_and_change_across_epochs():
    branches = ["b1", "b2"]
    masks = [sample_branch_mask(7, epoch, branches, 0.5) for epoch in range(40)]
    assert masks == [sample_branch_mask(7, epoch, branches, 0.5) for epoch in range(40)]
    assert len({tuple(m.values()) for m in masks}) == 4  # every combination shows up
    assert masks != [sample_branch_mask(8, epoch, branches, 0.5) for epoch in range(40)]
    rate = np.mean([m["b1"] for m in (sample_branch_mask(0, e, branches, 0.5) for e in range(2000))])
    assert abs(rate - 0.5) < 0.05
    assert all(m == {"b1": 1.0, "b2": 1.0} for m in (sample_branch_mask(1, e, branches, 1.0) for e in range(5)))


def test_sampler_masks_mimicking_and_logs_the_draw():
    network = tiny_network()
    model = DHMModel(network, mode="dhm", bernoulli_p=0.5)
    model.compile(optimizer=optimization.L2SGD(0.01))
    x, y = batch(16)
    history = model.fit(
        x, y, batch_size=8, epochs=12, verbose=0, shuffle=False, callbacks=[BernoulliBranchSampler(seed=3)]
    ).history
    for epoch in range(12):
        expected = sample_branch_mask(3, epoch, ["b1", "b2"], 0.5)
        for branch, on in expected.items():
            assert history[f"active/{branch}"][epoch] == on
            for pair in (f"b0->{branch}", f"{branch}->b0"):
                assert (history[f"mimic/{pair}"][epoch] > 0) == bool(on)
        # b1<->b2 pairs count only when both take part.
        both = expected["b1"] and expected["b2"]
        assert (history["mimic/b1->b2"][epoch] > 0) == bool(both)
        assert history["ce/b1"][epoch] > 0  # cross-entropy always counts


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Unknown mode"):
        DHMModel(tiny_network(), mode="distill")
    with pytest.raises(ValueError, match="bernoulli_p"):
        DHMModel(tiny_network(), bernoulli_p=1.5)
    images = keras.Input((6, 6, 3))
    with pytest.raises(ValueError, match="dict of logits"):
        DHMModel(keras.Model(images, keras.layers.Dense(3)(keras.layers.Flatten()(images))))


def test_any_number_of_heads_and_main_branch_submodel():
    network = tiny_network(heads=("b0", "b1", "b2", "b3"))
    model = DHMModel(network, mode="dhm")
    assert model.heads == ["b0", "b1", "b2", "b3"]
    assert len([m for m in model.metrics if m.name.startswith("mimic/")]) == 12
    x, _ = batch(3)
    main = model.main_branch()
    np.testing.assert_allclose(main(x).numpy(), network(x)["b0"].numpy(), rtol=1e-6)
    assert not any(w.path.startswith(("b1_", "b2_", "b3_")) for w in main.weights)
