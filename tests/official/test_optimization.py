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
