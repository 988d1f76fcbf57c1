"""EM with missing cells: exact observed-data likelihood, its maximum, and its E-step."""

import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy import optimize
from scipy.stats import multivariate_normal

from emdask import ConvergenceWarning, DataWarning, GaussianMixture
from emdask.families.base import normalize_log_rows
from emdask.families.gaussian import GaussianFamily

COV_TYPES = ["full", "tied", "diag", "spherical"]


def correlated(seed, n, d=3):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    cov = A @ A.T + np.eye(d)
    return rng.multivariate_normal(rng.normal(0, 2, d), cov, n)


def arbitrary_missing(X, rate, seed):
    rng = np.random.default_rng(seed)
    Xm = X.copy()
    Xm[rng.random(X.shape) < rate] = np.nan
    return Xm


def monotone_missing(X, seed):
    """Column 0 always seen; column 1 lost for 30% of rows; column 2 lost whenever 1 is, and more."""
    rng = np.random.default_rng(seed)
    Xm = X.copy()
    lost1 = rng.random(len(X)) < 0.3
    lost2 = lost1 | (rng.random(len(X)) < 0.2)
    Xm[lost1, 1] = np.nan
    Xm[lost2, 2] = np.nan
    return Xm


def cov_matrix(cov_type, cov, j, d):
    return {
        "full": lambda: cov[j],
        "tied": lambda: cov,
        "diag": lambda: np.diag(cov[j]),
        "spherical": lambda: cov[j] * np.eye(d),
    }[cov_type]()


def random_params(cov_type, k, d, seed):
    rng = np.random.default_rng(seed)
    mats = [a @ a.T + np.eye(d) for a in rng.normal(size=(k, d, d))]
    cov = {
        "full": np.stack(mats),
        "tied": mats[0],
        "diag": rng.uniform(0.5, 2, (k, d)),
        "spherical": rng.uniform(0.5, 2, k),
    }[cov_type]
    w = rng.dirichlet(np.ones(k) * 3)
    return GaussianFamily(k, cov_type).make_params(w, rng.normal(0, 2, (k, d)), cov)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_observed_part_density_and_conditional_means_match_direct_computation(cov_type):
    k, d = 3, 5
    params = random_params(cov_type, k, d, seed=1)
    family = GaussianFamily(k, cov_type)
    X = arbitrary_missing(correlated(2, 80, d), 0.35, 3)
    X[0] = np.nan  # a row with nothing observed
    log_prob = family.weighted_log_prob(X, params)
    filled = family.impute(X, params)
    for i, x in enumerate(X):
        o = ~np.isnan(x)
        ref = np.array([
            np.log(params.weights[j])
            + (multivariate_normal(params.means[j][o], cov_matrix(cov_type, params.covariances, j, d)[np.ix_(o, o)]).logpdf(x[o]) if o.any() else 0.0)
            for j in range(k)
        ])
        np.testing.assert_allclose(log_prob[i], ref, rtol=1e-11, atol=1e-11)
        resp = normalize_log_rows(ref[None])[0][0]
        expected = np.zeros(d)
        for j in range(k):
            S, mu = cov_matrix(cov_type, params.covariances, j, d), params.means[j]
            cond = mu.copy()
            if o.any():
                cond[~o] = mu[~o] + S[np.ix_(~o, o)] @ np.linalg.solve(S[np.ix_(o, o)], x[o] - mu[o])
            expected += resp[j] * cond
        np.testing.assert_allclose(filled[i, ~o], expected[~o], rtol=1e-10, atol=1e-10)
        assert np.array_equal(filled[i, o], x[o])


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_expected_statistics_match_a_direct_e_step(cov_type):
    """s1 and s2 equal sums of E[x | x_o] and E[x xᵀ | x_o] weighted by responsibilities."""
    k, d = 2, 4
    params = random_params(cov_type, k, d, seed=4)
    family = GaussianFamily(k, cov_type)
    X = arbitrary_missing(correlated(5, 60, d), 0.3, 6)
    X[7] = np.nan
    stats = family.partial_stats(X, params)
    lp = family.weighted_log_prob(X, params)
    resp = normalize_log_rows(lp)[0]
    s1 = np.zeros((k, d))
    s2 = np.zeros((k, d, d))
    for i, x in enumerate(X):
        o, m = ~np.isnan(x), np.isnan(x)
        if not o.any():
            continue  # a row with nothing observed carries no information
        for j in range(k):
            S, mu = cov_matrix(cov_type, params.covariances, j, d), params.means[j]
            ex = x.copy()
            ex[m] = mu[m] + S[np.ix_(m, o)] @ np.linalg.solve(S[np.ix_(o, o)], x[o] - mu[o])
            cc = np.zeros((d, d))
            cc[np.ix_(m, m)] = S[np.ix_(m, m)] - S[np.ix_(m, o)] @ np.linalg.solve(S[np.ix_(o, o)], S[np.ix_(o, m)])
            c = ex - mu
            s1[j] += resp[i, j] * c
            s2[j] += resp[i, j] * (np.outer(c, c) + cc)
    np.testing.assert_allclose(stats.terms["s1"], s1, rtol=1e-9, atol=1e-9)
    got = stats.terms["s2"]
    want = s2 if cov_type in ("full", "tied") else np.diagonal(s2, axis1=1, axis2=2)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert stats.loglik == pytest.approx(np.sum(np.log(np.exp(lp).sum(1))), rel=1e-12)


