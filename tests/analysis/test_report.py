"""The results report: mean/std against hand-computed values, grouping, Markdown shape."""

import json
import math

import pytest


def config(model="wrn_28_10", mode="dhm", noise=0.2, seed=0, overrides=None, bernoulli_p=None,
           dataset="cifar100"):
    return {
        "dataset": {"name": dataset, "label_noise": noise, "label_noise_seed": None,
                    "data_dir": f"/data/{seed}", "cache": True},
        "model": {"name": model, "mode": mode, "overrides": overrides},
        "mimicking": {"alpha": 1.0, "temperature": 1.0, "epsilon": 0.0, "bernoulli_p": bernoulli_p},
        "train": {"epochs": 10, "batch_size": 128, "seed": seed, "verbose": 2, "eval_every": 1},
    }


def write_run(path, cfg, best, last, completed=True, split="eval", gin_text=None):
    path.mkdir(parents=True)
    results = {
        "config": cfg, "epochs": 10, "epochs_completed": 10 if completed else 4,
        "completed": completed, "split": split,
        "best": {"epoch": 7, "top1/b0": best[0], "top5/b0": best[1]},
        "last": {"epoch": 10, "top1/b0": last[0], "top5/b0": last[1]},
        "history": [],
    }
    (path / "results.json").write_text(json.dumps(results))
    if gin_text is not None:
        (path / "operative_config.gin").write_text(gin_text)
    return path


GIN = "build_sgd.learning_rate = {lr}\nget_strategy.name = '{strategy}'\ntrain.seed = 0\n"


@pytest.fixture
def runs(tmp_path):
    # Three seeds of one configuration: top-1 accuracies 0.70 / 0.72 / 0.74 -> errors
    # 30 / 28 / 26 %: mean 28, sample std 2. Top-5 0.90 / 0.91 / 0.95 -> errors
    # 10 / 9 / 5: mean 8, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7).
    best = [(0.70, 0.90), (0.72, 0.91), (0.74, 0.95)]
    last = [(0.69, 0.90), (0.69, 0.90), (0.72, 0.93)]
    for seed in range(3):
        # Different strategies / data_dirs are execution details: same row.
        write_run(tmp_path / "grid" / f"dhm_s{seed}", config(seed=seed), best[seed], last[seed],
                  gin_text=GIN.format(lr=0.1, strategy=["default", "mirrored", "default"][seed]))
    # Same config but another learning rate (only in operative_config.gin): its own row.
    write_run(tmp_path / "grid" / "dhm_lr", config(seed=0), (0.60, 0.80), (0.60, 0.80),
              gin_text=GIN.format(lr=0.05, strategy="default"))
    # One seed of the baseline, unfinished and not yet evaluated.
    write_run(tmp_path / "base_s0", config(mode="baseline"), (0.5, 0.75), (0.5, 0.75),
              completed=False, split="train", gin_text=GIN.format(lr=0.1, strategy="default"))
    return tmp_path


def test_mean_std_hand_values():
    from dhm_keras.analysis.report import error_percent, mean_std

    assert mean_std([30.0, 28.0, 26.0]) == (pytest.approx(28.0), pytest.approx(2.0))
    assert mean_std([10.0, 9.0, 5.0]) == (pytest.approx(8.0), pytest.approx(math.sqrt(7.0)))
    assert mean_std([1.5]) == (1.5, None)
    assert error_percent(0.72) == pytest.approx(28.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_grouping_and_statistics(runs):
    from dhm_keras.analysis.report import discover, group_runs, group_statistics, load_run

    loaded = [load_run(p) for p in discover([str(runs / "grid"), str(runs / "base_s0")])]
    assert len(loaded) == 5
    groups = group_runs(loaded)
    assert sorted(len(g) for g in groups) == [1, 1, 3]
    three = next(g for g in groups if len(g) == 3)
    assert [r.seed for r in three] == [0, 1, 2]
    stats = group_statistics(three)
    assert stats["best"]["top1"] == (pytest.approx(28.0), pytest.approx(2.0))
    assert stats["best"]["top5"] == (pytest.approx(8.0), pytest.approx(math.sqrt(7.0)))
    # last: 31 / 31 / 28 -> mean 30, sample std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    assert stats["last"]["top1"] == (pytest.approx(30.0), pytest.approx(math.sqrt(3.0)))


def test_references_from_docs_method_md():
    from dhm_keras.analysis.report import find_reference

    ref = find_reference(config(seed=4))
    assert ref.top1 == (pytest.approx(25.472), 0.433) and ref.source == "App. E"
    assert find_reference(config(mode="baseline", noise=0.5)).top1 == (pytest.approx(38.732), 0.311)
    assert find_reference(config(noise=0.0)) is None  # plain WRN-28-10: not in docs/method.md
    assert find_reference(config(noise=0.0, overrides={"dropout": 0.3})).top1 == (16.790, 0.110)
    assert find_reference(config("resnet32", noise=0.0, bernoulli_p=0.5)).top1 == (27.002, 0.316)
    assert find_reference(config("resnet32", noise=0.0)) is None
    assert find_reference(config("resnet152", "dsl", 0.0, dataset="imagenet2012")).top5 == (5.824, None)
    # ResNet-18 with the optional B3 is not the released model.
    b3 = config("resnet18", "dhm", 0.0, dataset="imagenet2012", overrides={"branches": ["b1", "b2", "b3"]})
    assert find_reference(b3) is None


def test_markdown_table(runs, tmp_path, capsys):
    from dhm_keras.analysis import report

    output = tmp_path / "report.md"
    assert report.main([str(runs / "grid"), str(runs / "base_s0"), str(runs / "grid" / "dhm_s0"),
                        f"--output={output}"]) == 0
    text = output.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 3  # header, separator, three configurations (dhm_s0 counted once)
    assert all(row.count("|") == 10 for row in rows)  # nine columns
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows[2:]}
    main = cells["cifar100 / wrn_28_10 / dhm, noise=0.2 (build_sgd.learning_rate=0.1)"]
    assert main == ["3", "10/10", "28.00 ± 2.00", "8.00 ± 2.65", "30.00 ± 1.73", "9.00 ± 1.73",
                    "25.472 ± 0.433 (App. E)", "-"]
    lr = cells["cifar100 / wrn_28_10 / dhm, noise=0.2 (build_sgd.learning_rate=0.05)"]
    assert lr[:3] == ["1", "10/10", "40.00 ± -"]
    base = cells["cifar100 / wrn_28_10 / baseline, noise=0.2 (build_sgd.learning_rate=0.1)"]
    assert base[:3] == ["1", "4/10", "50.00 ± - †"]
    assert base[6] == "28.878 ± 0.269 (App. E)"
    assert "sample standard deviation" in text and "TRAINING accuracy" in text


def test_missing_results(tmp_path, capsys):
    from dhm_keras.analysis import report

    assert report.main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
