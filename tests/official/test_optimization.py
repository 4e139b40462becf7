"""Reference-style SGD and the epoch step schedule against hand-written NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from official.modeling import optimization


def test_epoch_step_decay_matches_multisteplr():
    schedule = optimization.EpochStepDecay(0.1, steps_per_epoch=10, milestones=[2, 4], gamma=0.1)
    lrs = [float(schedule(step)) for step in range(60)]
    expected = [0.1 * 0.1 ** sum(step // 10 >= m for m in (2, 4)) for step in range(60)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)
    with pytest.raises(ValueError):
        optimization.EpochStepDecay(0.1, 0, [1])
    with pytest.raises(ValueError):
        optimization.EpochStepDecay(0.1, 5, [4, 2])


@pytest.mark.parametrize("nesterov", [False, True])
def test_l2sgd_matches_pytorch_sgd_formula(nesterov):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(6)]
    mu, wd = 0.9, 1e-2
    schedule = optimization.EpochStepDecay(0.5, steps_per_epoch=2, milestones=[1, 2], gamma=0.2)
    opt = optimization.L2SGD(learning_rate=schedule, momentum=mu, l2=wd, nesterov=nesterov)
    var = tf.Variable(w0)
    # torch.optim.SGD(momentum=mu, weight_decay=wd, nesterov=...) written out by hand.
    w, buf = w0.astype(np.float64), np.zeros_like(w0, dtype=np.float64)
    for step, g in enumerate(grads):
        lr = 0.5 * 0.2 ** sum(step // 2 >= m for m in (1, 2))
        d = g + wd * w
        buf = mu * buf + d if step else d
        w = w - lr * ((d + mu * buf) if nesterov else buf)
        opt.apply_gradients([(tf.constant(g), var)])
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)


def test_l2sgd_rejects_decoupled_weight_decay():
    with pytest.raises(ValueError, match="l2"):
        optimization.L2SGD(weight_decay=1e-4)


def test_linear_warmup_then_steps():
    schedule = optimization.EpochStepDecay(0.1, steps_per_epoch=4, milestones=[3], gamma=0.1, warmup_epochs=1)
    lrs = [float(schedule(step)) for step in range(16)]
    expected = [0.1 * min(1.0, (s + 1) / 4) * (0.1 if s // 4 >= 3 else 1.0) for s in range(16)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)


def test_warmup_in_steps_spans_epochs_and_milestones():
    # 10 warm-up steps over epochs of 4 steps, a milestone at epoch 2 (step 8)
    # falls inside the ramp: the ramp and the decay multiply.
    schedule = optimization.EpochStepDecay(0.1, steps_per_epoch=4, milestones=[2], gamma=0.1, warmup_steps=10)
    steps = [0, 1, 3, 4, 7, 8, 9, 10, 11, 30]
    lrs = [float(schedule(step)) for step in steps]
    expected = [0.1 * min(1.0, (s + 1) / 10) * (0.1 if s // 4 >= 2 else 1.0) for s in steps]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[0] == pytest.approx(0.01) and lrs[7] == pytest.approx(0.01)  # step 10: ramp done, decayed


def test_warmup_steps_round_trips_and_is_exclusive():
    schedule = optimization.EpochStepDecay(0.1, steps_per_epoch=39, warmup_steps=390)
    clone = optimization.EpochStepDecay.from_config(schedule.get_config())
    assert clone.warmup_steps == 390 and clone.warmup_length == 390
    # A config written before the option existed still loads (no warm-up in steps).
    old = {k: v for k, v in schedule.get_config().items() if k != "warmup_steps"}
    assert optimization.EpochStepDecay.from_config(old).warmup_length == 0
    with pytest.raises(ValueError, match="not both"):
        optimization.EpochStepDecay(0.1, steps_per_epoch=4, warmup_epochs=1, warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        optimization.EpochStepDecay(0.1, steps_per_epoch=4, warmup_steps=-1)


def test_build_sgd_takes_warmup_steps_from_gin():
    import gin

    gin.clear_config()
    try:
        gin.parse_config("official.build_sgd.warmup_steps = 6")
        optimizer = optimization.build_sgd(steps_per_epoch=3, learning_rate=0.3)
    finally:
        gin.clear_config()
    schedule = optimizer._learning_rate
    assert isinstance(schedule, optimization.EpochStepDecay)
    np.testing.assert_allclose([float(schedule(s)) for s in range(8)],
                               [0.3 * min(1.0, (s + 1) / 6) for s in range(8)], rtol=1e-6)