def _observed_loglik(theta, X, d):
    mu = theta[:d]
    L = np.zeros((d, d))
    L[np.tril_indices(d)] = theta[d:]
    L[np.diag_indices(d)] = np.exp(np.diag(L))
    S = L @ L.T
    total = 0.0
    for pattern in np.unique(~np.isnan(X), axis=0):
        rows = X[(~np.isnan(X) == pattern).all(axis=1)]
        if pattern.any():
            total += multivariate_normal(mu[pattern], S[np.ix_(pattern, pattern)]).logpdf(rows[:, pattern]).sum()
    return total


@pytest.mark.parametrize("pattern", ["monotone", "arbitrary"])
def test_single_normal_reaches_the_maximum_of_the_observed_data_likelihood(pattern):
    d = 3
    X = correlated(7, 150, d)
    Xm = monotone_missing(X, 8) if pattern == "monotone" else arbitrary_missing(X, 0.25, 8)
    gm = GaussianMixture(1, reg_covar=0.0, tol=1e-13, max_iter=5000).fit(Xm)
    # direct numerical maximization from the complete-case start
    cc = Xm[~np.isnan(Xm).any(axis=1)]
    L0 = np.linalg.cholesky(np.cov(cc.T))
    L0[np.diag_indices(d)] = np.log(np.diag(L0))
    theta0 = np.concatenate([cc.mean(0), L0[np.tril_indices(d)]])
    res = optimize.minimize(lambda t: -_observed_loglik(t, Xm, d), theta0, method="BFGS",
                            options={"gtol": 1e-9, "maxiter": 10000})
    mu = res.x[:d]
    L = np.zeros((d, d))
    L[np.tril_indices(d)] = res.x[d:]
    L[np.diag_indices(d)] = np.exp(np.diag(L))
    np.testing.assert_allclose(gm.means_[0], mu, atol=1e-4)
    np.testing.assert_allclose(gm.covariances_[0], L @ L.T, atol=1e-4)
    ours = _observed_loglik(np.concatenate([gm.means_[0], _packed(np.linalg.cholesky(gm.covariances_[0]))]), Xm, d)
    assert ours >= -res.fun - 1e-7
    assert gm.lower_bound_ * np.sum(~np.isnan(Xm).all(1)) == pytest.approx(ours, rel=1e-9)


