"""Outliers from the known prior (evaluate.py): the chi^2 p-value of ||z||^2 needs no fitting
and keeps its false-alarm rate on N(0, I) embeddings; AUROC, the Mahalanobis baseline,
intervals, and the table over runs written with --ood."""
import json

import numpy as np
import pytest
import scipy.stats

import evaluate
import mnist_gauss
import mnist_uniform
from evaluate import auroc, binomial_interval, mahalanobis_scores, outlier_report, prior_pvalues


@pytest.mark.parametrize("d", [2, 8, 16])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.10])
def test_prior_rule_keeps_its_false_alarm_rate_on_gaussian_embeddings(d, alpha):
    z = np.random.default_rng(d).standard_normal((20000, d))
    k = int((prior_pvalues(z) < alpha).sum())
    low, high = binomial_interval(k, len(z), level=0.999)
    assert low <= alpha <= high


def test_prior_rule_is_miscalibrated_without_distribution_matching():
    z = 1.5 * np.random.default_rng(0).standard_normal((20000, 2))  # wider than N(0, I)
    assert (prior_pvalues(z) < 0.05).mean() > 0.2


def test_uniform_embeddings_go_through_the_probability_integral_transform():
    u = np.random.default_rng(1).uniform(size=(20000, 3))
    assert (prior_pvalues(u, uniform=True) < 0.05).mean() == pytest.approx(0.05, abs=0.006)
    assert (prior_pvalues(u) < 0.05).mean() < 0.01  # read as N(0, I), U[0, 1] is too narrow


def test_auroc_of_identical_and_separated_sets():
    rng = np.random.default_rng(2)
    same = [auroc(rng.standard_normal(2000), rng.standard_normal(2000)) for _ in range(20)]
    assert np.mean(same) == pytest.approx(0.5, abs=0.01)
    assert all(abs(a - 0.5) < 0.05 for a in same)
    assert auroc(rng.standard_normal(2000), 10 + rng.standard_normal(2000)) > 0.999
    assert auroc(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)  # a tie


def test_mahalanobis_equals_a_direct_computation():
    rng = np.random.default_rng(3)
    fit = rng.standard_normal((500, 3)) @ np.array([[2, 0, 0], [1, 1, 0], [0, 0.5, 3]])
    z = rng.standard_normal((4, 3))
    mean, cov = fit.mean(0), np.cov(fit.T)
    direct = [float((v - mean) @ np.linalg.inv(cov) @ (v - mean)) for v in z]
    assert mahalanobis_scores(fit, z) == pytest.approx(direct, rel=1e-8)


def test_binomial_interval_is_clopper_pearson():
    low, high = binomial_interval(5, 100, level=0.95)
    assert low == pytest.approx(scipy.stats.beta.ppf(0.025, 5, 96))
    assert high == pytest.approx(scipy.stats.beta.ppf(0.975, 6, 95))
    assert binomial_interval(0, 50)[0] == 0.0


def test_outlier_report_on_gaussian_in_and_shifted_out():
    rng = np.random.default_rng(4)
    z_train, z_test = rng.standard_normal((5000, 2)), rng.standard_normal((2000, 2))
    report = outlier_report(z_train, z_test, {"far": 4 + rng.standard_normal((2000, 2)),
                                              "same": rng.standard_normal((2000, 2))})
    at5 = report["alphas"]["0.05"]
    for rule in ("prior", "fitted"):
        low, high = at5[rule]["false_alarm_ci99"]
        assert low <= 0.05 <= high
        assert at5[rule]["detect_far"] > 0.95
        assert at5[rule]["detect_same"] == pytest.approx(0.05, abs=0.025)
    assert report["auroc"]["far"]["prior"] > 0.99
    assert report["auroc"]["same"]["fitted"] == pytest.approx(0.5, abs=0.05)


@pytest.fixture(scope="module")
def runs_with_shifts(run_script, tmp_path_factory):
    """Two seeds of a short Gaussian run and one uniform run, with shifted test sets."""
    root = tmp_path_factory.mktemp("outlier_runs")
    for seed in ("0", "1"):
        run_script(mnist_gauss, root / "gauss" / f"seed{seed}", "--steps", "2", "--sigma", "0.5",
                   "--seed", seed, "--ood", "inverted", "noise")
    run_script(mnist_uniform, root / "uniform", "--steps", "2", "--ood", "noise")
    return root


def test_outlier_tables_over_runs_of_both_mnist_scripts(runs_with_shifts, tmp_path, capsys):
    evaluate.main(["outliers", str(runs_with_shifts / "gauss"), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "| trained | 0.5 | 1.609 | 2 |" in out
    assert "| inverted |" in out and "| noise |" in out
    saved = json.loads((tmp_path / "o.json").read_text())
    rates = saved[0]["reports"][0]["alphas"]["0.05"]["prior"]
    assert 0 <= rates["false_alarm"] <= 1 and 0 <= rates["detect_noise"] <= 1
    assert (tmp_path / "o.md").read_text() == out.split("\nsaved ")[0]
    evaluate.main(["outliers", str(runs_with_shifts / "uniform")])  # its prior through Phi^-1
    assert "| trained | 0.1 |" in capsys.readouterr().out


def test_runs_without_shifted_sets_are_refused_naming_the_file(runs_with_shifts, tmp_path,
                                                                capsys):
    run = runs_with_shifts / "gauss" / "seed0"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.json").write_text((run / "metrics.json").read_text())
    with np.load(run / "embeddings.npz") as saved:  # the run as written without --ood
        np.savez(tmp_path / "plain" / "embeddings.npz", z_train=saved["z_train"],
                 z_test=saved["z_test"])
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["outliers", str(tmp_path / "plain")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "plain" / "embeddings.npz") in err
