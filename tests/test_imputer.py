"""EMImputer: filling, multiple imputation and Rubin's rules."""


import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from emdask import (
    BernoulliMixture,
    CategoricalMixture,
    DataWarning,
    EMImputer,
    MixedMixture,
    PoissonMixture,
    pool,
)


def survey(seed, n=1000, rate=0.2):
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.7, 0.4], [0.7, 1.0, 0.5], [0.4, 0.5, 1.0]])
    X = rng.multivariate_normal([3.0, -1.0, 10.0], cov, n)
    Xm = X.copy()
    Xm[rng.random(X.shape) < rate] = np.nan
    df = pd.DataFrame(Xm, columns=["income", "age", "score"], index=pd.RangeIndex(100, 100 + n) * 2)
    df.insert(1, "region", rng.choice(["north", "south"], n))
    return X, df


def test_transform_fills_only_missing_cells_and_keeps_the_table():
    _, df = survey(0)
    df["count"] = pd.array(np.where(np.arange(len(df)) % 7 == 0, None, np.arange(len(df))), dtype="Int64")
    imp = EMImputer(random_state=0).fit(df)
    out = imp.transform(df)
    assert list(out.columns) == list(df.columns)
    assert out.index.equals(df.index)
    assert out["region"].equals(df["region"])
    modelled = ["income", "age", "score", "count"]
    assert not out[modelled].isna().any().any()
    for col in modelled:
        seen = df[col].notna().to_numpy()
        original = df[col].to_numpy(dtype=np.float64, na_value=np.nan)[seen]
        # observed cells come back bit for bit (an integer column stays integer)
        back = out[col].to_numpy(dtype=np.float64)[seen]
        assert np.array_equal(back.view(np.int64), original.view(np.int64))
    assert out["count"].dtype == "Int64"  # filled with rounded expectations
    assert df["income"].isna().any()  # the input is not modified


def test_conditional_means_match_a_direct_computation():
    _, df = survey(1, n=600, rate=0.3)
    imp = EMImputer(tol=1e-8, max_iter=500).fit(df)
    out = imp.impute(df)
    mu, S = imp.means_[0], imp.covariances_[0]
    X = df[["income", "age", "score"]].to_numpy()
    for i in range(len(X)):
        o, m = ~np.isnan(X[i]), np.isnan(X[i])
        if not m.any():
            continue
        expected = mu[m] + (S[np.ix_(m, o)] @ np.linalg.solve(S[np.ix_(o, o)], X[i, o] - mu[o]) if o.any() else 0)
        np.testing.assert_allclose(out[["income", "age", "score"]].to_numpy()[i, m], expected, rtol=1e-10)


def test_mixture_fills_multimodal_data_better_than_one_normal():
    rng = np.random.default_rng(2)
    centers = rng.normal(0, 6, (3, 5))
    X = np.vstack([rng.multivariate_normal(c, np.eye(5) * 0.5 + 0.3, 700) for c in centers])
    Xm = X.copy()
    mask = rng.random(X.shape) < 0.2
    Xm[mask] = np.nan
    rmse = {}
    for k in (1, 3):
        filled = EMImputer(k, random_state=0, n_init=2).fit_transform(Xm)
        rmse[k] = np.sqrt(np.mean((filled[mask] - X[mask]) ** 2))
    mean_fill = np.where(mask, np.nanmean(Xm, axis=0), Xm)
    rmse["mean"] = np.sqrt(np.mean((mean_fill[mask] - X[mask]) ** 2))
    assert rmse[3] < 0.8 * rmse[1]
    assert rmse[1] < 0.8 * rmse["mean"]


def test_impute_is_the_one_verb_and_transform_fills_the_same_cells():
    imputing = [BernoulliMixture, CategoricalMixture, PoissonMixture, MixedMixture]
    assert all(cls.impute is EMImputer.impute for cls in imputing)
    _, df = survey(2, n=400)
    imp = EMImputer(random_state=0).fit(df)
    pd.testing.assert_frame_equal(imp.transform(df), imp.impute(df))
    ddf = dd.from_pandas(df, npartitions=3)
    pd.testing.assert_frame_equal(imp.transform(ddf).compute(), imp.impute(ddf).compute())
    X = df[["income", "age", "score"]].to_numpy()
    fitted = EMImputer(random_state=0).fit(X)
    assert np.array_equal(fitted.transform(X), fitted.impute(X), equal_nan=True)
    assert not np.isnan(fitted.impute(X)).any()


def test_dask_in_dask_out_lazily_with_the_same_values():
    _, df = survey(3, n=900)
    ddf = dd.from_pandas(df, npartitions=4)
    imp = EMImputer(random_state=0).fit(ddf)
    lazy = imp.transform(ddf)
    assert isinstance(lazy, dd.DataFrame)
    assert lazy.npartitions == 4 and lazy.divisions == ddf.divisions
    got, want = lazy.compute(), imp.transform(df)
    cols = ["income", "age", "score"]
    pd.testing.assert_frame_equal(got[cols], want[cols])
    assert list(got["region"]) == list(want["region"])
    arr = da.from_array(df[["income", "age", "score"]].to_numpy(), chunks=(300, 3))
    imp_arr = EMImputer(random_state=0).fit(arr)
    out = imp_arr.transform(arr)
    assert isinstance(out, da.Array)
    np.testing.assert_allclose(out.compute(), imp_arr.transform(arr.compute()))


