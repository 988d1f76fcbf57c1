"""Choosing the number of components in shared passes."""

import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from threadpoolctl import threadpool_limits

import emdask
from emdask import ConvergenceWarning, GaussianMixture, select_components
from emdask.engine import EMModel, prepare, run_em
from emdask.engine.kmeans import kmeans_passes


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Dask already runs one block per core: BLAS threads on top only contend (tiny
    matrices wait for busy cores), so these tests run with one BLAS thread per task."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def four_blobs(seed=0, n=1600, d=3):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0, 0], [9, 0, 0], [0, 9, 0], [0, 0, 9]], dtype=float)[:, :d]
    A = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    return np.vstack([rng.normal(c, 1.0, (n // 4, d)) @ A.T for c in centers])


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kw)


def mixture_logpdf(X, w, means, covs):
    """Row log-densities of a full-covariance Gaussian mixture with scipy."""
    comp = np.column_stack(
        [np.log(wk) + multivariate_normal(m, c).logpdf(X) for wk, m, c in zip(w, means, covs)]
    )
    return comp, logsumexp(comp, axis=1)


def test_shared_run_equals_each_model_alone_from_the_same_start():
    X = four_blobs(1, n=800)
    data = prepare(X, npartitions=4)
    rng = np.random.default_rng(3)
    starts = []
    for k in range(1, 7):
        family = GaussianMixture(k)._make_family()
        means = X[rng.choice(len(X), k, replace=False)]
        starts.append((family, family.make_params(np.full(k, 1 / k), means, np.stack([np.eye(3)] * k))))
    shared = [EMModel(f, p) for f, p in starts]
    before = data.n_passes
    run_em(data, shared, tol=1e-6, max_iter=30)
    passes = data.n_passes - before
    assert passes == max(m.n_iter for m in shared)  # one pass per iteration for all six
    assert len({m.n_iter for m in shared}) > 1  # converged models dropped out at different times
    for (family, params), m in zip(starts, shared):
        alone = EMModel(family, params)
        run_em(prepare(X, npartitions=4), [alone], tol=1e-6, max_iter=30)
        assert alone.n_iter == m.n_iter and alone.converged == m.converged
        np.testing.assert_allclose(alone.lower_bounds, m.lower_bounds, rtol=1e-10)
        for name in ("weights", "means", "covariances"):
            np.testing.assert_allclose(getattr(alone.params, name), getattr(m.params, name), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_select_components_equals_separate_fits(cov_type):
    X = four_blobs(2, n=1200)
    est = GaussianMixture(covariance_type=cov_type, init_params="random_from_data", random_state=4,
                          tol=1e-5, max_iter=40)
    res = quiet(select_components, est, X, range(1, 7))
    for k in range(1, 7):
        alone = quiet(GaussianMixture(k, covariance_type=cov_type, init_params="random_from_data",
                                      random_state=4, tol=1e-5, max_iter=40).fit, X)
        got = res.estimators_[k]
        assert got.n_iter_ == alone.n_iter_
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(got, name), getattr(alone, name), rtol=1e-10, atol=1e-12)
        row = res.table_.set_index("n_components").loc[k]
        assert row["bic"] == pytest.approx(alone.bic(X), rel=1e-12)
        assert row["aic"] == pytest.approx(alone.aic(X), rel=1e-12)
    # the shared search reads the data far less than the six fits together
    assert res.n_passes_ == 1 + 1 + 1 + max(res.table_["n_iter"]) + 1
    assert est.get_params()["n_components"] == 1 and not hasattr(est, "converged_")


def test_kmeans_parallel_start_shared_by_every_candidate():
    X = four_blobs(3, n=1200)
    est = GaussianMixture(random_state=0, tol=1e-8, max_iter=30)
    res = quiet(select_components, est, X, range(1, 7))
    # summary + k-means|| for all k at once + assignment + EM + criteria
    assert res.n_passes_ == 1 + kmeans_passes(5, 2) + 1 + max(res.table_["n_iter"]) + 1
    # each candidate equals a lone fit started from its shared starting point
    data = prepare(X)
    clones = [GaussianMixture(k, random_state=0) for k in range(1, 7)]
    jobs = [(c, c._make_family(), 0) for c in clones]
    starts = GaussianMixture._initialize_jobs(data, jobs)
    for k, start in zip(range(1, 7), starts):
        alone = quiet(GaussianMixture(k, weights_init=start.weights, means_init=start.means,
                                      precisions_init=start.precisions, tol=1e-8, max_iter=30).fit, X)
        got = res.estimators_[k]
        np.testing.assert_allclose(got.means_, alone.means_, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.covariances_, alone.covariances_, rtol=1e-9, atol=1e-10)


def test_bic_picks_four_and_matches_a_scipy_computation():
    X = four_blobs(4, n=2000)
    res = quiet(select_components, GaussianMixture(random_state=1), X, range(1, 8), "bic")
    assert res.best_n_components_ == 4
    assert res.best_estimator_ is res.estimators_[4]
    t = res.table_
    assert list(t.columns) == ["n_components", "bic", "aic", "icl", "log_likelihood",
                               "n_parameters", "n_iter", "converged", "singular",
                               "singular_reason"]
    assert list(t["n_components"]) == list(range(1, 8))
    best = res.best_estimator_
    comp, ll = mixture_logpdf(X, best.weights_, best.means_, best.covariances_)
    n, d, k = X.shape[0], X.shape[1], 4
    p = k * d * (d + 1) / 2 + k * d + k - 1
    row = t.set_index("n_components").loc[4]
    assert row["n_parameters"] == p
    assert row["log_likelihood"] == pytest.approx(ll.sum(), rel=1e-10)
    assert row["bic"] == pytest.approx(-2 * ll.sum() + p * np.log(n), rel=1e-10)
    assert row["aic"] == pytest.approx(-2 * ll.sum() + 2 * p, rel=1e-10)
    resp = np.exp(comp - ll[:, None])
    entropy = -np.sum(resp * np.log(np.maximum(resp, 1e-300)))
    assert row["icl"] == pytest.approx(row["bic"] + 2 * entropy, rel=1e-9)
    # ICL also picks 4 on well-separated components
    assert t.loc[t["icl"].idxmin(), "n_components"] == 4


def test_frames_dask_and_plot(tmp_path):
    X = four_blobs(5, n=1200)
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df["label"] = "x"  # not numeric: left out
    res = quiet(select_components, GaussianMixture(random_state=2, covariance_type="diag"),
                dd.from_pandas(df, npartitions=3), [2, 4, 3], criterion="aic")
    assert list(res.table_["n_components"]) == [2, 3, 4]
    assert res.criterion == "aic"
    assert list(res.best_estimator_.feature_names_in_) == ["a", "b", "c"]
    labels = res.best_estimator_.predict(df)
    assert labels.shape == (1200,)
    out = res.plot(tmp_path / "criterion.png")
    raw = (tmp_path / "criterion.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 2000
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_bad_arguments_are_named():
    X = four_blobs(6, n=400)
    with pytest.raises(ValueError, match="criterion"):
        select_components(GaussianMixture(), X, criterion="likelihood")
    with pytest.raises(ValueError, match="n_components"):
        select_components(GaussianMixture(), X, n_components=[])
    with pytest.raises(ValueError, match="twice"):
        select_components(GaussianMixture(), X, n_components=[2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        select_components(GaussianMixture(), X, n_components=[0, 1])
    with pytest.raises(ValueError, match="n_components=3.*means_init"):
        select_components(GaussianMixture(means_init=np.zeros((2, 3))), X, n_components=[2, 3])
    with pytest.raises(TypeError, match="mixture estimator"):
        select_components(object(), X)


def test_unconverged_candidates_warn_once():
    X = four_blobs(7, n=800)
    with pytest.warns(ConvergenceWarning, match=r"n_components=\[") as record:
        res = select_components(GaussianMixture(random_state=0, max_iter=1, tol=0), X, [1, 2, 3])
    assert sum(issubclass(w.category, ConvergenceWarning) for w in record) == 1
    assert not res.table_["converged"].any()


def test_exported():
    assert emdask.select_components is select_components
    assert "select_components" in emdask.__all__ and "load" in emdask.__all__
