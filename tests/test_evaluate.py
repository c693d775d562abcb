"""Tests of evaluate.py: Figure 1 aggregation (Section 5), curves, Table 1, embedding reports,
and bad input refused in one line naming the file or flag."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import common
import evaluate
import mnist_gauss
import mnist_uniform

REPO = Path(__file__).resolve().parents[1]
DATA = {"dataset": "mnist-test-split", "split": "seeded 8000/2000 split of the MNIST test split",
        "n_train": 8000, "n_test": 2000}
NULL = {"draws": 2, "share": 0.95, **{name: {"mean": v, "sd": 0.0, "band": [v, v], "values": [v, v]}
                                      for name, v in (("dagostino_p", 0.5), ("shapiro_p", 0.5),
                                                      ("henze_zirkler_p", 0.5),
                                                      ("sliced_w2", 0.03),
                                                      ("min_eigenvalue", 0.9))}}
DECISION = {"test": "henze-zirkler", "level": 0.05, "p": 0.3, "reject": False}


def write_run(root, name, sigma=0.5, seed=0, mi=1.0, se=0.01, knn=0.5, **changes):
    """A fake run directory whose metrics.json has the layout of mnist_gauss.py's (plain JSON:
    an infinite capacity is Infinity)."""
    capacity = math.inf if sigma == 0 else math.log1p(1 / sigma ** 2)  # eq. 5 with d = 2
    metrics = {"capacity": capacity, "mi_heldout": mi, "mi_heldout_se": se,
               "dm_gap": capacity - mi, "class_information": math.log(10),
               "normality": {"dagostino_p": 0.1 + 0.1 * seed, "shapiro_p": 0.2,
                             "henze_zirkler_p": 0.3, "henze_zirkler_stat": 2.0,
                             "sliced_w2": 0.05, "subsample": 128, "n_proj": 10, "n_boot": 20,
                             "null": NULL, "decision": DECISION, "correlation": {
                                 "smallest_eigenvalues": [0.9, 1.1], "collapsed": 0,
                                 "effective_rank": 1.99}},
               "downstream": {"gnb_acc": 0.4, "knn_acc": knn, "mlp_acc": 0.6, "silhouette": 0.0},
               "sigma": sigma, "dim": 2, "critic": "gaussian" if sigma else "separable",
               "loss": "infonce", "steps": 2000, "batch_size": 256, "seed": seed, "data": DATA,
               "device": "cpu", "wall_time_s": 1.0, "train_history": [], "curve": [],
               "diverged": [], **changes}
    out = root / name
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture
def sweep(tmp_path):
    """2 noise values x 3 seeds, a sigma = 0 baseline (2 seeds) and an untrained encoder."""
    root = tmp_path / "sweep"
    for seed, knn, mi in zip(range(3), (0.5, 0.6, 0.7), (1.4, 1.5, 1.6), strict=True):
        write_run(root, f"sigma0.5_seed{seed}", 0.5, seed, mi=mi, knn=knn)
    # C = log 2 = 0.693: seed 1 lies above C but within 3 SE, seed 2 is a planted violation
    for seed, mi in zip(range(3), (0.69, 0.70, 0.90), strict=True):
        write_run(root, f"sigma1_seed{seed}", 1.0, seed, mi=mi, knn=0.3)
    for seed, knn in ((0, 0.8), (1, 0.9)):
        write_run(root, f"sigma0_seed{seed}", 0.0, seed, mi=3.6, knn=knn)
    write_run(root, "untrained_seed0", 0.5, 0, mi=-5.0, knn=0.1, steps=0)
    return root


def read_csv(path):
    return {(row["kind"], float(row["sigma"])): row for row in csv.DictReader(open(path))}


def refused(capsys, argv, names):
    """evaluate.main(argv) ends with exit code 2 and one line on stderr naming `names`."""
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(names) in err, err


def test_ci99_is_the_student_t_interval_by_hand():
    # mean 0.3; s = sqrt(sum (x - 0.3)^2 / 4) = sqrt(0.1 / 4) = 0.158114; s / sqrt(5) = 0.0707107;
    # t_{0.995, 4} = 4.6040949 -> half-width 4.6040949 * 0.0707107 = 0.3255587 (z would give 0.182)
    mean, half = evaluate.mean_ci99([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.3)
    assert half == pytest.approx(0.3255587, abs=1e-7)
    # 3 values: t_{0.995, 2} = 9.9248432, 3.85 times z_{0.995} = 2.5758293
    assert evaluate.mean_ci99([0.5, 0.6, 0.7])[1] == pytest.approx(9.9248432 * 0.1 / math.sqrt(3))
    assert math.isnan(evaluate.mean_ci99([0.7])[1])


def test_compare_prints_welch_p_per_measure(sweep, capsys):
    # k-NN 0.5, 0.6, 0.7 against 0.8, 0.9: a - b = -0.25; SE^2 = 0.01 / 3 + 0.005 / 2, t =
    # -3.2732684; Welch-Satterthwaite df = 2.8823529; p = 2 t_sf(3.2732684, 2.8823529) = 0.0494
    a = [str(sweep / f"sigma0.5_seed{s}") for s in range(3)]
    evaluate.main(["compare", *a, "--against", str(sweep / "sigma0_seed0"),
                   str(sweep / "sigma0_seed1")])
    knn = next(line for line in capsys.readouterr().out.splitlines() if "k-NN" in line)
    # 95% interval -0.25 -+ t_{0.975, df} SE; detectable (80% power): (t_0.975 + t_0.80) SE
    se, df = math.sqrt(0.01 / 3 + 0.005 / 2), 2.8823529
    t, t80 = scipy.stats.t.ppf(0.975, df), scipy.stats.t.ppf(0.8, df)
    assert knn == (f"| k-NN accuracy | 0.600 ± 0.573 | 0.850 ± 3.183 | -0.250 | "
                   f"{-0.25 - t * se:.3f} to {-0.25 + t * se:.3f} | {0.0494163:.3f} | "
                   f"{(t + t80) * se:.3f} |")
    evaluate.main(["compare", *a, "--against", str(sweep / "sigma0_seed0")])  # one seed: no p
    knn = next(line for line in capsys.readouterr().out.splitlines() if "k-NN" in line)
    assert knn.endswith("| -0.200 | nan to nan | nan | nan |")


def test_compare_paired_tests_the_per_seed_differences(tmp_path, capsys):
    # k-NN per seed A 0.50, 0.62, 0.71 and B 0.40, 0.50, 0.64: differences 0.10, 0.12, 0.07, mean
    # 0.0966667, s = 0.0251661, SE = 0.0145297, t = 6.6530, df 2: p = 0.0218541. Welch's test
    # of the same numbers (SE 0.0924, the spread between seeds) gives p = 0.36.
    a = [write_run(tmp_path, f"a{s}", 0.5, s, knn=k) for s, k in zip((2, 0, 1), (0.71, 0.5, 0.62))]
    b = [write_run(tmp_path, f"b{s}", 0.5, s, knn=k) for s, k in enumerate((0.4, 0.5, 0.64))]
    evaluate.main(["compare", *map(str, a), "--against", *map(str, b), "--paired"])
    out = capsys.readouterr().out
    knn = next(line for line in out.splitlines() if "k-NN" in line)
    se, t, t80 = 0.0145297, scipy.stats.t.ppf(0.975, 2), scipy.stats.t.ppf(0.8, 2)
    assert "paired t test" in out and knn.endswith(
        f"| 0.097 | {0.0966667 - t * se:.3f} to {0.0966667 + t * se:.3f} | 0.022 | "
        f"{(t + t80) * se:.3f} |")
    refused(capsys, ["compare", *map(str, a), "--against", *map(str, b[:2]), "--paired"],
            "--paired needs the same seeds")


def test_cells_keep_three_decimals_and_switch_to_scientific_at_the_extremes():
    assert [evaluate.fmt(x) for x in (0.5, -2.1689, 0.0, 4.6e-7, 123456.7)] == [
        "0.500", "-2.169", "0.000", "4.6e-07", "123456.700"]
    assert evaluate.fmt(-1.51e29) == "-1.5e+29"  # a diverged NWJ estimate stays one short cell
    assert evaluate.mean_cell((-1.51e29, 3.89e29)) == "-1.5e+29 ± 3.9e+29"


def test_figure1_table_files_and_mi_check(sweep, tmp_path, capsys):
    prefix = tmp_path / "out" / "fig1"
    evaluate.main(["figure", str(sweep), "--out", str(prefix)])
    printed = capsys.readouterr().out
    for suffix in ("png", "pdf", "md", "csv"):
        assert Path(f"{prefix}.{suffix}").stat().st_size > 0
    rows = read_csv(f"{prefix}.csv")
    assert list(rows) == [("trained", 0.5), ("trained", 1.0), ("no noise", 0.0),
                          ("untrained", 0.5)]
    # knn 0.5, 0.6, 0.7: s = 0.1, half-width t_{0.995, 2} 0.1 / sqrt(3) = 0.5730111
    half = float(rows["trained", 0.5]["knn_acc_ci99"])
    assert float(rows["trained", 0.5]["knn_acc_mean"]) == pytest.approx(0.6)
    assert half == pytest.approx(0.5730111, abs=1e-7)
    # MI 0.69, 0.70, 0.90: mean 0.763333, s = 0.1184624, half-width 0.6788025
    assert float(rows["trained", 1.0]["mi_heldout_mean"]) == pytest.approx(0.7633333, abs=1e-7)
    assert float(rows["trained", 1.0]["mi_heldout_ci99"]) == pytest.approx(0.6788025, abs=1e-7)
    assert float(rows["trained", 1.0]["knn_acc_ci99"]) == 0.0
    # baselines: knn 0.8, 0.9 -> 0.85 +- t_{0.995, 1} 0.0707107 / sqrt(2) = 3.1828371; one seed
    assert float(rows["no noise", 0.0]["knn_acc_mean"]) == pytest.approx(0.85)
    assert float(rows["no noise", 0.0]["knn_acc_ci99"]) == pytest.approx(3.1828371, abs=1e-7)
    assert rows["no noise", 0.0]["capacity"] == "inf"
    assert rows["untrained", 0.5]["seeds"] == "1"
    assert math.isnan(float(rows["untrained", 0.5]["knn_acc_ci99"]))
    table = Path(f"{prefix}.md").read_text()
    assert table in printed
    assert "| trained | 0.5 | 1.609 | 3 | 0.200 ± 0.573 |" in table
    assert "0.600 ± 0.573" in table and "| untrained | 0.5 | 1.609 | 1 |" in table
    assert "| 0.100 |" in table  # one seed: no interval
    assert "bug detector" in printed and "1 of 6 estimates exceed the bound" in printed
    flagged = [line for line in printed.splitlines() if line.startswith("  ")]
    assert len(flagged) == 1 and "sigma1_seed2" in flagged[0]
    assert not Path(f"{prefix}_certificate.md").exists()  # no run has mi_estimates


def test_diverged_runs_are_counted_apart_never_averaged_in(sweep, tmp_path, capsys):
    why = ["held-out MI -0.388 +- 0.049: < -3 SE"]
    write_run(sweep, "sigma0.5_seed3", 0.5, 3, mi=-0.4, knn=0.0, diverged=why)
    for seed in range(2):  # every run of sigma = 2 diverged: no row, only its note
        write_run(sweep, f"sigma2_seed{seed}", 2.0, seed, mi=-0.5, diverged=why)
    prefix = tmp_path / "fig1"
    evaluate.main(["figure", str(sweep), "--out", str(prefix)])
    printed = capsys.readouterr().out
    rows = read_csv(f"{prefix}.csv")
    assert ("trained", 2.0) not in rows
    assert rows["trained", 0.5]["seeds"] == "3" and rows["trained", 0.5]["diverged"] == "1"
    assert float(rows["trained", 0.5]["knn_acc_mean"]) == pytest.approx(0.6)  # 0.0 left out
    assert "| trained | 0.5 | 1.609 | 3 (+1 diverged) |" in printed
    notes = [line for line in printed.splitlines() if line.startswith("diverged, left out")]
    assert len(notes) == 3 and all("< -3 SE" in line for line in notes)
    evaluate.main(["compare", str(sweep / "sigma0.5_seed0"), str(sweep / "sigma0.5_seed3"),
                   "--against", str(sweep / "sigma0_seed0")])
    printed = capsys.readouterr().out
    assert printed.startswith("A: 1 runs, B: 1 runs") and "sigma0.5_seed3" in printed
    refused(capsys, ["compare", str(sweep / "sigma2_seed0"), "--against", str(sweep)],
            sweep / "sigma2_seed0")


def test_factor_study_has_a_row_per_value_and_refuses_a_second_factor(tmp_path, capsys):
    root = tmp_path / "study"
    for aug, w2s in ((0.1, (0.04, 0.06, None)), (0.6, (0.08, 0.10, 0.5))):
        for seed, w2 in enumerate(w2s):
            if w2 is not None:  # seed 2 of --aug-sigma 0.6 diverged
                run = write_run(root, f"aug{aug}_seed{seed}", 0.3, seed, critic="separable",
                                aug_sigma=aug, non_invariance=aug / 10,
                                non_invariance_nats=aug / 2,
                                diverged=["held-out MI -1.000 +- 0.100: < -3 SE"] * (seed == 2))
                saved = json.loads((run / "metrics.json").read_text())
                saved["normality"]["sliced_w2"] = w2
                (run / "metrics.json").write_text(json.dumps(saved))
                if aug == 0.1:  # f(X) ~ N(0, 0.5 I): KL(f(X) + Z || N(0, 1.09 I)) = r - 1 - ln r
                    np.savez(run / "embeddings.npz", z_test=np.random.default_rng(seed).normal(
                        0, math.sqrt(0.5), (4000, 2)))
    prefix = tmp_path / "factor"
    evaluate.main(["factor", str(root), "--by", "aug_sigma", "--out", str(prefix)])
    text = Path(f"{prefix}.md").read_text()
    r = 0.59 / 1.09  # with d = 2: 0.155 nats; the estimate is biased low by about 0.01
    kl = float(next(line for line in text.splitlines() if "| 0.1 |" in line).split("|")[12]
                .split("±")[0])
    assert r - 1 - math.log(r) - 0.03 < kl < r - 1 - math.log(r)
    low, high = map(float, text.split("σ = 0.3, k = 2: ")[1].split()[0:3:2])
    assert -0.03 < low < high < 0.01  # the estimate on N(0, I) samples: about 0, biased low
    # W2 0.04, 0.06: half-width t_{0.995, 1} 0.0141421 / sqrt(2) = 0.6366; C = log(1 + 1/0.09)
    assert "| 2000 steps | 0.3 | 2.494 | 2 | 0.1 | 0.050 ± 0.637 |" in text
    assert "| 2000 steps | 0.3 | 2.494 | 2 (+1 diverged) | 0.6 | 0.090 ± 0.637 |" in text
    assert "| 0.060 ± 0.000 | 0.300 ± 0.000 | nan | 0.500 ± 0.000 |" in text  # no embeddings
    assert "diverged, left out" in text and "aug0.6_seed2" in text
    assert Path(f"{prefix}.png").stat().st_size > 0
    write_run(root, "concat_seed0", 0.3, 0, critic="concat", aug_sigma=0.6, non_invariance=0.1,
              non_invariance_nats=0.3)
    refused(capsys, ["factor", str(root), "--by", "aug_sigma", "--out", str(prefix)], "critic")


def estimates(nwj_whole, dv_whole=1.0, theorem41=True):
    """mi_estimates as mnist_gauss.py writes them, every value 1.0 (SE 0.1) but the Theorem 4.1
    critic's NWJ and DV on the whole test split."""
    cell = {"batch": [1.0, 0.1], "whole": [1.0, 0.1]}
    critics = {"trained": {k: cell for k in ("infonce", "nwj", "dv")}}
    if theorem41:
        critics["theorem41"] = {"infonce": cell,
                                "nwj": {"batch": [1.0, 0.1], "whole": [nwj_whole, 0.1]},
                                "dv": {"batch": [1.0, 0.1], "whole": [dv_whole, 0.1]}}
    return {"batch": 256, "n_test": 2000, **critics}


