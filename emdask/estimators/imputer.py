"""Filling missing cells with a Gaussian mixture fitted by EM on the incomplete data."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

import dask.array as da
import dask.dataframe as dd
from sklearn.base import TransformerMixin

from ..engine import EMModel, map_fill, run_em
from ..engine.columns import is_numeric
from ..engine.data import one_blas_thread
from ..engine.randomness import stream_seeds
from ..exceptions import ConvergenceWarning, DataWarning
from .fill import FillMixin
from .gaussian import GaussianMixture

__all__ = ["EMImputer"]


class EMImputer(FillMixin, TransformerMixin, GaussianMixture):
    """Impute missing cells by their conditional expectation under a Gaussian mixture.

    The model is fitted by EM on the incomplete rows themselves (no complete-case
    deletion): with ``n_components=1`` it is the classic EM for an incomplete multivariate
    normal; with more, a mixture for multi-modal data. ``impute`` fills only the missing
    cells, with ``E[x_m | x_o]`` weighted by the row's posterior over components; observed
    cells come back bit for bit. ``transform`` is the same fill under the name a
    scikit-learn pipeline calls.

    An imputer is a :class:`~emdask.GaussianMixture` (same arguments, fitted attributes and
    methods, saved and loaded the same way) that also fills tables.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        ``'diag'`` and ``'spherical'`` assume the columns independent within a component,
        so they fill a cell from its component's mean only.
    **other arguments
        As for :class:`~emdask.GaussianMixture`.

    Attributes
    ----------
    weights_, means_, covariances_, precisions_cholesky_, converged_, n_iter_,
    lower_bound_, lower_bounds_, n_features_in_, feature_names_in_
        As for :class:`~emdask.GaussianMixture`.
    """

    @property
    def model_(self):
        """The fitted mixture behind the fills (the imputer itself)."""
        self._check_fitted()
        return self

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, X, y=None, *, columns=None, callbacks=(), **kwargs):
        """Fit the mixture on the incomplete data.

        Parameters
        ----------
        X : numpy array, pandas DataFrame, dask DataFrame or dask array
        columns : list of str, optional
            Columns of a frame to model and fill (default: every numeric column). Other
            columns are passed through ``impute`` untouched.
        callbacks, checkpoint, resume
            As for :meth:`GaussianMixture.fit`.
        """
        _warn_unmodelled_missing(X, columns)
        return super().fit(X, y, columns=columns, callbacks=callbacks, **kwargs)

    # -- filling ----------------------------------------------------------------------------

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns: the input's (an imputer keeps its columns)."""
        self._check_fitted()
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            names = np.asarray([f"x{j}" for j in range(self.n_features_in_)], dtype=object)
        if input_features is not None:
            given = np.asarray(list(input_features), dtype=object)
            if len(given) != len(names) or (
                hasattr(self, "feature_names_in_") and not np.array_equal(given, names)
            ):
                raise ValueError(
                    f"input_features {list(given)} are not the {len(names)} columns seen "
                    f"during fit ({list(names)})"
                )
            names = given
        return np.asarray(names, dtype=object)

    def transform(self, X):
        """``X`` with every missing cell of the modelled columns at its conditional mean:
        :meth:`impute`, under the name the scikit-learn transformer protocol asks for.

        Returns
        -------
        Same type as ``X``: numpy array, pandas DataFrame (same index and column order;
        other columns untouched; modelled columns keep their dtype, an integer column
        filled with the conditional mean rounded to the nearest integer, a text column of
        numbers parsed to float64: see :mod:`emdask.engine.columns`), or a lazy dask
        collection with the same partitions.
        """
        return self.impute(X)

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

        Every draw is keyed to ``random_state``, the copy and the row's global position
        (and cell), never to the partition: the same ``random_state`` gives the same copies
        however ``X`` is partitioned and whichever workers fill it.

        Parameters
        ----------
        X : the table to fill (the one the imputer was fitted on, typically)
        n_imputations : int, default=5
        random_state : int, RandomState or Generator, optional

        Returns
        -------
        list of tables of ``X``'s type (lazy for dask input)
        """
        return super().sample_imputations(X, n_imputations, random_state)

    # -- the filling hooks (:class:`~emdask.estimators.fill.FillMixin`) --------------------

    def _fill(self, X, fill):
        return map_fill(X, self._columns_of(X), fill)

    def _imputation_params(self, X, n_imputations, seed):
        return self._bootstrap_params(X, n_imputations, seed)

    @one_blas_thread
    def _bootstrap_params(self, X, n_imputations, seed):
        """The replicates' parameters, and the global position of the first row of every
        partition of ``X`` as :func:`~emdask.engine.map_fill` numbers them."""
        data = self._prepare(X, self._columns_of(X))
        family = self._make_family()
        start = self._fitted_params()
        seeds = stream_seeds(seed, "bootstrap_seeds", n_imputations)
        replicates = [EMModel(family, start, bootstrap_seed=s) for s in seeds]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            run_em(
                data,
                replicates,
                tol=self.tol,
                max_iter=self.max_iter,
                verbose=self.verbose,
                verbose_interval=self.verbose_interval,
                algorithm=self.algorithm,
            )
        # a dask collection's blocks are its partitions; numpy and pandas input is filled
        # as one block
        lazy = isinstance(X, (dd.DataFrame, da.Array))
        return [m.params for m in replicates], data.row_starts if lazy else (0,)


def _warn_unmodelled_missing(X, columns):
    """Say so when a non-numeric column has missing cells this imputer will not fill."""
    if not isinstance(X, (pd.DataFrame, dd.DataFrame)) or columns is not None:
        return
    dtypes = X.dtypes
    other = [c for c in X.columns if not is_numeric(dtypes[c])]
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
