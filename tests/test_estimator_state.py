"""Every estimator owns its fitted state (``_get_state`` / ``_set_state``), is found by
name in the registry its base class fills, keeps nothing of a fit but its arguments and
declared fitted attributes, and validates its arguments as scikit-learn does."""

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import check_param_validation
from threadpoolctl import threadpool_limits

import emdask
from emdask.estimators.base import estimator_class
from emdask.exceptions import StateError

PUBLIC = [
    emdask.GaussianMixture,
    emdask.EMImputer,
    emdask.BernoulliMixture,
    emdask.BinomialMixture,
    emdask.CategoricalMixture,
    emdask.PoissonMixture,
    emdask.MixedMixture,
]


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n)
    return pd.DataFrame(
        {
            "x": rng.normal(z * 4.0, 1.0),
            "n": rng.poisson(1 + 4 * z).astype(float),
            "c": np.where(rng.random(n) < 0.3 + 0.4 * z, "u", "v"),
            "b": (rng.random(n) < 0.2 + 0.6 * z).astype(float),
        }
    )


def _input(cls, X):
    """The columns of ``X`` that ``cls`` models."""
    if cls is emdask.CategoricalMixture:
        return X[["c"]].assign(d=np.where(X["b"] == 1, "p", "q"))
    if cls is emdask.BernoulliMixture:
        return X[["b"]].assign(e=1.0 - X["b"])
    if cls in (emdask.PoissonMixture, emdask.BinomialMixture):
        return X[["n"]]
    if cls is emdask.MixedMixture:
        return X
    return X[["x", "n"]]


def _fitted(cls):
    kw = {"random_state": 0, "max_iter": 20}
    if cls is emdask.BinomialMixture:
        kw["n_trials"] = 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(2, **kw).fit(_input(cls, _table()))


def test_the_registry_knows_every_estimator_by_name_as_it_is_defined():
    for cls in PUBLIC:
        assert estimator_class(cls.__name__) is cls
        assert cls._registry_name() == cls.__name__
    assert estimator_class("BaseMixture") is None and estimator_class("os.system") is None


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_a_fit_leaves_only_arguments_and_declared_fitted_attributes(cls):
    est = _fitted(cls)
    declared = set(cls._common_fitted) | set(cls._fitted_arrays) | set(cls._fitted_meta)
    left = set(vars(est)) - set(est.get_params())
    assert left <= declared, left - declared
    arrays, meta = est._get_state()
    assert set(arrays) | set(meta) == left


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_a_state_given_to_a_clone_predicts_as_the_original(cls):
    est = _fitted(cls)
    arrays, meta = est._get_state()
    twin = clone(est)._set_state({k: a.copy() for k, a in arrays.items()}, dict(meta))
    X = _input(cls, _table(60, seed=1))
    np.testing.assert_array_equal(twin.predict_proba(X), est.predict_proba(X))
    assert twin.n_iter_ == est.n_iter_ and twin.lower_bounds_ == est.lower_bounds_


def test_set_state_refuses_what_no_fit_leaves_and_changes_nothing():
    est = _fitted(emdask.GaussianMixture)
    arrays, meta = est._get_state()
    fresh = clone(est)
    bad = dict(arrays, weights_=np.array([0.9, 0.6]))
    with pytest.raises(StateError, match=r"weights_ sums to 1\.5") as info:
        fresh._set_state(bad, meta)
    assert info.value.attr == "weights_" and info.value.in_arrays
    with pytest.raises(StateError, match=r"means_ has shape \(2, 3\) but n_components=2 and n_features_in_=2"):
        fresh._set_state(dict(arrays, means_=np.zeros((2, 3))), meta)
    with pytest.raises(StateError, match=r"predict in the fitted state is not a fitted attribute of GaussianMixture"):
        fresh._set_state(arrays, dict(meta, predict=1))
    with pytest.raises(StateError, match=r"covariances_ is not positive definite \(component 1\)"):
        cov = arrays["covariances_"].copy()
        cov[1] = -np.eye(2)
        fresh._set_state(dict(arrays, covariances_=cov), meta)
    assert not hasattr(fresh, "weights_") and not hasattr(fresh, "converged_")


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_every_argument_has_a_constraint(cls):
    assert set(cls._parameter_constraints) == set(cls().get_params())


def test_invalid_arguments_raise_scikit_learns_error_with_emdasks_message_first():
    X = np.random.default_rng(0).normal(size=(30, 2))
    with pytest.raises(InvalidParameterError, match=r"^n_components=0 must be >= 1 \(The 'n_components' parameter of GaussianMixture must be an int in the range \[1, inf\)\. Got 0 instead\.\)$"):
        emdask.GaussianMixture(0).fit(X)
    with pytest.raises(ValueError, match=r"covariance_type='round' is not one of \['full', 'tied', 'diag', 'spherical'\]"):
        emdask.GaussianMixture(covariance_type="round").fit(X)
    # a check beyond the constraints (the probabilities' shape) keeps emdask's message alone
    with pytest.raises(InvalidParameterError, match=r"^weights_init must have shape \(2,\), got \(3,\)$"):
        emdask.BernoulliMixture(2, weights_init=[0.2, 0.3, 0.5]).fit(np.ones((10, 2)))
    with pytest.raises(InvalidParameterError, match=r"The 'handle_unknown' parameter of MixedMixture must be a str among"):
        emdask.MixedMixture(handle_unknown="drop").fit(_table())
    with pytest.raises(InvalidParameterError, match=r"^n_init=0 must be >= 1"):
        emdask.select_components(emdask.GaussianMixture(n_init=0), X, [1, 2])


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_scikit_learns_parameter_validation_check_passes(cls):
    # not among check_estimator's checks; scikit-learn runs it on its own estimators
    check_param_validation(cls.__name__, cls())
