"""Filling missing cells with a Gaussian mixture fitted by EM on the incomplete data."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd

import dask.dataframe as dd

from ..engine import EMModel, map_fill, run_em
from ..exceptions import ConvergenceWarning, DataWarning
from .base import _check_number, seed_from
from .gaussian import GaussianMixture

__all__ = ["EMImputer"]

#: Stream numbers for the draws of multiple imputation.
_BOOTSTRAP_SEEDS = 0x1A7E
_DRAW_STREAM = 0xD4A


class EMImputer:
    """Impute missing cells by their conditional expectation under a Gaussian mixture.

    The model is fitted by EM on the incomplete rows themselves (no complete-case
    deletion): with ``n_components=1`` it is the classic EM for an incomplete multivariate
    normal; with more, a mixture for multi-modal data. ``transform`` fills only the
    missing cells, with ``E[x_m | x_o]`` weighted by the row's posterior over components;
    observed cells come back bit for bit.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        ``'diag'`` and ``'spherical'`` assume the columns independent within a component,
        so they fill a cell from its component's mean only.
    tol, reg_covar, max_iter, n_init, init_params, random_state, verbose, split_every, persist
        As for :class:`~emdask.GaussianMixture`.

    Attributes
    ----------
    model_ : GaussianMixture
        The fitted mixture (its ``weights_``, ``means_``, ``covariances_`` ... are also
        available on the imputer).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when fitted on a frame.
    n_iter_, converged_, lower_bound_ : as for the mixture
    """

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="k-means||",
        random_state=None,
        verbose=0,
        split_every=8,
        persist="auto",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.random_state = random_state
        self.verbose = verbose
        self.split_every = split_every
        self.persist = persist

    get_params = GaussianMixture.get_params
    set_params = GaussianMixture.set_params
    __repr__ = GaussianMixture.__repr__
    _param_names = classmethod(GaussianMixture._param_names.__func__)

    def _mixture(self, **overrides):
        params = {k: v for k, v in self.get_params().items()}
        params.update(overrides)
        return GaussianMixture(**params)

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, X, y=None, *, columns=None, callbacks=()):
        """Fit the mixture on the incomplete data.

        Parameters
        ----------
        X : numpy array, pandas DataFrame, dask DataFrame or dask array
        columns : list of str, optional
            Columns of a frame to model and fill (default: every numeric column). Other
            columns are passed through ``transform`` untouched.
        callbacks : sequence of callables
            Called after every EM iteration (see :func:`emdask.engine.run_em`).
        """
        _warn_unmodelled_missing(X, columns)
        self.model_ = self._mixture().fit(X, columns=columns, callbacks=callbacks)
        self._columns = self.model_._columns
        self.n_features_in_ = self.model_.n_features_in_
        if hasattr(self.model_, "feature_names_in_"):
            self.feature_names_in_ = self.model_.feature_names_in_
        return self

    def __getattr__(self, name):
        # fitted parameters of the mixture, read through: weights_, means_, covariances_ ...
        if name.endswith("_") and not name.startswith("_") and "model_" in self.__dict__:
            return getattr(self.__dict__["model_"], name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def _check_fitted(self):
        if "model_" not in self.__dict__:
            raise AttributeError(f"This {type(self).__name__} instance is not fitted yet; call fit first")

    # -- filling ----------------------------------------------------------------------------

    def transform(self, X):
        """``X`` with every missing cell of the modelled columns at its conditional mean.

        Returns
        -------
        Same type as ``X``: numpy array, pandas DataFrame (same index and column order;
        other columns untouched; modelled columns as float64), or a lazy dask collection
        with the same partitions.
        """
        self._check_fitted()
        family, params = self.model_._make_family(), self.model_._fitted_params()
        columns = self.model_._columns_of(X)
        return map_fill(X, columns, lambda block, part: family.impute(block, params))

    def fit_transform(self, X, y=None, *, columns=None):
        """Fit, then fill ``X``."""
        return self.fit(X, columns=columns).transform(X)

    def sample_imputations(self, X, n_imputations=5, random_state=None):
        """Multiple imputation: ``n_imputations`` completed copies of ``X``.

        Each copy carries both sources of uncertainty, as Amelia's bootstrap EM does:
        the model is re-fitted on a Poisson bootstrap replicate of the data (row weights drawn
        from the seed and the row's position, so no resampled copy of the table is made, and
        all replicates share each pass over the data, starting from the fitted model); the
        missing cells are then drawn from their conditional distribution under that
        replicate's parameters (component from the row's posterior, then the conditional
        normal). Observed cells are unchanged in every copy.

        Parameters
        ----------
        X : the table to fill (the one the imputer was fitted on, typically)
        n_imputations : int, default=5
        random_state : int, RandomState or Generator, optional

        Returns
        -------
        list of tables of ``X``'s type (lazy for dask input)
        """
        self._check_fitted()
        _check_number("n_imputations", n_imputations, kind=numbers.Integral, low=1)
        seed = seed_from(random_state)
        params_list = self._bootstrap_params(X, n_imputations, seed)
        family = self.model_._make_family()
        columns = self.model_._columns_of(X)
        tables = []
        for b, params in enumerate(params_list):
            def draw(block, part, params=params, b=b):
                rng = np.random.default_rng([seed, _DRAW_STREAM, b, part])
                return family.sample_missing(block, params, rng)

            tables.append(map_fill(X, columns, draw))
        return tables

    def _bootstrap_params(self, X, n_imputations, seed):
        model = self.model_
        data = model._prepare(X, model._columns_of(X))
        family = model._make_family()
        start = model._fitted_params()
        seeds = np.random.SeedSequence([seed, _BOOTSTRAP_SEEDS]).generate_state(n_imputations, np.uint64)
        replicates = [EMModel(family, start, bootstrap_seed=int(s)) for s in seeds]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            run_em(data, replicates, tol=self.tol, max_iter=self.max_iter, verbose=self.verbose)
        return [m.params for m in replicates]


def _warn_unmodelled_missing(X, columns):
    """Say so when a non-numeric column has missing cells this imputer will not fill."""
    if not isinstance(X, (pd.DataFrame, dd.DataFrame)) or columns is not None:
        return
    dtypes = X.dtypes
    other = [
        c for c in X.columns
        if not (pd.api.types.is_numeric_dtype(dtypes[c]) or pd.api.types.is_bool_dtype(dtypes[c]))
    ]
    if not other:
        return
    # a dask frame would need a pass to know; its non-numeric columns are passed through
    with_missing = [c for c in other if X[c].isna().any()] if isinstance(X, pd.DataFrame) else []
    if with_missing:
        warnings.warn(
            f"column(s) {with_missing} are not numeric and are left as they are, missing "
            "cells included; fill categorical answers with CategoricalMixture or "
            "MixedMixture (impute), or encode them as numbers",
            DataWarning,
            stacklevel=3,
        )
