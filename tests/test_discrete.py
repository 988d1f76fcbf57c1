"""Discrete and mixed-type mixtures against independent references.

References: E-steps and M-steps written out row by row with scipy.stats densities, direct
maximization of the observed-data likelihood with scipy.optimize, scikit-learn's
GaussianMixture for the Gaussian columns of a mixed table.
"""

from __future__ import annotations

import itertools
import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats
from scipy.special import expit, gammaln, logsumexp, softmax

from emdask import (
    BernoulliMixture,
    BinomialMixture,
    CategoricalMixture,
    DataWarning,
    MixedMixture,
    PoissonMixture,
)
from emdask.families.discrete import (
    BernoulliFamily,
    BinomialFamily,
    CategoricalFamily,
    PoissonFamily,
)
from emdask.families.mixed import MixedFamily

pytestmark = pytest.mark.filterwarnings("ignore::emdask.ConvergenceWarning")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def binary_data(n=400, seed=0, missing=0.1):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.4
    p = np.where(z[:, None], [0.85, 0.8, 0.2, 0.7], [0.15, 0.3, 0.75, 0.2])
    X = (rng.random((n, 4)) < p).astype(float)
    X[rng.random(X.shape) < missing] = np.nan
    return X


def survey_frame(n=600, seed=0, missing=0.1):
    """Three categorical answers (category, str, small int) from two latent classes."""
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.45
    def pick(levels, p0, p1):
        u = rng.random(n)
        c0, c1 = np.cumsum(p0), np.cumsum(p1)
        idx = np.where(z, (u[:, None] > c1).sum(1), (u[:, None] > c0).sum(1))
        return np.asarray(levels, dtype=object)[idx]
    df = pd.DataFrame(
        {
            "q1": pd.Categorical(pick(["no", "maybe", "yes"], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7]),
                                 categories=["no", "maybe", "yes"]),
            "q2": pick(["a", "b"], [0.8, 0.2], [0.25, 0.75]).astype(str),
            "q3": pick([1, 2, 3, 4], [0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]).astype(np.int64),
        }
    )
    mask = rng.random((n, 3)) < missing
    df["q1"] = df["q1"].mask(mask[:, 0])
    df["q2"] = df["q2"].mask(mask[:, 1])
    df["q3"] = df["q3"].astype("Int64").mask(mask[:, 2])
    return df


def customer_frame(n=800, seed=0, missing=0.08):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.5
    df = pd.DataFrame(
        {
            "spend": rng.normal(np.where(z, 3.0, 0.0), 1.0),
            "tenure": rng.normal(np.where(z, 1.0, -1.0), 0.7),
            "orders": rng.poisson(np.where(z, 5.0, 1.0)),
            "member": rng.random(n) < np.where(z, 0.7, 0.2),
            "region": pd.Categorical(
                np.where(rng.random(n) < np.where(z, 0.7, 0.2), "north", rng.choice(["south", "east"], n))
            ),
        }
    )
    for col in ("spend", "tenure"):
        df.loc[rng.random(n) < missing, col] = np.nan
    df["orders"] = df["orders"].astype("Int64").mask(rng.random(n) < missing)
    df["member"] = df["member"].astype("boolean").mask(rng.random(n) < missing)
    df["region"] = df["region"].mask(rng.random(n) < missing)
    return df


def aligned(a, b):
    """Permutation of b's components that best matches a's (by L1 distance of rows)."""
    k = a.shape[0]
    best = min(itertools.permutations(range(k)), key=lambda p: np.abs(a - b[list(p)]).sum())
    return list(best)


# --------------------------------------------------------------------------------------
# Row-by-row references
# --------------------------------------------------------------------------------------


def ref_log_prob_bernoulli(X, w, P):
    out = np.zeros((X.shape[0], w.size))
    for i, row in enumerate(X):
        for c in range(w.size):
            s = np.log(w[c])
            for j, x in enumerate(row):
                if not np.isnan(x):
                    s += stats.bernoulli.logpmf(x, P[c, j])
            out[i, c] = s
    return out


def ref_log_prob_categorical(C, w, T):
    out = np.zeros((C.shape[0], w.size))
    for i, row in enumerate(C):
        for c in range(w.size):
            s = np.log(w[c])
            for j, x in enumerate(row):
                if not np.isnan(x):
                    s += np.log(T[c, j, int(x)])
            out[i, c] = s
    return out


def ref_log_prob_poisson(X, w, R):
    out = np.zeros((X.shape[0], w.size))
    for i, row in enumerate(X):
        for c in range(w.size):
            out[i, c] = np.log(w[c]) + sum(
                stats.poisson.logpmf(x, R[c, j]) for j, x in enumerate(row) if not np.isnan(x)
            )
    return out


def ref_log_prob_binomial(s, n, w, p):
    out = np.zeros((s.size, w.size))
    for i in range(s.size):
        for c in range(w.size):
            out[i, c] = np.log(w[c]) + (
                stats.binom.logpmf(s[i], n[i], p[c]) if not (np.isnan(s[i]) or np.isnan(n[i])) else 0.0
            )
    return out


def responsibilities(log_prob):
    return np.exp(log_prob - logsumexp(log_prob, axis=1, keepdims=True))


# --------------------------------------------------------------------------------------
# E-step and M-step of each family against the row-by-row references
# --------------------------------------------------------------------------------------


