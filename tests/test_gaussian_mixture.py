"""GaussianMixture against scikit-learn, partition invariance, numerics and bad input."""

import warnings

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from emdask import ConvergenceWarning, DataWarning, GaussianMixture

COV_TYPES = ["full", "tied", "diag", "spherical"]


def blobs(seed, n=600, d=3, k=3, spread=4.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, (k, d))
    X = np.vstack([rng.normal(c, 1.0 + j * 0.3, (n // k, d)) for j, c in enumerate(centers)])
    A = rng.normal(size=(d, d)) * 0.3 + np.eye(d)
    return X @ A


def skewed(seed, n=500):
    """A second data set: correlated, different scales, unequal component sizes."""
    rng = np.random.default_rng(seed)
    a = rng.multivariate_normal([0, 0, 0, 0], np.diag([1, 4, 0.5, 2]) + 0.4, 350)
    b = rng.multivariate_normal([3, -2, 1, 0], np.eye(4) * 0.7, n - 350)
    return np.vstack([a, b]) * [1, 10, 0.1, 3]


def start_from_sklearn(X, k, cov_type, seed=0):
    """Initial parameters from scikit-learn's own k-means start (an independent source)."""
    ref = SkGaussianMixture(k, covariance_type=cov_type, max_iter=1, tol=0, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit(X)
    rng = np.random.default_rng(seed)
    means = X[rng.choice(len(X), k, replace=False)]
    return dict(weights_init=np.full(k, 1.0 / k), means_init=means, precisions_init=ref.precisions_)


def rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-300)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("data_set", ["blobs", "skewed"])
@pytest.mark.parametrize("n_iter", [1, 20])
def test_matches_scikit_learn(cov_type, data_set, n_iter):
    X = blobs(1) if data_set == "blobs" else skewed(2)
    k = 3 if data_set == "blobs" else 2
    init = start_from_sklearn(X, k, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=Warning)
        ref = SkGaussianMixture(k, covariance_type=cov_type, max_iter=n_iter, tol=0, **init).fit(X)
        ours = GaussianMixture(k, covariance_type=cov_type, max_iter=n_iter, tol=0, **init,
                               algorithm="em").fit(X)
    assert ours.n_iter_ == ref.n_iter_ == n_iter
    for name in ["weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"]:
        assert rel_err(getattr(ours, name), getattr(ref, name)) < 1e-8, name
    assert abs(ours.lower_bound_ - ref.lower_bound_) < 1e-8 * abs(ref.lower_bound_)
    np.testing.assert_allclose(ours.score_samples(X), ref.score_samples(X), rtol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-8)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    assert ours.bic(X) == pytest.approx(ref.bic(X), rel=1e-9)
    assert ours.aic(X) == pytest.approx(ref.aic(X), rel=1e-9)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_partition_invariance(cov_type):
    X = blobs(3, n=900, d=4)
    init = start_from_sklearn(X, 3, cov_type)
    df = pd.DataFrame(X, columns=list("abcd"))
    fits = []
    for npart in [1, 3, 17]:
        for split_every in [2, 8]:
            for kind in ["frame", "array"]:
                data = (
                    dd.from_pandas(df, npartitions=npart)
                    if kind == "frame"
                    else da.from_array(X, chunks=(-(-len(X) // npart), 4))
                )
                gm = GaussianMixture(
                    3, covariance_type=cov_type, max_iter=15, tol=0, split_every=split_every, **init
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    fits.append(gm.fit(data))
    base = fits[0]
    for gm in fits[1:]:
        assert rel_err(gm.means_, base.means_) < 1e-10
        assert rel_err(gm.covariances_, base.covariances_) < 1e-10
        assert rel_err(gm.weights_, base.weights_) < 1e-10
        assert abs(gm.lower_bound_ - base.lower_bound_) < 1e-10 * abs(base.lower_bound_)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("reg_covar", [1e-6, 0.0])
def test_log_likelihood_never_decreases(cov_type, reg_covar):
    X = skewed(5, n=800)
    gm = GaussianMixture(
        4, covariance_type=cov_type, reg_covar=reg_covar, max_iter=60, tol=0,
        init_params="random_from_data", random_state=1, algorithm="em",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
    lb = np.array(gm.lower_bounds_)
    assert len(lb) == 60
    assert np.all(np.diff(lb) >= -1e-10 * np.abs(lb[1:]))
    assert lb[-1] > lb[0]


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_large_offset_fitted_as_accurately_as_centred(cov_type):
    X = blobs(7, n=600, d=3)
    offset = np.array([1e6, 0.0, -3e5])
    init = start_from_sklearn(X, 3, cov_type)
    shifted_init = dict(init, means_init=init["means_init"] + offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = GaussianMixture(3, covariance_type=cov_type, max_iter=30, tol=0, **init).fit(X)
        b = GaussianMixture(3, covariance_type=cov_type, max_iter=30, tol=0, **shifted_init).fit(X + offset)
    # spread-sized quantities agree as closely as the offset's own rounding allows (1e6 * eps)
    np.testing.assert_allclose(b.means_ - offset, a.means_, rtol=0, atol=1e-8)
    assert rel_err(b.covariances_, a.covariances_) < 1e-8
    assert rel_err(b.weights_, a.weights_) < 1e-8


def test_fitted_attributes_and_methods_follow_scikit_learn():
    X = blobs(11, n=300, d=2)
    df = pd.DataFrame(X, columns=["spend", "visits"])
    gm = GaussianMixture(3, random_state=0).fit(df)
    assert gm.n_features_in_ == 2
    assert list(gm.feature_names_in_) == ["spend", "visits"]
    assert gm.converged_ and gm.n_iter_ >= 1
    assert gm.lower_bound_ == gm.lower_bounds_[-1]
    assert gm.weights_.shape == (3,) and gm.means_.shape == (3, 2)
    assert gm.covariances_.shape == gm.precisions_.shape == gm.precisions_cholesky_.shape == (3, 2, 2)
    np.testing.assert_allclose(
        np.einsum("kij,kjl->kil", gm.covariances_, gm.precisions_), np.broadcast_to(np.eye(2), (3, 2, 2)), atol=1e-8
    )
    labels = gm.fit_predict(df)
    np.testing.assert_array_equal(labels, gm.predict(df))
    assert gm.score(df) == pytest.approx(gm.score_samples(df).mean())
    Xs, ys = gm.sample(500)
    assert Xs.shape == (500, 2) and set(np.unique(ys)) <= {0, 1, 2}
    assert "n_components=3" in repr(gm)
    gm2 = GaussianMixture().set_params(**gm.get_params())
    assert gm2.get_params() == gm.get_params()


def test_dask_input_gives_lazy_aligned_per_row_results():
    X = blobs(12, n=600, d=3)
    df = pd.DataFrame(X, columns=list("xyz"), index=pd.RangeIndex(1000, 1600))
    ddf = dd.from_pandas(df, npartitions=4)
    gm = GaussianMixture(3, random_state=0).fit(ddf)
    labels = gm.predict(ddf)
    proba = gm.predict_proba(ddf)
    scores = gm.score_samples(ddf)
    assert isinstance(labels, dd.Series) and isinstance(proba, dd.DataFrame)
    assert labels.npartitions == ddf.npartitions
    assert labels.divisions == ddf.divisions
    computed = labels.compute()
    assert computed.index.equals(df.index)
    np.testing.assert_array_equal(computed.to_numpy(), gm.predict(df))
    np.testing.assert_allclose(proba.compute().to_numpy(), gm.predict_proba(df))
    np.testing.assert_allclose(scores.compute().to_numpy(), gm.score_samples(df))
    arr = da.from_array(X, chunks=(150, 3))
    lazy = gm.predict(arr)
    assert isinstance(lazy, da.Array) and lazy.chunks[0] == arr.chunks[0]
    np.testing.assert_array_equal(lazy.compute(), gm.predict(X))


def test_same_random_state_same_model_and_different_state_differs():
    X = blobs(13, n=900, d=3, k=4)
    a = GaussianMixture(4, random_state=42).fit(X)
    with dask.config.set(scheduler="synchronous"):
        b = GaussianMixture(4, random_state=42).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_array_equal(a.covariances_, b.covariances_)


@pytest.mark.parametrize("init", ["k-means||", "kmeans", "k-means++", "random_from_data"])
def test_initialisations_find_well_separated_components(init):
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], dtype=float)
    X = np.vstack([rng.normal(c, 1.0, (250, 2)) for c in centers])
    gm = GaussianMixture(4, init_params=init, random_state=3, n_init=3).fit(X)
    def by_position(m):
        return m[np.lexsort(m.T[::-1])]

    np.testing.assert_allclose(by_position(gm.means_), by_position(centers), atol=0.3)


def test_verbose_prints_one_line_per_iteration_and_callbacks_hear_each(capsys):
    X = blobs(14, n=300, d=2)
    heard = []
    gm = GaussianMixture(2, verbose=2, random_state=0, max_iter=5, tol=0)
    with pytest.warns(ConvergenceWarning):
        gm.fit(X, callbacks=[heard.append])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("EM iter")]
    assert len(lines) == 5 == len(heard)
    assert [h.iteration for h in heard] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h.lower_bound for h in heard], gm.lower_bounds_)
    assert "mean log-lik" in lines[0] and "change" in lines[0]


def test_callback_can_stop_the_fit():
    X = blobs(15, n=300, d=2)
    gm = GaussianMixture(2, random_state=0, max_iter=50, tol=0)
    with pytest.warns(ConvergenceWarning):
        gm.fit(X, callbacks=[lambda info: info.iteration >= 3])
    assert gm.n_iter_ == 3


def test_max_iter_0_warns_that_no_em_iteration_ran_and_keeps_the_start():
    """max_iter=0 gives the starting parameters, as scikit-learn's does, but says so: a model
    that saw no E-step is not a fitted one."""
    X = blobs(16, n=300, d=2)
    init = start_from_sklearn(X, 3, "full")
    del init["precisions_init"]  # scikit-learn's max_iter=0 fails with it (covariances_ unset)
    with pytest.warns(ConvergenceWarning, match="max_iter=0: no EM iteration ran"):
        gm = GaussianMixture(3, max_iter=0, **init).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn stays silent here
        ref = SkGaussianMixture(3, max_iter=0, **init).fit(X)
    assert gm.converged_ is False and ref.converged_ is False
    assert gm.n_iter_ == ref.n_iter_ == 0
    assert gm.lower_bound_ == -np.inf and gm.lower_bounds_ == []
    for ours, theirs, given in [(gm.means_, ref.means_, init["means_init"]),
                                (gm.weights_, ref.weights_, init["weights_init"])]:
        np.testing.assert_array_equal(ours, given)
        np.testing.assert_array_equal(theirs, given)


# -- bad input ------------------------------------------------------------------------------


def test_non_numeric_column_is_named():
    df = pd.DataFrame({"a": [1.0, 2, 3, 4], "city": ["x", "y", "z", "x"]})
    with pytest.raises(TypeError, match="city"):
        GaussianMixture(1).fit(df, columns=["a", "city"])
    # by default only numeric columns are modelled
    assert GaussianMixture(1).fit(df).feature_names_in_.tolist() == ["a"]


def test_infinite_values_name_the_column():
    df = pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [1.0, np.inf, 2, 3]})
    with pytest.raises(ValueError, match=r"\['b'\].*infinite"):
        GaussianMixture(1).fit(df)


def test_empty_table():
    with pytest.raises(ValueError, match="empty"):
        GaussianMixture(1).fit(pd.DataFrame({"a": pd.Series([], dtype=float)}))


def test_more_components_than_rows():
    with pytest.raises(ValueError, match="n_components=5"):
        GaussianMixture(5).fit(np.arange(6.0).reshape(3, 2))


def test_entirely_missing_column_is_named():
    df = pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [np.nan] * 4})
    with pytest.raises(ValueError, match=r"\['b'\].*no observed value"):
        GaussianMixture(1).fit(df)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"covariance_type": "banana"}, "covariance_type.*'full'"),
        ({"n_components": 0}, "n_components"),
        ({"tol": -1.0}, "tol"),
        ({"reg_covar": -1e-3}, "reg_covar"),
        ({"max_iter": -1}, "max_iter"),
        ({"n_init": 0}, "n_init"),
        ({"init_params": "magic"}, "init_params.*k-means"),
        ({"split_every": 1}, "split_every"),
        ({"persist": "sometimes"}, "persist"),
        ({"random_state": "seven"}, "random_state"),
    ],
)
def test_invalid_arguments_are_named_with_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**{"n_components": 1, **kwargs}).fit(blobs(1, n=30, d=2))


def test_constant_column_fits_with_a_warning():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=50), "const": 3.0})
    with pytest.warns(DataWarning, match="const"):
        gm = GaussianMixture(1).fit(df)
    assert gm.covariances_[0, 1, 1] == pytest.approx(1e-6, rel=1e-3)


def test_not_positive_definite_says_increase_reg_covar():
    X = np.column_stack([np.arange(10.0), np.arange(10.0) * 2])  # collinear
    with pytest.raises(ValueError, match="increase reg_covar"):
        GaussianMixture(1, reg_covar=0.0).fit(X)


def test_wrong_number_of_features_at_predict():
    gm = GaussianMixture(1).fit(blobs(1, n=30, d=2))
    with pytest.raises(ValueError, match="expecting 2 features"):
        gm.predict(np.zeros((3, 3)))


def test_not_fitted():
    with pytest.raises(AttributeError, match="not fitted"):
        GaussianMixture(1).predict(np.zeros((3, 2)))


def test_one_dimensional_input_says_reshape():
    with pytest.raises(ValueError, match="reshape"):
        GaussianMixture(1).fit(np.arange(10.0))