def test_certificate_is_c_minus_the_largest_valid_lower_bound(tmp_path, capsys):
    root = tmp_path / "runs"
    # C = log 5 = 1.609; the plug-in DV (biased upwards) reads 5.0 > C: neither used nor checked
    for seed, nwj_whole in enumerate((1.2, 1.4)):
        write_run(root, f"sigma0.5_seed{seed}", 0.5, seed,
                  mi_estimates=estimates(nwj_whole, dv_whole=5.0))
    write_run(root, "sigma0_seed0", 0.0, 0, mi=3.6, mi_estimates=estimates(0, theorem41=False))
    prefix = tmp_path / "fig"
    evaluate.main(["figure", str(root), "--out", str(prefix)])
    printed = capsys.readouterr().out
    assert "log 2000 = 7.601" in printed and "non-invariance" in printed
    assert "no estimate exceeds the bound (8 checked)" in printed  # 4 lower bounds x 2 runs
    assert "trained.nwj" not in Path(f"{prefix}_certificate.csv").read_text()  # can explode
    rows = read_csv(f"{prefix}_certificate.csv")
    assert list(rows) == [("trained", 0.5)]  # sigma = 0: C = inf, nothing to certify
    row = rows[("trained", 0.5)]
    assert float(row["theorem41.dv.whole_mean"]) == pytest.approx(5.0)
    assert float(row["gap_mean"]) == pytest.approx(math.log1p(4) - 1.3)  # max(1.0, NWJ) per run
    assert float(row["trained.infonce.batch_mean"]) == pytest.approx(1.0)
    assert "C − largest lower bound" in Path(f"{prefix}_certificate.md").read_text()
    # a lower bound above C + 3 SE (2.0 > 1.609 + 0.3) is flagged: the check is a bug detector
    write_run(root, "sigma0.5_seed2", 0.5, 2, mi_estimates=estimates(2.0))
    evaluate.main(["figure", str(root), "--out", str(prefix)])
    printed = capsys.readouterr().out
    assert "1 of 12 estimates exceed the bound" in printed
    assert "sigma0.5_seed2: NWJ, Thm 4.1 critic = 2.000 +- 0.100 > C = 1.609" in printed