def test_bernoulli_m_step_matches_hand_computation():
    X = binary_data(n=30, seed=1)
    w = np.array([0.3, 0.7])
    P = np.array([[0.2, 0.6, 0.5, 0.9], [0.7, 0.1, 0.4, 0.3]])
    fam = BernoulliFamily(2, 4, alpha=0.0)
    params = fam.make_params(w, P)
    lp = ref_log_prob_bernoulli(X, w, P)
    r = responsibilities(lp)
    obs = ~np.isnan(X)
    expected_P = (r.T @ np.where(obs, X, 0)) / (r.T @ obs)
    stats_ = fam.partial_stats(X, params)
    new = fam.m_step(stats_, params)
    np.testing.assert_allclose(new.probabilities, expected_P, rtol=1e-12)
    np.testing.assert_allclose(new.weights, r.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats_.loglik, logsumexp(lp, axis=1).sum(), rtol=1e-12)
    np.testing.assert_allclose(fam.weighted_log_prob(X, params), lp, rtol=1e-12)

    smoothed = BernoulliFamily(2, 4, alpha=2.0).m_step(stats_, params)
    np.testing.assert_allclose(
        smoothed.probabilities, (r.T @ np.where(obs, X, 0) + 2.0) / (r.T @ obs + 4.0), rtol=1e-12
    )

    # the lost cells as hidden variables: their expected value joins the counts
    hidden = BernoulliFamily(2, 4, alpha=0.0, missing="expected")
    new = hidden.m_step(hidden.partial_stats(X, params), params)
    expected = (r.T @ np.where(obs, X, 0) + (r.T @ ~obs) * P) / r.sum(axis=0)[:, None]
    np.testing.assert_allclose(new.probabilities, expected, rtol=1e-12)


def test_bernoulli_row_weights_equal_repeated_rows():
    X = binary_data(n=40, seed=2)
    fam = BernoulliFamily(2, 4, alpha=0.0)
    params = fam.make_params([0.4, 0.6], [[0.2, 0.6, 0.5, 0.9], [0.7, 0.1, 0.4, 0.3]])
    weights = np.arange(40) % 3
    weighted = fam.m_step(fam.partial_stats(X, params, weights.astype(float)), params)
    repeated = np.repeat(X, weights, axis=0)
    direct = fam.m_step(fam.partial_stats(repeated, params), params)
    np.testing.assert_allclose(weighted.probabilities, direct.probabilities, rtol=1e-12)
    np.testing.assert_allclose(weighted.weights, direct.weights, rtol=1e-12)


def test_categorical_m_step_matches_hand_computation():
    rng = np.random.default_rng(3)
    C = rng.integers(0, 3, (40, 3)).astype(float)
    C[:, 1] = np.minimum(C[:, 1], 1)  # a 2-level column
    C[rng.random(C.shape) < 0.15] = np.nan
    w = np.array([0.5, 0.2, 0.3])
    T = np.zeros((3, 3, 3))
    for c in range(3):
        for j, L in enumerate((3, 2, 3)):
            T[c, j, :L] = rng.dirichlet(np.ones(L))
    fam = CategoricalFamily(3, (3, 2, 3), alpha=0.0)
    params = fam.make_params(w, T)
    lp = ref_log_prob_categorical(C, w, T)
    r = responsibilities(lp)
    expected = np.zeros_like(T)
    for c in range(3):
        for j, L in enumerate((3, 2, 3)):
            counts = np.array([r[C[:, j] == lvl, c].sum() for lvl in range(L)])
            expected[c, j, :L] = counts / counts.sum()
    s = fam.partial_stats(C, params)
    new = fam.m_step(s, params)
    np.testing.assert_allclose(new.probabilities, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.loglik, logsumexp(lp, axis=1).sum(), rtol=1e-12)
    np.testing.assert_allclose(new.weights, r.mean(axis=0), rtol=1e-12)
    assert fam.n_parameters() == 3 * (2 + 1 + 2) + 2


def test_categorical_sparse_and_dense_indicators_agree(monkeypatch):
    import emdask.families.discrete as discrete
    from emdask.families import _kernels

    monkeypatch.setattr(_kernels, "use_compiled", False)  # the numpy steps, both ways
    rng = np.random.default_rng(4)
    C = rng.integers(0, 5, (300, 4)).astype(float)
    C[rng.random(C.shape) < 0.1] = np.nan
    fam = CategoricalFamily(2, (5, 5, 5, 5), alpha=0.5)
    params = fam.make_params([0.3, 0.7], rng.dirichlet(np.ones(5), (2, 4)))
    dense = fam.partial_stats(C, params)
    monkeypatch.setattr(discrete, "DENSE_ONE_HOT_MAX", 0)
    sparse_ = fam.partial_stats(C, params)
    np.testing.assert_allclose(sparse_.terms["categorical.counts"], dense.terms["categorical.counts"], rtol=1e-12)
    np.testing.assert_allclose(sparse_.loglik, dense.loglik, rtol=1e-12)


