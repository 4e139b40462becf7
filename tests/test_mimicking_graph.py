"""The mimicking graph: each preset switches exactly its terms, explicit edges carry
weights, and the model logs exactly the terms it trains (NumPy reference)."""

import gin
import numpy as np
import pytest
import tensorflow as tf

from dhm_keras import losses, mimicking_graph
from dhm_keras.model import DHMModel
from official.modeling import optimization
from test_model import batch, np_log_softmax, tiny_network

HEADS = ("b0", "b1", "b2", "b3")

# Written out by hand from each preset's definition (b0 deepest, b3 shallowest).
EXPECTED = {
    "all_pairs": {f"{t}->{s}" for t in HEADS for s in HEADS if t != s},
    "main_teaches": {"b0->b1", "b0->b2", "b0->b3"},
    "deep_teaches_shallow": {"b0->b1", "b0->b2", "b0->b3", "b1->b2", "b1->b3", "b2->b3"},
    "shallow_teaches_deep": {"b1->b0", "b2->b0", "b3->b0", "b2->b1", "b3->b1", "b3->b2"},
}


def np_pair(teacher, student, T):
    lt, ls = np_log_softmax(teacher.astype(np.float64) / T), np_log_softmax(student.astype(np.float64) / T)
    return T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))


def random_logits(seed=0, batch_size=9, classes=6):
    rng = np.random.default_rng(seed)
    return {h: (3 * rng.standard_normal((batch_size, classes))).astype(np.float32) for h in HEADS}


@pytest.mark.parametrize("preset", mimicking_graph.PRESETS)
def test_each_preset_has_exactly_its_pairs_with_numpy_values(preset):
    logits = random_logits()
    total, pairs = losses.mimicking_loss(
        {h: tf.constant(z) for h, z in logits.items()}, temperature=2.0, alpha=0.5,
        return_pairs=True, graph=preset,
    )
    assert set(pairs) == EXPECTED[preset]
    expected = {}
    for name in EXPECTED[preset]:
        teacher, student = name.split("->")
        expected[name] = np_pair(logits[teacher], logits[student], 2.0)
        np.testing.assert_allclose(pairs[name].numpy(), expected[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total.numpy(), 0.5 * sum(expected.values()), rtol=1e-5)


def test_presets_adapt_to_two_heads():
    assert [e.name for e in mimicking_graph.resolve("deep_teaches_shallow", ["b1", "b0"])] == ["b0->b1"]
    assert [e.name for e in mimicking_graph.resolve("shallow_teaches_deep", ["b0", "b1"])] == ["b1->b0"]
    assert mimicking_graph.resolve("main_teaches", ["b0"]) == ()


def test_explicit_edges_with_weights():
    logits = random_logits(seed=3)
    graph = [("b0", "b2", 0.25), "b3->b1", ["b1", "b0"]]
    total, pairs = losses.mimicking_loss(
        {h: tf.constant(z) for h, z in logits.items()}, return_pairs=True, graph=graph
    )
    expected = {
        "b0->b2": 0.25 * np_pair(logits["b0"], logits["b2"], 1.0),
        "b3->b1": np_pair(logits["b3"], logits["b1"], 1.0),
        "b1->b0": np_pair(logits["b1"], logits["b0"], 1.0),
    }
    assert set(pairs) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(pairs[name].numpy(), value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total.numpy(), sum(expected.values()), rtol=1e-5)
    assert mimicking_graph.as_data(graph) == [["b0", "b2", 0.25], ["b3", "b1", 1.0], ["b1", "b0", 1.0]]


@pytest.mark.parametrize(
    "graph,message",
    [
        ("everyone", "unknown mimicking.graph"),
        ([("b0", "b7")], "heads \\['b7'\\]"),
        ([("b1", "b1")], "cannot mimic itself"),
        (["b0->b1", ("b0", "b1", 2.0)], "listed twice"),
        ([("b0", "b1", -1.0)], "weight must be a number >= 0"),
        (["b0-b1"], "must read"),
    ],
)
def test_bad_graphs_are_refused(graph, message):
    with pytest.raises(ValueError, match=message):
        mimicking_graph.resolve(graph, HEADS)


@pytest.mark.parametrize("graph", ["main_teaches", [("b2", "b0", 0.5), ("b1", "b2")]])
def test_model_trains_and_logs_only_the_graph_terms(graph):
    network = tiny_network(heads=("b0", "b1", "b2"))
    model = DHMModel(network, mode="dhm", alpha=0.5, graph=graph)
    model.compile(optimizer=optimization.L2SGD(0.1))
    x, y = batch()
    logits = {k: v.numpy() for k, v in network(x, training=False).items()}
    edges = mimicking_graph.resolve(graph, logits)
    expected_pairs = {e.name: e.weight * np_pair(logits[e.teacher], logits[e.student], 1.0) for e in edges}
    ce = sum(-np.mean(np_log_softmax(z.astype(np.float64))[np.arange(len(y)), y]) for z in logits.values())
    logs = model.test_on_batch(x, y, return_dict=True)
    assert {k for k in logs if k.startswith("mimic/")} == {f"mimic/{p}" for p in expected_pairs}
    for name, value in expected_pairs.items():
        np.testing.assert_allclose(logs[f"mimic/{name}"], value, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logs["loss"], ce + 0.5 * sum(expected_pairs.values()), rtol=1e-5)


def test_dsl_and_baseline_have_no_mimicking_terms_whatever_the_graph():
    for mode in ("dsl", "baseline"):
        model = DHMModel(tiny_network(), mode=mode, graph="main_teaches")
        assert model.mimicking_edges == ()
        assert not [m for m in model.metrics if m.name.startswith("mimic/")]


def test_gin_binding_reaches_the_recorded_config():
    from dhm_keras import experiment

    gin.clear_config()
    try:
        gin.parse_config("mimicking.graph = [('b0', 'b1', 0.5), ('b0', 'b2')]")
        config = experiment.from_gin().to_json()
        assert config["mimicking"]["graph"] == [["b0", "b1", 0.5], ["b0", "b2", 1.0]]  # normalised
        gin.clear_config()
        assert experiment.from_gin().to_json()["mimicking"]["graph"] == "all_pairs"
    finally:
        gin.clear_config()


def test_specs_number_branches_from_the_deepest_fork():
    """The depth presets rely on it; every registered spec obeys, a spec that breaks it is refused."""
    from dhm_keras.models import specs

    for name in specs.available_models():
        specs.get_spec(name)  # validated on construction
    stage = specs.Stage("stage3", 8, 1, 2)
    with pytest.raises(ValueError, match="b2 forks at stage2, deeper than b1 at stage1"):
        specs.ArchSpec(
            name="toy", block="basic", stem="cifar", stem_filters=8,
            stages=(specs.Stage("stage1", 8, 1), specs.Stage("stage2", 8, 1, 2), stage),
            branches=(specs.Branch("b1", "stage1", (stage,)), specs.Branch("b2", "stage2", (stage,))),
        )