def test_multiple_imputations_keep_observed_cells_and_vary_the_missing_ones():
    _, df = survey(4, n=500)
    imp = EMImputer(random_state=0).fit(df)
    tables = imp.sample_imputations(df, n_imputations=4, random_state=7)
    assert len(tables) == 4
    cols = ["income", "age", "score"]
    miss = df[cols].isna().to_numpy()
    for t in tables:
        assert not t[cols].isna().any().any()
        np.testing.assert_array_equal(t[cols].to_numpy()[~miss], df[cols].to_numpy()[~miss])
        assert t["region"].equals(df["region"])
    draws = np.stack([t[cols].to_numpy()[miss] for t in tables])
    assert np.all(draws.std(axis=0) > 0)
    again = imp.sample_imputations(df, n_imputations=4, random_state=7)
    for a, b in zip(tables, again):
        pd.testing.assert_frame_equal(a, b)


def _between_variance_of_mean(rate, seed):
    X, df = survey(seed, n=800, rate=rate)
    imp = EMImputer(random_state=seed).fit(df)
    tables = imp.sample_imputations(df, n_imputations=8, random_state=seed)
    means = [t["income"].mean() for t in tables]
    return np.var(means, ddof=1)


def test_imputation_spread_grows_with_the_missing_rate():
    low = np.mean([_between_variance_of_mean(0.05, s) for s in range(3)])
    high = np.mean([_between_variance_of_mean(0.4, s) for s in range(3)])
    assert high > 3 * low


def test_pooled_intervals_cover_the_true_mean_near_the_nominal_rate():
    """Missing at random: income is lost more often when age is high."""
    covered = []
    true_mean = 3.0
    for rep in range(40):
        rng = np.random.default_rng(1000 + rep)
        cov = np.array([[1.0, 0.8], [0.8, 1.0]])
        X = rng.multivariate_normal([true_mean, 0.0], cov, 150)
        lost = rng.random(150) < 1 / (1 + np.exp(-(X[:, 1] - 0.5) * 2))  # depends on age only
        Xm = X.copy()
        Xm[lost, 0] = np.nan
        df = pd.DataFrame(Xm, columns=["income", "age"])
        imp = EMImputer(random_state=rep, tol=1e-6).fit(df)
        tables = imp.sample_imputations(df, n_imputations=10, random_state=rep)
        est = [t["income"].mean() for t in tables]
        var = [t["income"].var(ddof=1) / len(t) for t in tables]
        low, high = pool(est, var, dof_complete=149).confidence_interval(0.95)
        covered.append(low <= true_mean <= high)
    coverage = np.mean(covered)
    # 40 replications: a 95% interval covers 0.85–1.0 of the time with overwhelming probability
    assert 0.85 <= coverage <= 1.0
    # the complete cases alone are biased here (missingness depends on age): the test has teeth
    assert abs(np.nanmean(Xm[:, 0]) - true_mean) > 0.1


def test_rubins_rules_against_hand_computation():
    est = np.array([10.0, 12.0, 11.0, 13.0])
    var = np.array([1.0, 1.5, 1.2, 1.3])
    m = 4
    qbar = 11.5
    ubar = 1.25
    b = ((10 - 11.5) ** 2 + (12 - 11.5) ** 2 + (11 - 11.5) ** 2 + (13 - 11.5) ** 2) / 3  # 5/3
    total = ubar + (1 + 1 / m) * b
    r = (1 + 1 / m) * b / ubar
    dof = (m - 1) * (1 + 1 / r) ** 2
    p = pool(est, var)
    assert p.estimate == pytest.approx(qbar)
    assert p.within == pytest.approx(ubar)
    assert p.between == pytest.approx(b)
    assert p.total == pytest.approx(total)
    assert p.riv == pytest.approx(r)
    assert p.dof == pytest.approx(dof)
    low, high = p.confidence_interval(0.9)
    half = stats.t.ppf(0.95, dof) * np.sqrt(total)
    assert (low, high) == pytest.approx((qbar - half, qbar + half))
    # vector estimates pool element-wise
    pv = pool(np.column_stack([est, est * 2]), np.column_stack([var, var * 4]))
    np.testing.assert_allclose(pv.estimate, [qbar, 2 * qbar])
    np.testing.assert_allclose(pv.total, [total, 4 * total])


def test_barnard_rubin_adjustment_is_smaller_than_the_large_sample_dof():
    p = pool([1.0, 1.4, 0.8], [0.2, 0.25, 0.22], dof_complete=20)
    assert 0 < p.dof < pool([1.0, 1.4, 0.8], [0.2, 0.25, 0.22]).dof
    assert p.dof < 20


def test_pool_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        pool([1.0], [0.1])
    with pytest.raises(ValueError, match="same shape"):
        pool([1.0, 2.0], [0.1])
    with pytest.raises(ValueError, match="non-negative"):
        pool([1.0, 2.0], [0.1, -1])


def test_unmodelled_non_numeric_missing_answers_are_named():
    _, df = survey(5, n=200)
    df.loc[df.index[:5], "region"] = None
    with pytest.warns(DataWarning, match="region.*MixedMixture"):
        EMImputer().fit(df)
    with pytest.raises(TypeError, match="region.*MixedMixture"):
        EMImputer().fit(df, columns=["income", "region"])


def test_column_with_no_observed_value_is_named():
    _, df = survey(6, n=50)
    df["score"] = np.nan
    with pytest.raises(ValueError, match="score.*no observed value"):
        EMImputer().fit(df)


def test_not_fitted():
    with pytest.raises(AttributeError, match="not fitted"):
        EMImputer().transform(np.zeros((2, 2)))


def test_imputer_round_trips_through_a_model_file(tmp_path):
    import emdask

    _, df = survey(7, n=400)
    imp = EMImputer(2, random_state=0).fit(df)
    imp.save(tmp_path / "imputer")
    again = emdask.load(tmp_path / "imputer")
    assert type(again) is EMImputer
    assert again.get_params() == imp.get_params()
    pd.testing.assert_frame_equal(again.transform(df), imp.transform(df))