@pytest.mark.parametrize("missing", ["marginalize", "expected"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("order", ["F", "C"])
def test_compiled_categorical_kernel_matches_the_numpy_steps(monkeypatch, missing, weighted,
                                                              order):
    from emdask.families import _kernels

    assert _kernels.compiled_discrete() is not None, "the compiled kernels are not built"
    rng = np.random.default_rng(41)
    n_levels = (4, 2, 7)
    X = np.column_stack([rng.normal(size=3000)] + [
        rng.integers(0, L, 3000).astype(float) for L in n_levels
    ])  # a first column the family does not use
    X[:, 1:][rng.random((3000, 3)) < 0.2] = np.nan
    X[5, 1:] = np.nan  # a row with nothing observed
    X = np.asarray(X, order=order)  # F: as Parquet partitions arrive
    fam = CategoricalFamily(3, n_levels, alpha=0.3, missing=missing)
    fam.parts[0].cols = np.array([1, 2, 3])
    T = np.zeros((3, 3, 7))
    for c in range(3):
        for j, L in enumerate(n_levels):
            T[c, j, :L] = rng.dirichlet(np.ones(L))
    params = fam.make_params([0.2, 0.5, 0.3], T)
    weights = rng.poisson(1.0, 3000).astype(float) if weighted else None
    fast = fam.partial_stats(X, params, weights)
    monkeypatch.setattr(_kernels, "use_compiled", False)
    ref = fam.partial_stats(X, params, weights)
    assert fast.n_rows == pytest.approx(ref.n_rows, rel=1e-14)
    assert fast.loglik == pytest.approx(ref.loglik, rel=1e-12)
    for key in ("nk", "categorical.counts"):
        np.testing.assert_allclose(fast.terms[key], ref.terms[key], rtol=1e-12, atol=1e-12)


def test_compiled_categorical_kernel_refuses_a_cell_that_is_not_a_code():
    from emdask.families import _kernels

    assert _kernels.compiled_discrete() is not None, "the compiled kernels are not built"
    fam = CategoricalFamily(2, (3, 3))
    params = fam.make_params([0.5, 0.5], np.full((2, 2, 3), 1 / 3))
    for bad in (3.0, -1.0, 1.5):
        X = np.zeros((600, 2))
        X[517, 1] = bad
        with pytest.raises(ValueError, match="row 517 .*level codes 0 .. n_levels - 1"):
            fam.partial_stats(X, params)


def test_poisson_m_step_matches_hand_computation():
    rng = np.random.default_rng(5)
    X = rng.poisson([1.0, 6.0], (50, 2)).astype(float)
    X[rng.random(X.shape) < 0.1] = np.nan
    w, R = np.array([0.6, 0.4]), np.array([[1.5, 2.0], [4.0, 7.0]])
    fam = PoissonFamily(2, 2, alpha=0.0)
    params = fam.make_params(w, R)
    lp = ref_log_prob_poisson(X, w, R)
    r = responsibilities(lp)
    obs = ~np.isnan(X)
    s = fam.partial_stats(X, params)
    new = fam.m_step(s, params)
    np.testing.assert_allclose(new.rates, (r.T @ np.where(obs, X, 0)) / (r.T @ obs), rtol=1e-12)
    np.testing.assert_allclose(s.loglik, logsumexp(lp, axis=1).sum(), rtol=1e-12)


def test_binomial_m_step_matches_hand_computation():
    rng = np.random.default_rng(6)
    n = rng.integers(0, 15, 40).astype(float)
    s = rng.binomial(n.astype(int), 0.4).astype(float)
    s[3] = np.nan
    n[7] = np.nan
    w, p = np.array([0.5, 0.5]), np.array([0.3, 0.6])
    fam = BinomialFamily(2, alpha=0.0)
    params = fam.make_params(w, p)
    X = np.column_stack([s, n])
    lp = ref_log_prob_binomial(s, n, w, p)
    r = responsibilities(lp)
    ok = ~(np.isnan(s) | np.isnan(n))
    st = fam.partial_stats(X, params)
    new = fam.m_step(st, params)
    expected = (r[ok].T @ s[ok]) / (r[ok].T @ n[ok])
    np.testing.assert_allclose(new.probabilities, expected, rtol=1e-12)
    np.testing.assert_allclose(st.loglik, logsumexp(lp[ok], axis=1).sum(), rtol=1e-12)
    assert st.n_rows == ok.sum()


def test_mixed_m_step_matches_hand_computation():
    rng = np.random.default_rng(7)
    n = 40
    G = rng.normal(size=(n, 2))
    B = (rng.random((n, 1)) < 0.5).astype(float)
    C = rng.integers(0, 3, (n, 1)).astype(float)
    P = rng.poisson(3.0, (n, 1)).astype(float)
    B[rng.random(B.shape) < 0.2] = np.nan
    C[rng.random(C.shape) < 0.2] = np.nan
    X = np.hstack([G, B, C, P])
    k = 2
    w = np.array([0.4, 0.6])
    mu = np.array([[0.5, -0.2], [-0.4, 0.3]])
    cov = np.array([[[1.0, 0.3], [0.3, 0.8]], [[0.6, -0.1], [-0.1, 1.2]]])
    pb = np.array([[0.3], [0.7]])
    tc = np.array([[[0.2, 0.5, 0.3]], [[0.6, 0.3, 0.1]]])
    rate = np.array([[2.0], [4.0]])
    fam = MixedFamily(
        k, {"gaussian": [0, 1], "bernoulli": [2], "categorical": [3], "poisson": [4]}, (3,),
        covariance_type="full", reg_covar=0.0, alpha=0.0,
    )
    params = fam.make_params(w, means=mu, covariances=cov, binary=pb, categorical=tc, counts=rate)
    lp = np.zeros((n, k))
    for c in range(k):
        lp[:, c] = np.log(w[c]) + stats.multivariate_normal(mu[c], cov[c]).logpdf(G)
        lp[:, c] += ref_log_prob_bernoulli(B, np.ones(1), pb[c : c + 1])[:, 0]
        lp[:, c] += ref_log_prob_categorical(C, np.ones(1), tc[c : c + 1])[:, 0]
        lp[:, c] += ref_log_prob_poisson(P, np.ones(1), rate[c : c + 1])[:, 0]
    np.testing.assert_allclose(fam.weighted_log_prob(X, params), lp, rtol=1e-10)
    r = responsibilities(lp)
    new = fam.m_step(fam.partial_stats(X, params), params)
    nk = r.sum(0)
    means = (r.T @ G) / nk[:, None]
    np.testing.assert_allclose(new.gaussian.means, means, rtol=1e-10)
    for c in range(k):
        d = G - means[c]
        np.testing.assert_allclose(new.gaussian.covariances[c], (d * r[:, c, None]).T @ d / nk[c], rtol=1e-10)
    obs = ~np.isnan(B[:, 0])
    np.testing.assert_allclose(new.binary[:, 0], (r[obs].T @ B[obs, 0]) / r[obs].sum(0), rtol=1e-10)
    np.testing.assert_allclose(new.counts[:, 0], (r.T @ P[:, 0]) / nk, rtol=1e-10)
    assert fam.n_parameters() == (2 * 2 + 2 * 3) + 2 * 1 + 2 * 2 + 2 * 1 + 1


# --------------------------------------------------------------------------------------
# The EM fixed point against direct maximization of the observed-data likelihood
# --------------------------------------------------------------------------------------


def maximize(negll, n_params, seed, starts=6):
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        res = optimize.minimize(negll, rng.normal(0, 1, n_params), method="L-BFGS-B",
                                options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-14})
        if best is None or res.fun < best.fun:
            best = res
    polished = optimize.minimize(negll, best.x, method="BFGS", options={"gtol": 1e-9})
    return polished if polished.fun < best.fun else best


def test_bernoulli_fixed_point_is_the_likelihood_maximum():
    X = binary_data(n=300, seed=8)
    obs = ~np.isnan(X)
    X0 = np.where(obs, X, 0)

    def negll(v):
        w = softmax([0.0, v[0]])
        P = expit(v[1:].reshape(2, 4))
        lp = np.log(w) + X0 @ np.log(P).T + (obs - X0) @ np.log1p(-P).T
        return -logsumexp(lp, axis=1).sum()

    best = maximize(negll, 9, seed=0)
    m = BernoulliMixture(2, alpha=0.0, tol=1e-13, max_iter=3000, random_state=0).fit(X)
    em_ll = -negll(np.concatenate([[np.log(m.weights_[1] / m.weights_[0])],
                                   np.log(m.probabilities_ / (1 - m.probabilities_)).ravel()]))
    assert em_ll >= -best.fun - 1e-6
    assert em_ll == pytest.approx(m.score(X) * (~np.isnan(X).all(1)).sum(), rel=1e-10)
    P_opt = expit(best.x[1:].reshape(2, 4))
    perm = aligned(m.probabilities_, P_opt)
    np.testing.assert_allclose(m.probabilities_, P_opt[perm], atol=2e-4)
    np.testing.assert_allclose(m.weights_, softmax([0.0, best.x[0]])[perm], atol=2e-4)


def test_categorical_fixed_point_is_the_likelihood_maximum():
    df = survey_frame(n=400, seed=9)
    m = CategoricalMixture(2, alpha=0.0, tol=1e-13, max_iter=3000, random_state=0).fit(df)
    levels = [len(c) for c in m.categories_]
    codes = np.column_stack([
        pd.Index(m.categories_[j]).get_indexer(df[c].astype(object).where(df[c].notna(), None)).astype(float)
        for j, c in enumerate(df.columns)
    ])
    codes[codes < 0] = np.nan

    def unpack(v):
        w = softmax([0.0, v[0]])
        tables, i = [], 1
        for L in levels:
            raw = v[i : i + 2 * (L - 1)].reshape(2, L - 1)
            tables.append(softmax(np.column_stack([np.zeros(2), raw]), axis=1))
            i += 2 * (L - 1)
        return w, tables

    def negll(v):
        w, tables = unpack(v)
        lp = np.tile(np.log(w), (codes.shape[0], 1))
        for j, t in enumerate(tables):
            seen = ~np.isnan(codes[:, j])
            lp[seen] += np.log(t[:, codes[seen, j].astype(int)]).T
        return -logsumexp(lp, axis=1).sum()

    n_params = 1 + 2 * sum(L - 1 for L in levels)
    best = maximize(negll, n_params, seed=1, starts=3)
    # EM may sit a hair higher: probabilities near 0 lie at -inf in the softmax coordinates
    assert -best.fun <= m.score(df) * len(df) + 1e-6
    assert m.score(df) * len(df) == pytest.approx(-best.fun, abs=1e-4)
    w_opt, t_opt = unpack(best.x)
    perm = aligned(m.probabilities_[:, 0, :3], t_opt[0])
    for j, L in enumerate(levels):
        np.testing.assert_allclose(m.probabilities_[:, j, :L], t_opt[j][perm], atol=5e-4)


def test_poisson_and_binomial_fixed_points_are_likelihood_maxima():
    rng = np.random.default_rng(10)
    z = rng.random(300) < 0.3
    X = rng.poisson(np.where(z[:, None], [6.0, 1.0], [1.5, 4.0])).astype(float)
    X[rng.random(X.shape) < 0.1] = np.nan
    obs = ~np.isnan(X)
    X0 = np.where(obs, X, 0)

    def negll(v):
        w = softmax([0.0, v[0]])
        R = np.exp(v[1:].reshape(2, 2))
        lp = np.log(w) + X0 @ np.log(R).T - obs @ R.T - (gammaln(X0 + 1) * obs).sum(1)[:, None]
        return -logsumexp(lp, axis=1).sum()

    best = maximize(negll, 5, seed=2)
    m = PoissonMixture(2, alpha=0.0, tol=1e-13, max_iter=3000, random_state=0).fit(X)
    total = m.score(X) * (~np.isnan(X).all(1)).sum()
    assert total == pytest.approx(-best.fun, rel=1e-9)
    R_opt = np.exp(best.x[1:].reshape(2, 2))
    np.testing.assert_allclose(m.rates_, R_opt[aligned(m.rates_, R_opt)], rtol=1e-3)

    trials = rng.integers(5, 30, 300).astype(float)
    succ = rng.binomial(trials.astype(int), np.where(z, 0.8, 0.35)).astype(float)

    def negll_b(v):
        w = softmax([0.0, v[0]])
        p = expit(v[1:])
        lp = np.log(w) + stats.binom.logpmf(succ[:, None], trials[:, None], p[None, :])
        return -logsumexp(lp, axis=1).sum()

    best = maximize(negll_b, 3, seed=3)
    b = BinomialMixture(2, alpha=0.0, tol=1e-13, max_iter=3000, random_state=0)
    b.fit(pd.DataFrame({"s": succ, "n": trials}), columns=["s", "n"])
    assert b.score(pd.DataFrame({"s": succ, "n": trials})) * 300 == pytest.approx(-best.fun, rel=1e-9)
    p_opt = np.sort(expit(best.x[1:]))
    np.testing.assert_allclose(np.sort(b.probabilities_), p_opt, atol=1e-4)


def test_mixed_fixed_point_is_the_likelihood_maximum():
    df = customer_frame(n=300, seed=11)[["spend", "orders", "region"]]
    m = MixedMixture(2, alpha=0.0, reg_covar=0.0, tol=1e-13, max_iter=3000, random_state=0).fit(df)
    assert m.column_families_ == {"spend": "gaussian", "orders": "poisson", "region": "categorical"}
    x = df["spend"].to_numpy()
    cnt = df["orders"].to_numpy(dtype=float, na_value=np.nan)
    reg = pd.Index(m.categories_["region"]).get_indexer(df["region"].astype(object)).astype(float)
    reg[reg < 0] = np.nan

    def negll(v):
        w = softmax([0.0, v[0]])
        mu, sd, lam = v[1:3], np.exp(v[3:5]), np.exp(v[5:7])
        t = softmax(np.column_stack([np.zeros(2), v[7:11].reshape(2, 2)]), axis=1)
        lp = np.tile(np.log(w), (x.size, 1))
        s = ~np.isnan(x)
        lp[s] += stats.norm.logpdf(x[s, None], mu, sd)
        s = ~np.isnan(cnt)
        lp[s] += stats.poisson.logpmf(cnt[s, None], lam)
        s = ~np.isnan(reg)
        lp[s] += np.log(t[:, reg[s].astype(int)]).T
        return -logsumexp(lp, axis=1).sum()

    best = maximize(negll, 11, seed=4, starts=4)
    assert m.score(df) * len(df) == pytest.approx(-best.fun, rel=1e-9)
    mu_opt = best.x[1:3]
    perm = aligned(m.means_, mu_opt[:, None])
    np.testing.assert_allclose(m.means_[:, 0], mu_opt[perm], atol=1e-3)
    np.testing.assert_allclose(m.covariances_[:, 0], np.exp(2 * best.x[3:5])[perm], rtol=1e-3)
    np.testing.assert_allclose(m.rates_[:, 0], np.exp(best.x[5:7])[perm], rtol=1e-3)


# --------------------------------------------------------------------------------------
# EM never lowers the likelihood
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, data",
    [
        (lambda: BernoulliMixture(3, alpha=0.0, tol=0, max_iter=40, random_state=1), lambda: binary_data(seed=12)),
        (lambda: BernoulliMixture(3, alpha=0.0, missing="expected", tol=0, max_iter=40, random_state=1),
         lambda: binary_data(seed=12)),
        (lambda: CategoricalMixture(3, alpha=0.0, tol=0, max_iter=40, random_state=2), lambda: survey_frame(seed=13)),
        (lambda: PoissonMixture(3, alpha=0.0, tol=0, max_iter=40, random_state=3, init_params="random"),
         lambda: customer_frame(seed=14)[["orders"]]),
        (lambda: MixedMixture(3, covariance_type="full", alpha=0.0, tol=0, max_iter=40, random_state=4),
         lambda: customer_frame(seed=15)),
    ],
)
@pytest.mark.parametrize("algorithm", ["em", "squarem"])
def test_log_likelihood_never_decreases(make, data, algorithm):
    m = make().set_params(algorithm=algorithm).fit(data())
    lb = np.asarray(m.lower_bounds_)
    assert m.n_iter_ == 40 and lb.size == (40 if algorithm == "em" else lb.size)
    assert np.all(np.diff(lb) >= -1e-12 * np.abs(lb[1:]))
    assert lb[-1] > lb[0]