def test_figure1_bands_are_for_means_of_as_many_null_draws_as_seeds(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def null(mean, sd):
        values = list(mean + sd * rng.standard_normal(39))
        return {"mean": mean, "sd": sd, "band": [0, 1], "values": values}
    nulls = [{"dagostino_p": null(0.5, 0.03), "shapiro_p": null(0.5, 0.025),
              "henze_zirkler_p": null(0.49, 0.07), "sliced_w2": null(0.031, 0.003),
              "min_eigenvalue": null(0.95, 0.01), "draws": 39, "share": 0.95}
             for _ in range(3)]
    for seed in range(3):
        write_run(tmp_path / "runs", f"s{seed}", 0.5, seed, normality={
            "dagostino_p": 0.3, "shapiro_p": 0.35, "henze_zirkler_p": 0.2,
            "henze_zirkler_stat": 2.0, "subsample": 128, "n_proj": 10, "n_boot": 20,
            "sliced_w2": 0.06, "null": nulls[seed], "decision": {
                "test": "henze-zirkler", "level": 0.05, "p": 1e-4, "reject": True},
            "correlation": {"smallest_eigenvalues": [0.04 + 0.01 * seed, 1.96 - 0.01 * seed],
                            "collapsed": 1 - seed // 2, "effective_rank": 1.5}})
    write_run(tmp_path / "runs", "sigma1", 1.0, normality={**json.loads(
        (tmp_path / "runs" / "s0" / "metrics.json").read_text())["normality"], "sliced_w2": 0.05,
        "correlation": {"smallest_eigenvalues": [0.7, 1.3], "collapsed": 0, "effective_rank": 2}})
    evaluate.main(["figure", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")])
    printed = capsys.readouterr().out
    assert "| 0.060 ± 0.000 |" in printed and "| 0.050 ± 0.057 |" in printed  # W2, eigenvalue
    for k in (1, 3):  # the sigma = 1 row has one seed, the sigma = 0.5 row three
        pooled = np.concatenate([n["sliced_w2"]["values"] for n in nulls])
        band = "{} to {}".format(*map(evaluate.fmt, common.null_band(pooled, k)))
        assert f"| null band, mean of {k} |" in printed and band in printed
    rows = {float(row["sigma"]): row for row in csv.DictReader(open(tmp_path / "fig.csv"))}
    assert float(rows[0.5]["sliced_w2_mean"]) == pytest.approx(0.06)
    assert float(rows[0.5]["collapsed_mean"]) == pytest.approx(2 / 3)
    assert float(rows[1.0]["sliced_w2_mean"]) == pytest.approx(0.05)
    assert float(rows[1.0]["min_eigenvalue_mean"]) == pytest.approx(0.7)
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_uniform_runs_add_kolmogorov_smirnov_columns(tmp_path, capsys):
    for seed, ks_p in ((0, 0.4), (1, 0.6)):
        write_uniform_run(tmp_path / "runs", f"eps0.1_seed{seed}", 0.1, seed, ks_p)
    write_uniform_run(tmp_path / "runs", "eps0.2_seed0", 0.2)
    evaluate.main(["figure", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")])
    rows = {float(row["eps"]): row for row in csv.DictReader(open(tmp_path / "fig.csv"))}
    assert float(rows[0.1]["capacity"]) == pytest.approx(2 * math.log(6))  # eq. 6, d = 2
    assert float(rows[0.1]["ks_p_mean_mean"]) == pytest.approx(0.5)
    assert "| trained | 0.1 | 3.584 | 2 |" in capsys.readouterr().out


def edit(run, **changes):
    """Change entries of a run's metrics.json; returns the run directory."""
    file = run / "metrics.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return run


def write_uniform_run(root, name, eps=0.1, seed=0, ks_p=0.5):
    """A fake mnist_uniform.py run: eps instead of sigma, eq. 6 capacity, KS uniformity tests."""
    out = write_run(root, name, 0.5, seed, capacity=2 * math.log1p(1 / (2 * eps)),
                    uniformity={"ks_p_mean": ks_p, "ks_stat_max": 0.1, "ks_p": [ks_p, ks_p]})
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["sigma"]
    (out / "metrics.json").write_text(json.dumps({**metrics, "eps": eps}))
    return out


def bad_set(root, case):
    """Build the run set of `case` under root; returns the path its refusal must name."""
    if case in ("missing", "no run"):
        return root / "missing" if case == "missing" else root
    a = write_run(root, "a", steps=0 if case == "none trained" else 2000)
    changes = {"non-scalar seed": {"seed": [0, 1]}, "no entry": {"downstream": {}},
               "capacity as a string": {"capacity": "inf"}}  # "inf": older versions' writer
    if case in changes:
        edit(a, **changes[case])
    elif case == "not JSON":
        (a / "metrics.json").write_text("{x")
    elif case == "two scripts":
        return write_uniform_run(root, "b", seed=1)
    elif case != "none trained":
        return write_run(root, "b", seed=0 if case == "repeated seed" else 1, **{
            "differ in dim": {"dim": 3}, "differ in steps": {"steps": 500}}.get(case, {}))
    return root if case == "none trained" else a / "metrics.json"


@pytest.mark.parametrize("case", [
    "missing", "no run", "not JSON", "non-scalar seed", "capacity as a string", "no entry",
    "none trained", "two scripts", "differ in dim", "differ in steps", "repeated seed"])
def test_bad_run_sets_are_refused_naming_a_run(tmp_path, capsys, case):
    root = tmp_path / "runs"
    root.mkdir()
    named = bad_set(root, case)
    refused(capsys, ["figure", str(named if case == "missing" else root), "--out",
                     str(tmp_path / "fig")], named)
    assert not (tmp_path / "fig.png").exists()


def test_a_refusal_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "figure",
                           str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr


def test_curve_takes_runs_of_both_mnist_scripts(run_script, tmp_path):
    gauss = run_script(mnist_gauss, tmp_path / "gauss", "--steps", "4", "--eval-at", "2",
                       "--sigma", "0.5")
    uniform = run_script(mnist_uniform, tmp_path / "uniform", "--steps", "4", "--eval-at", "2",
                         "--eps", "0.2")
    for name, metrics, symbol in (("gauss", gauss, "σ"), ("uniform", uniform, "ε")):
        evaluate.main(["curve", str(tmp_path / name), "--out", str(tmp_path / f"{name}_curve")])
        text = (tmp_path / f"{name}_curve.md").read_text()
        assert text.splitlines()[2].startswith(f"| {symbol} | step |")
        for point in metrics["curve"]:  # one seed: the values themselves; MI over the run's C
            cells = [point[k] for k in ("sliced_w2", "sliced_w2_train", "knn_acc")]
            cells.append(point["mi_heldout"] / metrics["capacity"])
            assert f"| {point['step']} | 1 | {' | '.join(map(evaluate.fmt, cells))} |" in text
        assert (tmp_path / f"{name}_curve.png").stat().st_size > 0


def test_curve_means_seeds_and_leaves_mi_over_c_out_at_sigma_0(tmp_path, capsys):
    for sigma, seed, w2 in ((0.5, 0, 0.1), (0.5, 1, 0.2), (0.0, 0, 0.1)):
        point = {"step": 10, "sliced_w2": w2, "sliced_w2_train": 0.05, "knn_acc": 0.5,
                 "mi_heldout": 1.0}
        write_run(tmp_path / "runs", f"s{sigma}_{seed}", sigma, seed, critic="separable",
                  curve=[point])
    evaluate.main(["curve", str(tmp_path / "runs"), "--out", str(tmp_path / "c")])
    text = (tmp_path / "c.md").read_text()
    # w2 0.1, 0.2: half-width t_{0.995, 1} 0.0707107 / sqrt(2) = 3.183; MI / C = 1 / log 5
    assert ("| 0.5 | 10 | 2 | 0.150 ± 3.183 | 0.050 ± 0.000 | 0.500 ± 0.000 | 0.621 ± 0.000 |"
            in text)
    assert "| 0 | 10 | 1 | 0.100 | 0.050 | 0.500 | (C = inf) |" in text
    write_run(tmp_path / "flat", "a")
    refused(capsys, ["curve", str(tmp_path / "flat")], tmp_path / "flat" / "a" / "metrics.json")


def test_curve_change_per_doubling_is_each_seeds_slope_on_log2_steps(tmp_path, capsys):
    # seed 0: W2 = 0.3 - 0.01 log2(step), seed 1: 0.5 - 0.03 log2(step) over 1000, 2000, 4000,
    # 8000: slopes -0.01, -0.03; mean -0.02, half-width t_{0.975, 1} 0.0141421 / sqrt(2)
    # = 0.1270620, one-sample t = -2, p = 0.2951672
    for seed, (a, b) in enumerate(((0.3, -0.01), (0.5, -0.03))):
        curve = [{"step": t, "sliced_w2": a + b * math.log2(t), "sliced_w2_train": 0.05,
                  "knn_acc": 0.5, "mi_heldout": 1.0} for t in (1000, 2000, 4000, 8000)]
        write_run(tmp_path / "runs", f"s{seed}", 0.5, seed, critic="separable", curve=curve)
    evaluate.main(["curve", str(tmp_path / "runs"), "--out", str(tmp_path / "c")])
    text = (tmp_path / "c.md").read_text()
    assert "| 0.5 | 1000 to 8000 | 2 | -0.0200 ± 0.1271 (p 0.295) |" in text
    evaluate.main(["curve", str(tmp_path / "runs"), "--since", "4000", "--out",
                   str(tmp_path / "c")])  # the last doubling alone: the paired change
    assert "| 0.5 | 4000 to 8000 | 2 | -0.0200 ± 0.1271 (p 0.295) |" in capsys.readouterr().out


def embeddings(tmp_path, capsys, name, flags=(), **arrays):
    """Save arrays, run the embeddings mode on them with --out, return the report it wrote."""
    file = tmp_path / name
    if name.endswith(".npy"):
        np.save(file, arrays["z"])
    else:
        np.savez(file, **arrays)
    out = tmp_path / "reports" / name
    evaluate.main(["embeddings", str(file), "--out", str(out), *flags])
    printed = capsys.readouterr().out
    assert f"saved {out}.json" in printed
    return json.loads(Path(f"{out}.json").read_text()), printed


def test_embeddings_normality_of_gaussian_and_uniform_samples(tmp_path, capsys):
    rng = np.random.default_rng(0)
    normal, printed = embeddings(tmp_path, capsys, "gauss.npy", z=rng.standard_normal((1000, 2)))
    for key in ("dagostino_p", "shapiro_p", "henze_zirkler_p"):
        assert normal["normality"][key] > 0.3
        band = normal["normality"]["null"][key]
        assert abs(normal["normality"][key] - band["mean"]) < 3 * band["sd"]
        assert "null band {:.4f} to {:.4f}".format(*band["band"]) in printed  # beside its band
    assert normal["n"] == 1000 and "downstream" not in normal
    w2 = normal["normality"]["null"]["sliced_w2"]["band"]
    w2_line = f"{normal['normality']['sliced_w2']:.4f}   null band {w2[0]:.4f} to {w2[1]:.4f}"
    assert w2_line in printed
    assert normal["normality"]["correlation"]["collapsed"] == 0 and "effective rank" in printed
    assert not normal["normality"]["decision"]["reject"] and "not rejected" in printed
    u = rng.uniform(size=(1000, 2))
    json_out = tmp_path / "new" / "folder" / "report.json"  # created on the way
    file = tmp_path / "u.npz"
    np.savez(file, z_test=u)
    evaluate.main(["embeddings", str(file), "--uniform", "--out", str(json_out)])
    pit = json.loads(json_out.read_text())
    for key in ("dagostino_p", "shapiro_p", "henze_zirkler_p"):
        assert pit["normality"][key] > 0.3
    assert pit["uniformity"]["ks_p_mean"] > 0.1 and len(pit["uniformity"]["ks_p"]) == 2
    raw, printed = embeddings(tmp_path, capsys, "u2.npz", z_test=u)
    assert raw["normality"]["henze_zirkler_p"] < 0.01
    assert raw["normality"]["decision"]["reject"] and "rejected" in printed
    assert raw["normality"]["sliced_w2"] > raw["normality"]["null"]["sliced_w2"]["band"][1]


def test_embeddings_report_a_collapsed_direction(tmp_path, capsys):
    # d = 4 with the last coordinate nearly a copy of the first: one correlation eigenvalue
    # near 0 (below common.COLLAPSED), the others near 1, effective rank about 3
    z = np.random.default_rng(3).standard_normal((1000, 4))
    z[:, 3] = z[:, 0] + 0.05 * z[:, 3]
    report, printed = embeddings(tmp_path, capsys, "flat.npy", z=z)
    spectrum = report["normality"]["correlation"]
    assert spectrum["collapsed"] == 1 and spectrum["smallest_eigenvalues"][0] < 0.01
    assert 0.8 < spectrum["smallest_eigenvalues"][1] < spectrum["smallest_eigenvalues"][3] < 2.2
    assert 2.5 < spectrum["effective_rank"] < 3.2
    assert "1 below 0.05 (collapsed directions)" in printed


def test_embeddings_with_labels_give_downstream_scores(tmp_path, capsys):
    rng = np.random.default_rng(1)
    y_tr, y_te = rng.integers(0, 3, 300), rng.integers(0, 3, 200)
    centers = 5.0 * np.eye(3)[:, :2]  # three well separated clusters in the plane

    def points(y):
        return centers[y] + rng.standard_normal((len(y), 2)) * 0.5
    z_tr, z_te = points(y_tr), points(y_te)
    report, _ = embeddings(tmp_path, capsys, "e.npz", z_train=z_tr, y_train=y_tr, z_test=z_te,
                           y_test=y_te)
    for key in ("gnb_acc", "knn_acc", "mlp_acc"):
        assert report["downstream"][key] > 0.9
    assert report["downstream"]["silhouette"] > 0.5
    # whole numbers saved as floats are the same classes
    again, _ = embeddings(tmp_path, capsys, "f.npz", z_train=z_tr, y_train=y_tr.astype(float),
                          z_test=z_te, y_test=y_te.astype(float))
    assert again["downstream"] == report["downstream"]


def test_the_embeddings_are_the_one_2d_array_or_the_named_one(tmp_path, capsys):
    z = np.random.default_rng(2).standard_normal((500, 2))
    np.savez(tmp_path / "other.npz", embeddings=z, labels=np.arange(500) % 3)
    evaluate.main(["embeddings", str(tmp_path / "other.npz")])
    assert "(embeddings): n = 500, d = 2" in capsys.readouterr().out
    np.savez(tmp_path / "two.npz", first=z, second=z[:, :1] * 0 + z[:, 1:])
    evaluate.main(["embeddings", str(tmp_path / "two.npz"), "--key", "first"])
    assert "(first): n = 500, d = 2" in capsys.readouterr().out


def run_file(tmp_path, y_train=None, z_train=None):
    """A run's embeddings.npz (z_train, y_train, z_test, y_test) of 50 + 50 random points."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "run.npz", z_test=rng.standard_normal((50, 2)), y_test=np.arange(50) % 2,
             z_train=rng.standard_normal((50, 2)) if z_train is None else z_train,
             y_train=np.arange(50) % 2 if y_train is None else y_train)


@pytest.mark.parametrize("name,save,flags", [
    ("z.npy", lambda f: f.write_text("not an array"), ()),
    ("z.npy", lambda f: np.save(f, np.linspace(1, 3, 40).reshape(20, 2)), ("--uniform",)),
    ("z.npz", lambda f: np.savez(f, a=np.ones((20, 2)), b=np.ones((20, 2))), ()),
    ("z.npz", lambda f: np.savez(f, a=np.ones((20, 2))), ("--key", "c")),
    ("z.npy", lambda f: np.save(f, np.column_stack([np.arange(20.0), np.full(20, 3.0)])), ()),
    ("z.npy", lambda f: np.save(f, np.full((20, 2), np.nan)), ()),
    ("z.npy", lambda f: np.save(f, np.ones((20, 2)) * (1 + 1j)), ()),
    ("z.npy", lambda f: np.save(f, np.ones((5, 2)).cumsum(0)), ()),
    ("z.npy", lambda f: np.save(f, np.random.default_rng(0).standard_normal((50, 2)) * 1e-300),
     ()),
    ("z.npy", lambda f: np.save(f, np.random.default_rng(0).standard_normal((50, 2)) * 1e200),
     ()),
    ("run.npz", lambda f: run_file(f.parent, y_train=np.zeros(50, dtype=int)), ()),
    ("run.npz", lambda f: run_file(f.parent, y_train=np.arange(40) % 2), ()),
    ("run.npz", lambda f: run_file(f.parent, y_train=np.linspace(0, 1, 50)), ()),
    ("run.npz", lambda f: run_file(f.parent, z_train=np.ones((50, 3)).cumsum(0)), ()),
    ("missing.npy", lambda f: None, ()),
    ("folder.npy", lambda f: f.mkdir(), ()),
], ids=["unreadable", "not in [0, 1]", "two arrays", "no such key", "constant column", "NaN",
        "complex", "too few", "tiny scale", "huge scale", "one class", "label count",
        "fractional labels", "column count", "missing", "a folder"])
def test_bad_embeddings_are_refused_naming_the_file(tmp_path, capsys, name, save, flags):
    save(tmp_path / name)
    refused(capsys, ["embeddings", str(tmp_path / name), *flags], tmp_path / name)


def test_an_existing_report_is_never_overwritten(tmp_path, capsys):
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((50, 2)))
    (tmp_path / "r.json").write_text("kept")
    refused(capsys, ["embeddings", str(tmp_path / "z.npy"), "--out", str(tmp_path / "r")],
            tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == "kept"


@pytest.mark.parametrize("argv,flag", [
    (["embeddings", "e.npy", "--subsample", "3"], "--subsample"),
    (["embeddings", "e.npy", "--seed", "-1"], "--seed"),
    (["figure", "run", "--uniform"], "--uniform"),
    (["run", "--out", "fig"], "MODE"),
])
def test_bad_flags_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# evaluate.py: Table 1 and the sigma sweep of cifar_ssl.py runs
# --------------------------------------------------------------------------------------------

def fake_ssl_run(root, name, method="simclr", sigma=0.0, dataset="cifar10", seed=0, top1=0.9,
                 steps=1000, hz=0.5):
    """A fake cifar_ssl.py run directory; sigma 0 is the original method (no head)."""
    metrics = {"method": method, "sigma": sigma, "head": "none" if sigma == 0 else "bn",
               "dataset": dataset, "arch": "resnet18",
               "dim": 256, "capacity": math.inf if sigma == 0 else 128 * math.log1p(sigma ** -2),
               "steps": steps, "epochs": 5.0, "batch_size": 256, "seed": seed,
               "probe": {"top1": top1, "top5": 0.99, "train_top1": 0.95},
               "online_probe": {"test_top1": top1 - 0.05},
               "normality": {"dagostino_p": 0.2 + sigma, "shapiro_p": 0.1,
                             "henze_zirkler_p": hz, "sliced_w2": 0.1, "subsample": 128,
                             "null": NULL, "correlation": {"smallest_eigenvalues": [0.01],
                                                           "collapsed": 3}},
               "probe_images": {"train": 50000, "test": 10000},
               "data": {"dataset": dataset, "n_train": 50000}}
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def test_table1_next_to_the_paper(tmp_path, capsys):
    fake_ssl_run(tmp_path, "a", "simclr", 0.3, top1=0.80)
    fake_ssl_run(tmp_path, "b", "simclr", 0.3, top1=0.90, seed=1)
    fake_ssl_run(tmp_path, "c", "vicreg", 0.0, "cifar100", top1=0.5)
    fake_ssl_run(tmp_path, "d", "vicreg", 0.0, "cifar100", top1=0.2, steps=0)
    fake_ssl_run(tmp_path, "e", "simclr", 0.1, "fashion-mnist", top1=0.7)
    evaluate.main(["table", str(tmp_path), "--out", str(tmp_path / "t1")])
    text = capsys.readouterr().out
    assert (tmp_path / "t1.md").read_text() in text
    row = next(line for line in text.splitlines() if line.startswith("| SimCLR σ = 0.3 |"))
    # mean 85 % +- t_{0.995, 1} 7.0711 / sqrt(2) = 63.657 * 5 = 318.28 %; paper 91.56 / 99.77
    assert "85.00 ± 318.28 (91.56)" in row and "99.00 ± 0.00 (99.77)" in row
    assert "– (65.72)" in row
    row = next(line for line in text.splitlines() if line.startswith("| VICReg |"))
    assert "– (90.63)" in row and "50.00 (65.71)" in row
    assert len([line for line in text.splitlines() if line.startswith("| SimCLR")]) == 4
    assert text.splitlines()[2].endswith("fashion-mnist top-1 | fashion-mnist top-5 |")
    row = next(line for line in text.splitlines() if line.startswith("| SimCLR σ = 0.1 |"))
    assert row.endswith("| 70.00 | 99.00 |")
    row = next(line for line in text.splitlines() if line.startswith("| random-init encoder |"))
    assert "20.00" in row and "(" not in row


def test_table1_keeps_sigma0_with_the_head_apart_from_the_original_method(tmp_path, capsys):
    fake_ssl_run(tmp_path, "original", "simclr", 0.0, top1=0.80)
    fake_ssl_run(tmp_path, "bn", "simclr", 0.0, top1=0.70)
    file = tmp_path / "bn" / "metrics.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "head": "bn"}))
    evaluate.main(["table", str(tmp_path), "--out", str(tmp_path / "t1")])
    lines = capsys.readouterr().out.splitlines()
    original = lines.index(next(line for line in lines if line.startswith("| SimCLR |")))
    assert "80.00 (90.83)" in lines[original]
    assert lines[original + 1].startswith("| SimCLR, BatchNorm head, no noise | 70.00 |")
    assert "(" not in lines[original + 1]


@pytest.mark.parametrize("case", ["repeated seed", "differ in steps", "mnist_gauss.py run"])
def test_table1_refuses_runs_that_are_not_seeds_of_one_cell(tmp_path, capsys, case):
    if case == "mnist_gauss.py run":  # its metrics.json has no method
        named = write_run(tmp_path, "b")
    else:
        fake_ssl_run(tmp_path, "a")
        fake_ssl_run(tmp_path, "b", seed=0 if case == "repeated seed" else 1,
                     steps=5 if case == "differ in steps" else 1000)
        named = tmp_path / "b"
    refused(capsys, ["table", str(tmp_path), "--out", str(tmp_path / "t")], named)
    assert not (tmp_path / "t.md").exists()


def test_sigma_sweep_panel_of_cifar_runs(tmp_path, capsys):
    for sigma in (0.1, 0.3):
        for seed in (0, 1):
            fake_ssl_run(tmp_path, f"s{sigma}_{seed}", sigma=sigma, seed=seed,
                         top1=0.8 + 0.1 * seed, hz=None)
    fake_ssl_run(tmp_path, "s0", sigma=0.0)
    fake_ssl_run(tmp_path, "untrained", sigma=0.1, steps=0, top1=0.3)
    evaluate.main(["figure", str(tmp_path), "--out", str(tmp_path / "fig")])
    text = capsys.readouterr().out
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert "linear probe top-1" in text and "projector output" in text
    assert "record no MI estimate" in text
    assert "| trained | 0.3 |" in text and "| untrained | 0.1 |" in text
    rows = {(row["kind"], float(row["sigma"])): row
            for row in csv.DictReader(open(tmp_path / "fig.csv"))}
    assert float(rows["trained", 0.3]["top1_mean"]) == pytest.approx(0.85)
    assert math.isnan(float(rows["trained", 0.3]["henze_zirkler_p_mean"]))


def fake_imagenet_run(root, name, sigma, seed, top1, classes=100, steps=1000):
    fake_ssl_run(root, name, "vicreg", sigma, "folder", seed, top1, steps)
    file = root / name / "metrics.json"
    metrics = json.loads(file.read_text())
    metrics["data"].update(n_classes=classes, image_size=224)
    file.write_text(json.dumps(metrics))


def test_table2_mean_and_std_over_seeds_next_to_the_poster(tmp_path, capsys):
    for seed, top1 in enumerate((0.70, 0.72, 0.74)):
        fake_imagenet_run(tmp_path, f"in100_s0.1_{seed}", 0.1, seed, top1)
    fake_imagenet_run(tmp_path, "in1k_s0", 0.0, 0, 0.6, classes=1000)
    fake_imagenet_run(tmp_path, "in1k_untrained", 0.0, 0, 0.05, classes=1000, steps=0)
    evaluate.main(["table", str(tmp_path), "--out", str(tmp_path / "t")])
    text = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() in text
    assert "Table 1" not in text and "Table 2" in text
    lines = text.splitlines()
    assert lines[2] == ("| σ | ImageNet-100 top-1 | ImageNet-100 top-5 | ImageNet-1k top-1 | "
                        "ImageNet-1k top-5 |")
    row = next(line for line in lines if line.startswith("| 0.1 |"))
    # mean 72 %, sample std 2 %; poster 72.07 +- 0.27
    assert "| 72.00 ± 2.00 (72.07 ± 0.27) | 99.00 ± 0.00 (91.65 ± 0.13) |" in row
    assert row.endswith("| – (67.30 ± 0.13) | – (87.43 ± 0.02) |")
    row = next(line for line in lines if line.startswith("| 0 |"))
    assert "| 60.00 (67.41 ± 0.17) |" in row
    assert next(line for line in lines if line.startswith("| 0.05 |")).count("–") == 4
    row = next(line for line in lines if line.startswith("| random-init encoder |"))
    assert "5.00" in row and "(" not in row
    fake_ssl_run(tmp_path, "cifar", "simclr", 0.3)
    evaluate.main(["table", str(tmp_path), "--out", str(tmp_path / "t")])
    text = capsys.readouterr().out
    assert "Table 1" in text and "Table 2" in text
    assert "ImageNet" not in text.split("Table 2")[0]