def _packed(L):
    L = L.copy()
    L[np.diag_indices(L.shape[0])] = np.log(np.diag(L))
    return L[np.tril_indices(L.shape[0])]


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_log_likelihood_never_decreases_with_missing_cells(cov_type):
    X = arbitrary_missing(np.vstack([correlated(9, 300), correlated(10, 300) + 6]), 0.3, 11)
    gm = GaussianMixture(3, covariance_type=cov_type, max_iter=40, tol=0, random_state=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
    lb = np.array(gm.lower_bounds_)
    assert np.all(np.diff(lb) >= -1e-10 * np.abs(lb[1:]))


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_fit_with_missing_cells_is_partition_invariant(cov_type):
    X = arbitrary_missing(np.vstack([correlated(12, 400), correlated(13, 400) + 5]), 0.25, 14)
    df = pd.DataFrame(X, columns=list("abc"))
    fits = []
    for npart in [1, 3, 17]:
        for split_every in [2, 8]:
            gm = GaussianMixture(2, covariance_type=cov_type, max_iter=10, tol=0,
                                 random_state=0, split_every=split_every)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                fits.append(gm.fit(dd.from_pandas(df, npartitions=npart)))
    for gm in fits[1:]:
        np.testing.assert_allclose(gm.means_, fits[0].means_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gm.covariances_, fits[0].covariances_, rtol=1e-10, atol=1e-12)


def test_no_missing_cells_gives_the_complete_data_fit_exactly():
    X = correlated(15, 500)
    kw = dict(n_components=2, random_state=3, max_iter=20, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = GaussianMixture(**kw).fit(X)
        b = GaussianMixture(**kw).fit(pd.DataFrame(X).astype("Float64"))  # nullable dtype, no NA
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_array_equal(a.covariances_, b.covariances_)


def test_rows_with_nothing_observed_do_not_change_the_fit():
    X = arbitrary_missing(correlated(16, 400), 0.2, 17)
    blank = np.full((150, 3), np.nan)
    start = random_params("full", 2, 3, seed=20)
    kw = dict(n_components=2, max_iter=30, tol=0, weights_init=start.weights,
              means_init=start.means, precisions_init=start.precisions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = GaussianMixture(**kw).fit(X)
        b = GaussianMixture(**kw).fit(np.vstack([X[:200], blank, X[200:]]))
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-12)
    np.testing.assert_allclose(b.covariances_, a.covariances_, rtol=1e-12)
    assert b.lower_bound_ == pytest.approx(a.lower_bound_, rel=1e-12)
    # such rows are still predicted, from the mixture's weights
    np.testing.assert_allclose(b.predict_proba(blank), np.tile(b.weights_, (150, 1)), rtol=1e-12)
    np.testing.assert_allclose(b.score_samples(blank), 0.0, atol=1e-12)


def test_score_and_bic_use_the_observed_data_likelihood():
    X = arbitrary_missing(correlated(18, 300), 0.2, 19)
    gm = GaussianMixture(1, tol=1e-10, max_iter=500).fit(X)
    informative = ~np.isnan(X).all(1)
    direct = 0.0
    for x in X[informative]:
        o = ~np.isnan(x)
        direct += multivariate_normal(gm.means_[0][o], gm.covariances_[0][np.ix_(o, o)]).logpdf(x[o])
    assert gm.score(X) * informative.sum() == pytest.approx(direct, rel=1e-10)
    n_par = 3 + 6
    assert gm.bic(X) == pytest.approx(-2 * direct + n_par * np.log(informative.sum()), rel=1e-10)


def test_component_with_fewer_rows_than_parameters_warns():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (200, 6)), rng.normal(50, 1, (5, 6))])
    with pytest.warns(DataWarning, match=r"component 1 \(.*5\.0 rows for 27 parameters.*covariance_type"):
        GaussianMixture(2, random_state=0).fit(X)