# --------------------------------------------------------------------------------------
# Partitions, levels, missing cells
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_every", [2, 8])
def test_partition_invariance(split_every):
    df = survey_frame(n=700, seed=16)
    cust = customer_frame(n=700, seed=17)
    ref_c = CategoricalMixture(3, tol=0, max_iter=15, random_state=5).fit(df)
    ref_m = MixedMixture(2, covariance_type="full", tol=0, max_iter=15, random_state=6).fit(cust)
    for nparts in (1, 3, 7):
        c = CategoricalMixture(3, tol=0, max_iter=15, random_state=5, split_every=split_every)
        c.fit(dd.from_pandas(df, npartitions=nparts, sort=False))
        np.testing.assert_allclose(c.probabilities_, ref_c.probabilities_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(c.weights_, ref_c.weights_, rtol=1e-9)
        m = MixedMixture(2, covariance_type="full", tol=0, max_iter=15, random_state=6,
                         split_every=split_every)
        m.fit(dd.from_pandas(cust, npartitions=nparts, sort=False))
        for name in ("weights_", "means_", "covariances_", "binary_probabilities_",
                     "category_probabilities_", "rates_"):
            np.testing.assert_allclose(getattr(m, name), getattr(ref_m, name), rtol=1e-9, atol=1e-12)


def test_level_seen_only_in_the_last_partition():
    df = survey_frame(n=400, seed=18)
    df["q2"] = df["q2"].astype(object)
    df.loc[df.index[-3:], "q2"] = "late"
    ddf = dd.from_pandas(df, npartitions=5, sort=False)
    assert "late" not in set(ddf.partitions[0].compute()["q2"])
    m = CategoricalMixture(2, tol=0, max_iter=10, random_state=7).fit(ddf)
    ref = CategoricalMixture(2, tol=0, max_iter=10, random_state=7).fit(df)
    assert m.categories_[1] == ["a", "b", "late"]
    np.testing.assert_allclose(m.probabilities_, ref.probabilities_, rtol=1e-9, atol=1e-12)
    j = m.categories_[1].index("late")
    assert np.all(m.probabilities_[:, 1, j] > 0)
    assert m.weights_ @ m.probabilities_[:, 1, j] == pytest.approx(3 / df["q2"].notna().sum(), rel=0.2)
    lazy = m.predict(ddf)
    assert isinstance(lazy, dd.Series)
    np.testing.assert_array_equal(lazy.compute().to_numpy(), ref.predict(df))


def test_missing_cell_is_marginalized_categorical():
    df = survey_frame(n=300, seed=19, missing=0.0)
    m = CategoricalMixture(2, random_state=0).fit(df)
    row = df.iloc[[5]].copy()
    row.loc[row.index[0], "q2"] = None
    # the row with q2 dropped: the product over q1 and q3 only, by hand
    codes = [m.categories_[0].index(row["q1"].iloc[0]), m.categories_[2].index(row["q3"].iloc[0])]
    lp = np.log(m.weights_) + np.log(m.probabilities_[:, 0, codes[0]]) + np.log(m.probabilities_[:, 2, codes[1]])
    np.testing.assert_allclose(m.predict_proba(row)[0], responsibilities(lp[None])[0], rtol=1e-12)
    # and the same as a model fitted without that column would give with these parameters
    fam = CategoricalFamily(2, (3, 4))
    params = fam.make_params(m.weights_, m.probabilities_[:, [0, 2], :4])
    block = np.array([[codes[0], codes[1]]], dtype=float)
    np.testing.assert_allclose(
        m.predict_proba(row)[0], responsibilities(fam.weighted_log_prob(block, params))[0], rtol=1e-12
    )


def test_missing_cell_is_marginalized_mixed_full_covariance():
    cust = customer_frame(n=500, seed=20, missing=0.0)
    m = MixedMixture(2, covariance_type="full", random_state=0).fit(cust)
    row = cust.iloc[[3]].copy()
    row.loc[row.index[0], "tenure"] = np.nan
    r = row.iloc[0]
    lp = np.log(m.weights_).copy()
    for c in range(2):
        lp[c] += stats.norm.logpdf(r["spend"], m.means_[c, 0], np.sqrt(m.covariances_[c, 0, 0]))
        lp[c] += stats.poisson.logpmf(r["orders"], m.rates_[c, 0])
        lp[c] += stats.bernoulli.logpmf(int(r["member"]), m.binary_probabilities_[c, 0])
        lp[c] += np.log(m.category_probabilities_[c, 0, m.categories_["region"].index(r["region"])])
    np.testing.assert_allclose(m.predict_proba(row)[0], responsibilities(lp[None])[0], rtol=1e-10)
    np.testing.assert_allclose(m.score_samples(row)[0], logsumexp(lp), rtol=1e-12)


def test_bernoulli_and_poisson_missing_cells_are_marginalized():
    X = binary_data(n=200, seed=21, missing=0.0)
    m = BernoulliMixture(2, random_state=0).fit(X)
    row = X[:1].copy()
    row[0, 2] = np.nan
    lp = ref_log_prob_bernoulli(np.delete(row, 2, axis=1), m.weights_, np.delete(m.probabilities_, 2, axis=1))
    np.testing.assert_allclose(m.predict_proba(row), responsibilities(lp), rtol=1e-12)
    P = np.random.default_rng(0).poisson(3.0, (200, 3)).astype(float)
    pm = PoissonMixture(2, random_state=0).fit(P)
    row = P[:1].copy()
    row[0, 0] = np.nan
    lp = ref_log_prob_poisson(row[:, 1:], pm.weights_, pm.rates_[:, 1:])
    np.testing.assert_allclose(pm.predict_proba(row), responsibilities(lp), rtol=1e-12)


# --------------------------------------------------------------------------------------
# Gaussian columns of a mixed table against scikit-learn
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_mixed_gaussian_columns_match_sklearn(covariance_type):
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    rng = np.random.default_rng(22)
    X = np.vstack([rng.normal([0, 0], [1, 0.5], (200, 2)), rng.normal([3, 2], [0.7, 1.2], (150, 2))])
    m = MixedMixture(2, covariance_type=covariance_type, tol=0, max_iter=12, random_state=0,
                     algorithm="em").fit(X)
    assert m.column_families_ == {"x0": "gaussian", "x1": "gaussian"}
    # sklearn from the same start (recovered by a one-iteration fit), twelve iterations
    start = MixedMixture(2, covariance_type=covariance_type, tol=0, max_iter=0, random_state=0).fit(X)
    prec = 1.0 / start.covariances_ if covariance_type == "diag" else np.linalg.inv(start.covariances_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkGaussianMixture(2, covariance_type=covariance_type, tol=0, max_iter=12,
                               reg_covar=1e-6, weights_init=start.weights_, means_init=start.means_,
                               precisions_init=prec).fit(X)
    np.testing.assert_allclose(m.means_, sk.means_, rtol=1e-8)
    np.testing.assert_allclose(m.covariances_, sk.covariances_, rtol=1e-8)
    np.testing.assert_allclose(m.weights_, sk.weights_, rtol=1e-8)


# --------------------------------------------------------------------------------------
# Estimator behaviour
# --------------------------------------------------------------------------------------


def test_fixed_weights_stay_fixed_and_bic_counts_parameters():
    df = survey_frame(n=300, seed=23)
    m = CategoricalMixture(2, fit_weights=False, weights_init=[0.25, 0.75], random_state=0).fit(df)
    np.testing.assert_array_equal(m.weights_, [0.25, 0.75])
    free = CategoricalMixture(2, random_state=0).fit(df)
    total = free.score(df) * len(df)
    p = 2 * ((3 - 1) + (2 - 1) + (4 - 1)) + 1
    assert free.bic(df) == pytest.approx(-2 * total + p * np.log(len(df)), rel=1e-12)
    assert free.aic(df) == pytest.approx(-2 * total + 2 * p, rel=1e-12)
    assert m.bic(df) == pytest.approx(-2 * m.score(df) * len(df) + (p - 1) * np.log(len(df)), rel=1e-12)


def test_categories_and_inputs_of_every_kind():
    df = survey_frame(n=200, seed=24)
    m = CategoricalMixture(2, random_state=0).fit(df)
    assert m.categories_ == [["no", "maybe", "yes"], ["a", "b"], [1, 2, 3, 4]]
    assert m.probabilities_.shape == (2, 3, 4)
    np.testing.assert_allclose(m.probabilities_[:, 1, 2:], 0.0)
    np.testing.assert_allclose(m.probabilities_.sum(-1), 1.0)
    sample, labels = m.sample(50)
    assert list(sample.columns) == ["q1", "q2", "q3"]
    assert isinstance(sample["q1"].dtype, pd.CategoricalDtype)
    assert set(sample["q3"].unique()) <= {1, 2, 3, 4}
    arr = CategoricalMixture(2, random_state=0).fit(np.array([["x", "y"], ["y", "y"], ["x", None]], dtype=object))
    assert arr.categories_ == [["x", "y"], ["y"]]


def test_sample_frequencies_follow_the_parameters():
    m = BernoulliMixture(2, random_state=0).fit(binary_data(seed=25))
    X, labels = m.sample(40000)
    assert X.shape == (40000, 4)
    np.testing.assert_allclose(np.bincount(labels) / 40000, m.weights_, atol=0.015)
    for c in range(2):
        np.testing.assert_allclose(X[labels == c].mean(0), m.probabilities_[c], atol=0.02)


def test_unseen_level_at_predict_time():
    df = survey_frame(n=200, seed=26)
    m = CategoricalMixture(2, random_state=0).fit(df)
    new = df.head(3).copy()
    new["q2"] = new["q2"].astype(object)
    new.loc[new.index[0], "q2"] = "zebra"
    with pytest.raises(ValueError, match=r"'q2'.*zebra.*handle_unknown='missing'"):
        m.predict(new)
    lenient = CategoricalMixture(2, handle_unknown="missing", random_state=0).fit(df)
    as_missing = new.copy()
    as_missing.loc[as_missing.index[0], "q2"] = None
    np.testing.assert_allclose(lenient.predict_proba(new), lenient.predict_proba(as_missing), rtol=1e-12)
    filled = lenient.impute(new)
    assert filled.loc[filled.index[0], "q2"] == "zebra"  # observed, so kept


# --------------------------------------------------------------------------------------
# Imputation
# --------------------------------------------------------------------------------------


def test_mixed_impute_fills_by_expectation_and_most_probable_level():
    cust = customer_frame(n=600, seed=27, missing=0.15)
    m = MixedMixture(2, random_state=0).fit(cust)
    out = m.impute(cust)
    assert list(out.columns) == list(cust.columns)
    assert (out.dtypes == cust.dtypes).all()
    assert out.index.equals(cust.index)
    assert not out.isna().any().any()
    observed = cust.notna()
    for col in cust.columns:
        pd.testing.assert_series_equal(out[col][observed[col]], cust[col][observed[col]])
    proba = m.predict_proba(cust)
    miss = cust["spend"].isna().to_numpy()
    np.testing.assert_allclose(out["spend"][miss], proba[miss] @ m.means_[:, 0], rtol=1e-10)
    miss = cust["region"].isna().to_numpy()
    level_p = proba[miss] @ m.category_probabilities_[:, 0, :]
    expected = np.asarray(m.categories_["region"], dtype=object)[level_p.argmax(1)]
    np.testing.assert_array_equal(out["region"][miss].astype(object).to_numpy(), expected)
    miss = cust["orders"].isna().to_numpy()
    np.testing.assert_array_equal(out["orders"][miss].to_numpy(), np.round(proba[miss] @ m.rates_[:, 0]))
    miss = cust["member"].isna().to_numpy()
    np.testing.assert_array_equal(out["member"][miss].to_numpy(), proba[miss] @ m.binary_probabilities_[:, 0] >= 0.5)

    lazy = m.impute(dd.from_pandas(cust, npartitions=3))
    assert isinstance(lazy, dd.DataFrame)
    pd.testing.assert_frame_equal(lazy.compute(), out)


def test_sample_imputations_draw_from_the_conditional_distribution():
    df = survey_frame(n=400, seed=28, missing=0.0)
    m = CategoricalMixture(2, random_state=0).fit(df)
    probe = pd.concat([df.iloc[[0]]] * 3000, ignore_index=True)
    probe["q3"] = probe["q3"].astype("Int64").mask(np.ones(3000, bool))
    draws = m.sample_imputations(probe, n_imputations=2, random_state=3)
    assert len(draws) == 2
    for d in draws:
        pd.testing.assert_series_equal(d["q1"], probe["q1"])
        assert d["q3"].dtype == probe["q3"].dtype
    want = m.predict_proba(probe.iloc[[0]])[0] @ m.probabilities_[:, 2, :4]
    freq = draws[0]["q3"].value_counts(normalize=True).reindex([1, 2, 3, 4], fill_value=0).to_numpy()
    np.testing.assert_allclose(freq, want, atol=0.03)
    assert not draws[0]["q3"].equals(draws[1]["q3"])
    again = m.sample_imputations(probe, n_imputations=1, random_state=3)[0]
    pd.testing.assert_frame_equal(again, draws[0])


def test_numpy_impute_keeps_observed_cells():
    X = binary_data(n=100, seed=29)
    m = BernoulliMixture(2, random_state=0).fit(X)
    out = m.impute(X)
    seen = ~np.isnan(X)
    np.testing.assert_array_equal(out[seen], X[seen])
    assert set(np.unique(out[~seen])) <= {0.0, 1.0}


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_non_binary_value_names_the_column():
    df = pd.DataFrame({"ok": [0, 1, 1, 0], "clicked": [0, 1, 2, 1]})
    with pytest.raises(ValueError, match=r"column 'clicked' must hold 0/1"):
        BernoulliMixture(1).fit(df)
    with pytest.raises(ValueError, match=r"column 'clicked' must hold 0/1"):
        BernoulliMixture(1).fit(dd.from_pandas(df, npartitions=2))
    with pytest.raises(TypeError, match=r"column 'label'.*not numeric"):
        BernoulliMixture(1).fit(pd.DataFrame({"label": ["a", "b"]}), columns=["label"])


def test_bad_counts_name_the_column():
    with pytest.raises(ValueError, match=r"column 'visits' must hold non-negative whole numbers.*-1"):
        PoissonMixture(1).fit(pd.DataFrame({"visits": [1, 2, -1, 4]}))
    with pytest.raises(ValueError, match=r"column 'visits' must hold non-negative whole numbers.*2\.5"):
        PoissonMixture(1).fit(pd.DataFrame({"visits": [1, 2.5, 3]}))
    with pytest.raises(ValueError, match=r"column 'orders' must hold non-negative whole numbers"):
        MixedMixture(1, column_families={"orders": "poisson"}).fit(pd.DataFrame({"orders": [1.0, 0.5]}))


def test_successes_above_trials_name_the_columns():
    df = pd.DataFrame({"hits": [3, 9, 2], "shots": [5, 8, 2]})
    with pytest.raises(ValueError, match=r"column 'hits' holds more successes than column 'shots'"):
        BinomialMixture(1).fit(df, columns=["hits", "shots"])
    with pytest.raises(ValueError, match=r"column 'hits' holds successes greater than n_trials=5"):
        BinomialMixture(1, n_trials=5).fit(df, columns=["hits"])
    with pytest.raises(ValueError, match=r"successes column and a trials column"):
        BinomialMixture(1).fit(df[["hits"]])


def test_thousands_of_levels_warn_with_a_limit():
    rng = np.random.default_rng(30)
    df = pd.DataFrame({"zip": rng.integers(0, 3000, 5000).astype(str), "q": rng.integers(0, 2, 5000)})
    with pytest.warns(DataWarning, match=r"column 'zip' has \d{4} levels.*100 most frequent"):
        m = CategoricalMixture(2, max_iter=3, random_state=0).fit(df)
    assert m.probabilities_.shape[2] == len(m.categories_[0])
    np.testing.assert_allclose(m.probabilities_[:, 0, :].sum(1), 1.0)


def test_all_missing_column_names_the_column():
    with pytest.raises(ValueError, match=r"column 'empty' has no observed value"):
        CategoricalMixture(1).fit(pd.DataFrame({"q": ["a", "b"], "empty": [None, None]}))
    with pytest.raises(ValueError, match=r"\['empty'\] have no observed value"):
        BernoulliMixture(1).fit(pd.DataFrame({"q": [0, 1], "empty": [np.nan, np.nan]}))
    with pytest.raises(ValueError, match=r"column 'empty' has no observed value"):
        MixedMixture(1).fit(pd.DataFrame({"q": [0.5, 1.5], "empty": pd.array([None, None], dtype="Int64")}))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha"):
        CategoricalMixture(alpha=-1).fit(survey_frame(n=20))
    with pytest.raises(ValueError, match="column_families"):
        MixedMixture(column_families={"spend": "lognormal"}).fit(customer_frame(n=20))
    with pytest.raises(KeyError, match="not among the columns"):
        MixedMixture(column_families={"nope": "gaussian"}).fit(customer_frame(n=20))
    with pytest.raises(ValueError, match=r"probabilities_init must have shape \(2, 4\)"):
        BernoulliMixture(2, probabilities_init=[[0.5], [0.5]]).fit(binary_data(n=20))
