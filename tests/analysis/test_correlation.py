"""Appendix H kernel correlation: the math against an independent NumPy computation,
the branch/main pairing rule, and the CLI on a checkpoint made here."""

import json

import numpy as np
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = {"blocks_per_stage": 1, "branch_blocks": 1}
GIN = """
model.name = 'resnet32'
model.mode = 'dhm'
model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}
dataset.name = 'cifar10_jpeg'
train.seed = 0
build_sgd.learning_rate = 0.1
"""


def independent_map(main, branch):
    """Loops over kernels; statistics with explicit sums (no shared helper)."""
    kh, kw, cin, cout = main.shape

    def max_matrix(kernel):
        m = np.empty((cin, cout))
        for i in range(cin):
            for o in range(cout):
                m[i, o] = max(kernel[u, v, i, o] for u in range(kh) for v in range(kw))
        return m

    def zscore(m):
        n = m.size
        mu = sum(m.ravel()) / n
        sigma = (sum((m.ravel() - mu) ** 2) / n) ** 0.5
        return (m - mu) / sigma

    return zscore(max_matrix(main)) * zscore(max_matrix(branch))


def test_kernel_correlation_matches_independent_numpy():
    from dhm_keras.analysis.correlation import kernel_correlation, summarise

    rng = np.random.default_rng(42)
    main = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    branch = (0.6 * main + 0.4 * rng.normal(size=main.shape)).astype(np.float32)
    corr = kernel_correlation(main, branch)
    assert corr.shape == (4, 6)  # [in, out]
    np.testing.assert_allclose(corr, independent_map(main.astype(np.float64), branch.astype(np.float64)),
                               rtol=1e-10, atol=1e-12)
    # The mean of the map is the Pearson r of the two max matrices.
    r = np.corrcoef(main.max(axis=(0, 1)).ravel(), branch.max(axis=(0, 1)).ravel())[0, 1]
    assert summarise(corr)["pearson"] == pytest.approx(r, abs=1e-12)
    assert summarise(corr)["mean_abs"] == pytest.approx(np.abs(corr).mean(), abs=1e-12)


def test_kernel_correlation_exact_cases():
    from dhm_keras.analysis.correlation import kernel_correlation

    rng = np.random.default_rng(1)
    main = rng.normal(size=(3, 3, 5, 7))
    assert kernel_correlation(main, main).mean() == pytest.approx(1.0, abs=1e-12)
    # Max matrix invariant to a positive affine map of the weights: r stays 1.
    assert kernel_correlation(main, 3.0 * main - 2.0).mean() == pytest.approx(1.0, abs=1e-12)
    # Spatially constant kernels: max(-W) = -max(W), so r = -1.
    flat = np.broadcast_to(rng.normal(size=(1, 1, 5, 7)), (3, 3, 5, 7))
    assert kernel_correlation(flat, -flat).mean() == pytest.approx(-1.0, abs=1e-12)
    # A constant layer has no variation: zero map, not NaN.
    assert np.all(kernel_correlation(main, np.ones_like(main)) == 0.0)
    with pytest.raises(ValueError, match="kernel shapes differ"):
        kernel_correlation(main, main[:, :, :4])


def test_pairing_rule_on_resnet32():
    from dhm_keras import models
    from dhm_keras.analysis.correlation import conv_pairs

    network = models.build("resnet32", 10, mode="dhm", **TINY)
    pairs, skipped = conv_pairs(network)
    assert [(p["branch_layer"], p["main_layer"]) for p in pairs] == [
        ("b2_stage2_block0_conv1", "stage2_block0_conv1"),
        ("b2_stage2_block0_conv2", "stage2_block0_conv2"),
        ("b2_stage3_block0_conv1", "stage3_block0_conv1"),
        ("b2_stage3_block0_conv2", "stage3_block0_conv2"),
    ]
    # B1's conv4_x is 128 wide (Table 1), the main branch's 64: no counterpart.
    assert sorted(s["branch_layer"] for s in skipped) == [
        "b1_stage3_block0_conv1", "b1_stage3_block0_conv2",
    ]
    assert all("kernel shapes differ" in s["reason"] for s in skipped)
    only, _ = conv_pairs(network, branches=["b2"], layers=r"stage3_.*conv2$")
    assert [p["branch_layer"] for p in only] == ["b2_stage3_block0_conv2"]
    with pytest.raises(ValueError, match="no branch"):
        conv_pairs(network, branches=["b5"])


@pytest.fixture
def model_dir(tmp_path):
    """A run directory: operative_config.gin and a checkpoint of a DHMModel."""
    import gin
    import keras

    from dhm_keras import models
    from dhm_keras.model import DHMModel

    keras.utils.set_random_seed(3)
    network = models.build("resnet32", 10, mode="dhm", **TINY)
    model = DHMModel(network, mode="dhm")
    (tmp_path / "checkpoints").mkdir()
    model.save_weights(str(tmp_path / "checkpoints" / "epoch_001.weights.h5"))
    (tmp_path / "operative_config.gin").write_text(GIN)
    kernels = {layer.name: layer.kernel.numpy() for layer in network.layers
               if isinstance(layer, keras.layers.Conv2D)}
    yield tmp_path, kernels
    gin.clear_config()


def test_cli_heatmaps_and_summary_from_checkpoint(model_dir, capsys):
    from PIL import Image

    from dhm_keras.analysis import correlation

    run_dir, kernels = model_dir
    out = run_dir / "corr"
    assert correlation.main([f"--model_dir={run_dir}", f"--output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "resnet32" and summary["num_classes"] == 10
    assert summary["checkpoint"].endswith("epoch_001.weights.h5")
    assert [p["branch_layer"] for p in summary["pairs"]] == [
        "b2_stage2_block0_conv1", "b2_stage2_block0_conv2",
        "b2_stage3_block0_conv1", "b2_stage3_block0_conv2",
    ]
    for pair in summary["pairs"]:
        expected = independent_map(kernels[pair["main_layer"]].astype(np.float64),
                                   kernels[pair["branch_layer"]].astype(np.float64))
        assert pair["pearson"] == pytest.approx(expected.mean(), abs=1e-9)
        png = out / pair["heatmap"]
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert summary["mean_pearson"]["b2"] == pytest.approx(
        np.mean([p["pearson"] for p in summary["pairs"]]))
    assert len(summary["skipped"]) == 2
    assert "r = " in capsys.readouterr().out


def test_cli_with_gin_file_and_checkpoint_path(model_dir, tmp_path):
    from dhm_keras.analysis import correlation

    run_dir, _ = model_dir
    out = tmp_path / "by_gin"
    code = correlation.main([
        f"--gin_file={run_dir / 'operative_config.gin'}",
        f"--checkpoint={run_dir / 'checkpoints' / 'epoch_001.weights.h5'}",
        f"--output_dir={out}", "--no_heatmaps", "--layers=stage3",
    ])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_pairs"] == 2 and not list(out.glob("*.png"))


def test_cli_reports_missing_checkpoint(tmp_path, capsys):
    import gin

    from dhm_keras.analysis import correlation

    (tmp_path / "operative_config.gin").write_text(GIN)
    try:
        assert correlation.main([f"--model_dir={tmp_path}", f"--output_dir={tmp_path}"]) == 2
    finally:
        gin.clear_config()
    assert "no checkpoint" in capsys.readouterr().err
