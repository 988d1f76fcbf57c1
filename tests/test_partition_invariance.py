"""Same random_state, same model, however the table is partitioned: every start of every
family and every multiple imputation draws from the seed and the rows' global positions,
never from partition numbers or workers."""

import warnings

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from scipy import stats

import emdask
from emdask.engine.randomness import STREAMS, row_draws, row_uniforms


@pytest.fixture(autouse=True)
def quiet_synchronous():
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gaussian_table():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (300, 3)), rng.normal(4, 1, (300, 3))])
    X[rng.random(X.shape) < 0.1] = np.nan
    return X


@pytest.mark.parametrize("init", ["k-means||", "kmeans", "k-means++", "random_from_data", "random"])
def test_gaussian_start_and_fit_do_not_depend_on_partitions(init):
    X = gaussian_table()
    fits = [
        emdask.GaussianMixture(2, init_params=init, random_state=3, max_iter=5, tol=0)
        .fit(da.from_array(X, chunks=(600 // parts, 3)))
        for parts in (1, 3, 10)
    ]
    for other in fits[1:]:
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(other, name), getattr(fits[0], name),
                                       rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("init", ["k-means++", "random_from_data", "random"])
def test_mixed_start_and_fit_do_not_depend_on_partitions(init):
    rng = np.random.default_rng(1)
    n = 600
    z = rng.random(n) < 0.5
    frame = pd.DataFrame({
        "x": rng.normal(np.where(z, 0.0, 3.0), 1.0),
        "kind": pd.Categorical(np.where(rng.random(n) < np.where(z, 0.8, 0.2), "a", "b")),
        "visits": rng.poisson(np.where(z, 1.0, 5.0)),
    })
    frame.loc[rng.random(n) < 0.1, "x"] = np.nan
    fits = [
        emdask.MixedMixture(2, init_params=init, random_state=4, max_iter=5, tol=0)
        .fit(dd.from_pandas(frame, npartitions=parts))
        for parts in (1, 3, 10)
    ]
    for other in fits[1:]:
        for name in ("weights_", "means_", "covariances_", "category_probabilities_", "rates_"):
            np.testing.assert_allclose(getattr(other, name), getattr(fits[0], name),
                                       rtol=1e-10, atol=1e-10, err_msg=name)


# --------------------------------------------------------------------------------------
# On real clusters: 1, 3 and 10 partitions, one worker and two
# --------------------------------------------------------------------------------------

#: (partitions, workers) of every run; the first is the reference. Each partitioning and
#: each cluster appears (multiple imputations are also compared with the in-memory table).
RUNS = [(1, 1), (3, 2), (10, 1)]


@pytest.fixture(scope="module")
def clusters():
    """A one-worker and a two-worker cluster of processes, shared by the module."""
    made = {}
    try:
        for n in (1, 2):
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                host="127.0.0.1",
            )
            made[n] = (cluster, Client(cluster, set_as_default=False))
        yield {n: client for n, (_, client) in made.items()}
    finally:
        for cluster, client in made.values():
            client.close()
            cluster.close()


def on_each_run(clusters, make_input, job):
    """``job(input)`` for every run of :data:`RUNS`, on that run's cluster."""
    out = []
    for parts, workers in RUNS:
        client = clusters[workers]
        X = make_input(parts)
        assert X.npartitions == parts
        with client.as_current(), dask.config.set(scheduler=client.get):
            out.append(job(X))
    return out


def frame_input(frame):
    return lambda parts: dd.from_pandas(frame, npartitions=parts, sort=False)


def array_input(X):
    return lambda parts: da.from_array(X, chunks=(-(-X.shape[0] // parts), X.shape[1]))


def assert_same_fits(fits, names):
    for other in fits[1:]:
        assert other.n_iter_ == fits[0].n_iter_
        np.testing.assert_allclose(other.lower_bound_, fits[0].lower_bound_, rtol=1e-10)
        for name in names:
            np.testing.assert_allclose(getattr(other, name), getattr(fits[0], name),
                                       rtol=1e-10, atol=1e-10, err_msg=name)


def binary_frame(n=300, seed=5):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.4
    p = np.where(z[:, None], [0.9, 0.8, 0.2, 0.1], [0.2, 0.3, 0.7, 0.9])
    X = (rng.random((n, 4)) < p).astype(np.float64)
    X[rng.random(X.shape) < 0.1] = np.nan
    return pd.DataFrame(X, columns=["a", "b", "c", "d"])


def binomial_frame(n=300, seed=6):
    rng = np.random.default_rng(seed)
    trials = rng.integers(5, 20, n)
    p = np.where(rng.random(n) < 0.5, 0.2, 0.7)
    s = rng.binomial(trials, p).astype(np.float64)
    s[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({"successes": s, "trials": trials.astype(np.float64)})


def survey_frame(n=300, seed=7):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.5
    cols = {}
    for j, levels in enumerate([["no", "maybe", "yes"], ["a", "b"], ["x", "y", "z", "w"]]):
        p_first = np.where(z, 0.7, 0.1)
        first = rng.random(n) < p_first
        rest = rng.choice(levels[1:], n)
        col = pd.Series(np.where(first, levels[0], rest), dtype=object)
        col[rng.random(n) < 0.1] = None
        cols[f"q{j}"] = pd.Categorical(col, categories=levels)
    return pd.DataFrame(cols)


def count_frame(n=300, seed=8):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.5
    X = rng.poisson(np.where(z[:, None], [1.0, 6.0, 2.0], [5.0, 1.0, 8.0])).astype(np.float64)
    X[rng.random(X.shape) < 0.1] = np.nan
    return pd.DataFrame(X, columns=["visits", "orders", "calls"])


def mixed_frame(n=300, seed=9):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.5
    frame = pd.DataFrame({
        "x": rng.normal(np.where(z, 0.0, 3.0), 1.0),
        "y": rng.normal(np.where(z, 1.0, -1.0), 0.5),
        "kind": pd.Categorical(np.where(rng.random(n) < np.where(z, 0.8, 0.2), "a", "b")),
        "member": rng.random(n) < np.where(z, 0.8, 0.3),
        "visits": rng.poisson(np.where(z, 1.0, 5.0)).astype(np.float64),
    })
    frame["member"] = frame["member"].astype("boolean")
    for col in ("x", "y", "kind", "member", "visits"):
        frame.loc[rng.random(n) < 0.15, col] = None
    return frame


INITS = ["k-means++", "random_from_data", "random"]
PROBABILITIES = ("weights_", "probabilities_")
TABLE_CASES = {
    "bernoulli": (emdask.BernoulliMixture, binary_frame, PROBABILITIES),
    "binomial": (emdask.BinomialMixture, binomial_frame, PROBABILITIES),
    "categorical": (emdask.CategoricalMixture, survey_frame, PROBABILITIES),
    "poisson": (emdask.PoissonMixture, count_frame, ("weights_", "rates_")),
    "mixed": (
        emdask.MixedMixture, mixed_frame,
        ("weights_", "means_", "covariances_", "binary_probabilities_",
         "category_probabilities_", "rates_"),
    ),
}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_table_mixtures_fit_the_same_on_any_partitioning_and_cluster(clusters, case, init):
    estimator, table, names = TABLE_CASES[case]
    frame = table()

    def fit(X):
        return estimator(2, init_params=init, n_init=2, random_state=11, max_iter=3, tol=0).fit(X)

    assert_same_fits(on_each_run(clusters, frame_input(frame), fit), names)


GAUSSIAN_INITS = ["k-means||", "kmeans", "k-means++", "random_from_data", "random"]


@pytest.mark.parametrize(
    "estimator, init",
    # the imputer is a GaussianMixture: same starts, checked once
    [(emdask.GaussianMixture, init) for init in GAUSSIAN_INITS] + [(emdask.EMImputer, "k-means||")],
)
def test_gaussian_mixture_and_imputer_fit_the_same_on_any_partitioning_and_cluster(
    clusters, estimator, init
):
    X = gaussian_table()

    def fit(data):
        model = estimator(2, init_params=init, n_init=2, random_state=12, max_iter=3, tol=0)
        return model.fit(data)

    assert_same_fits(on_each_run(clusters, array_input(X), fit),
                     ("weights_", "means_", "covariances_"))


@pytest.mark.parametrize("kind", ["array", "frame"])
def test_multiple_imputations_do_not_depend_on_partitions_or_workers(clusters, kind):
    X = gaussian_table()
    imputer = emdask.EMImputer(2, random_state=0, max_iter=3, tol=0).fit(X)
    if kind == "array":
        make = array_input(X)
    else:
        make = frame_input(pd.DataFrame(X, columns=["a", "b", "c"]))
    runs = on_each_run(
        clusters, make,
        lambda data: [np.asarray(dask.compute(t)[0], dtype=np.float64)
                      for t in imputer.sample_imputations(data, n_imputations=2, random_state=5)],
    )
    in_memory = imputer.sample_imputations(X, n_imputations=2, random_state=5)
    miss = np.isnan(X)
    for tables in runs:
        for got, want in zip(tables, in_memory):
            np.testing.assert_array_equal(got[~miss], X[~miss])
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert not np.allclose(in_memory[0][miss], in_memory[1][miss])  # the copies differ


def test_mixed_multiple_imputations_do_not_depend_on_partitions_or_workers(clusters):
    frame = mixed_frame()
    model = emdask.MixedMixture(2, random_state=0, max_iter=20).fit(frame)
    runs = on_each_run(
        clusters, frame_input(frame),
        lambda data: [t.compute() for t in model.sample_imputations(data, 2, random_state=6)],
    )
    in_memory = model.sample_imputations(frame, 2, random_state=6)
    for tables in runs:
        for got, want in zip(tables, in_memory):
            assert not got.isna().any().any()
            got = got.reset_index(drop=True)
            for col in ("kind", "member"):
                assert got[col].tolist() == want[col].tolist(), col
            np.testing.assert_allclose(got[["x", "y", "visits"]].to_numpy(np.float64),
                                       want[["x", "y", "visits"]].to_numpy(np.float64),
                                       rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# The row-keyed draws are the right draws
# --------------------------------------------------------------------------------------


def test_every_stream_has_its_own_numbers():
    spans = sorted((s.number, s.number + s.count) for s in STREAMS.values())
    assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="no random stream named 'nope'"):
        row_uniforms(0, "nope", 0, 3)
    with pytest.raises(ValueError, match="index 1024 of random stream 'kmeans_round'"):
        row_uniforms(0, "kmeans_round", 0, 3, index=1024)


def test_a_rows_draws_depend_on_its_position_only():
    whole = row_uniforms(3, "imputation", 0, 100, width=4, index=2)
    assert whole.shape == (100, 4)
    part = row_uniforms(3, "imputation", 40, 25, width=4, index=2)
    np.testing.assert_array_equal(part, whole[40:65])
    rows = row_draws(3, "imputation", 40, 4, index=2)
    np.testing.assert_array_equal(rows(slice(5, 9)), whole[45:49])
    np.testing.assert_array_equal(rows([7, 2]), whole[[47, 42]])
    other = row_uniforms(3, "imputation", 0, 100, width=4, index=3)
    assert np.corrcoef(whole.ravel(), other.ravel())[0, 1] < 0.1
    # uniform on [0, 1): Kolmogorov-Smirnov against the uniform law, and independent slots
    u = row_uniforms(1, "imputation", 0, 20_000, width=2)
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 4 / np.sqrt(20_000)


def test_imputed_cells_follow_the_conditional_normal_computed_by_hand():
    """x0 | x1 ~ N(mu0 + s01 / s11 (x1 - mu1), s00 - s01² / s11), from the fitted mean and
    covariance; each imputation refits a bootstrap replicate, whose spread is small here."""
    rng = np.random.default_rng(21)
    n = 6000
    X = rng.multivariate_normal([1.0, -2.0], [[2.0, 1.2], [1.2, 1.5]], n)
    lost = rng.random(n) < 0.4
    X[lost, 0] = np.nan
    imputer = emdask.EMImputer(1, tol=1e-10, random_state=0).fit(X)
    mu, S = imputer.means_[0], imputer.covariances_[0]
    cond_mean = mu[0] + S[0, 1] / S[1, 1] * (X[lost, 1] - mu[1])
    cond_sd = np.sqrt(S[0, 0] - S[0, 1] ** 2 / S[1, 1])
    tables = imputer.sample_imputations(X, n_imputations=4, random_state=9)
    z = np.concatenate([(t[lost, 0] - cond_mean) / cond_sd for t in tables])
    m = z.size  # 4 x ~2400 draws
    assert abs(z.mean()) < 5 / np.sqrt(m) + 0.03  # + the replicates' spread of the mean
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2.0 / m) + 0.03
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z, np.tile(X[lost, 1], 4))[0, 1]) < 5 / np.sqrt(m)
    for t in tables:
        np.testing.assert_array_equal(t[~lost], X[~lost])


def test_imputed_counts_follow_the_poisson_law_and_binary_cells_their_probability():
    rng = np.random.default_rng(22)
    n = 4000
    X = np.column_stack([rng.poisson(3.5, n), rng.poisson(0.7, n)]).astype(np.float64)
    lost = rng.random((n, 2)) < 0.5
    X[lost] = np.nan
    model = emdask.PoissonMixture(1, random_state=0).fit(X)
    draws = model.sample_imputations(X, n_imputations=1, random_state=4)[0]
    for j in range(2):
        got = draws[lost[:, j], j]
        rate = model.rates_[0, j]
        levels = np.arange(int(got.max()) + 1)
        observed = np.array([(got == k).sum() for k in levels])
        expected = stats.poisson.pmf(levels, rate) * got.size
        expected[-1] += stats.poisson.sf(levels[-1], rate) * got.size
        keep = expected > 5
        chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, (j, observed, expected)
    B = (rng.random((n, 2)) < [0.3, 0.8]).astype(np.float64)
    B[lost] = np.nan
    bern = emdask.BernoulliMixture(1, random_state=0).fit(B)
    filled = bern.sample_imputations(B, n_imputations=1, random_state=4)[0]
    for j in range(2):
        got = filled[lost[:, j], j]
        p = bern.probabilities_[0, j]
        assert abs(got.mean() - p) < 5 * np.sqrt(p * (1 - p) / got.size)
