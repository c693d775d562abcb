"""Outliers from the known prior (common.py): the chi^2 p-value of ||z||^2 needs no fitting and
keeps its false-alarm rate on N(0, I) embeddings; AUROC, the Mahalanobis baseline, intervals."""
import numpy as np
import pytest
import scipy.stats

from common import (
    auroc,
    binomial_interval,
    mahalanobis_scores,
    outlier_report,
    prior_pvalues,
)


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
    rate = (prior_pvalues(u, uniform=True) < 0.05).mean()
    assert rate == pytest.approx(0.05, abs=0.006)


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
