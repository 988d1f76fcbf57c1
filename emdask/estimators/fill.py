"""Filling missing cells: one implementation behind every imputing estimator.

:class:`FillMixin` gives an estimator ``impute(X)`` (each missing cell of the modelled
columns from the fitted model: expectation, or most probable value) and
``sample_imputations(X, n)`` (multiple imputation: draws from each cell's conditional
distribution). :class:`~emdask.EMImputer` and the table mixtures (Bernoulli, Categorical,
Poisson, Mixed) fill through it; ``EMImputer.transform`` is ``impute`` under the name the
scikit-learn transformer protocol asks for.

An estimator gives two hooks: ``_fill(X, fill)`` applies ``fill(float_block,
partition_number) -> float_block`` to the modelled columns of every partition of ``X`` and
puts the result back in place; ``_imputation_params(X, n, seed)`` gives the parameters of
each of ``n`` copies and the global position of the first row of every partition.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

import dask.array as da
import dask.dataframe as dd

from ..engine.randomness import row_draws
from .base import _check_number, seed_from

__all__ = ["FillMixin"]


class _Impute:
    """Fill a block's missing cells from the model (expectation or most probable value)."""

    def __init__(self, family, params):
        self.family, self.params = family, params

    def __call__(self, block, number):
        return self.family.impute(block, self.params)


class _Draw:
    """Fill a block's missing cells with draws from their conditional distribution, keyed to
    the seed, the copy (``draw``) and each row's global position (``starts``: the first
    row of every partition)."""

    def __init__(self, family, params, seed, draw, starts):
        self.family, self.params, self.seed, self.draw = family, params, seed, draw
        self.starts = starts

    def __call__(self, block, number):
        uniforms = row_draws(
            self.seed, "imputation", self.starts[number], 1 + block.shape[1], index=self.draw
        )
        return self.family.sample_missing(block, self.params, uniforms)


def _fill_part(part, encoder, fill, partition_info=None):
    number = partition_info["number"] if partition_info else 0
    block = encoder.transform_block(part)
    if not np.isnan(block).any():
        return encoder.fill(part, block)  # nothing to fill; text numbers come back parsed
    return encoder.fill(part, fill(block, number))


def _fill_blocks(block, encoder, fill, block_info=None):
    number = block_info[0]["chunk-location"][0] if block_info else 0
    return _fill_part(block, encoder, fill, {"number": number})


def _map_fill(X, encoder, fill):
    """``X`` with ``fill`` applied to the columns ``encoder`` encodes, partition by partition,
    the filled cells decoded back into each column's own type (lazy for dask input)."""
    if isinstance(X, dd.DataFrame):
        if encoder.named:
            absent = [c for c in encoder.columns if c not in X.columns]
            if absent:
                raise KeyError(f"column(s) {absent} seen during fit are not in X")
        return X.map_partitions(_fill_part, encoder, fill, meta=encoder.filled_meta(X._meta))
    if isinstance(X, da.Array):
        arr = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X
        return arr.map_blocks(_fill_blocks, encoder, fill, dtype=arr.dtype)
    if isinstance(X, pd.DataFrame) and encoder.named:
        absent = [c for c in encoder.columns if c not in X.columns]
        if absent:
            raise KeyError(f"column(s) {absent} seen during fit are not in X")
    return _fill_part(X if isinstance(X, pd.DataFrame) else np.asarray(X), encoder, fill)


class FillMixin:
    """``impute`` and ``sample_imputations``, written once for every imputing estimator."""

    def impute(self, X):
        """``X`` with every missing cell of the modelled columns filled from its row.

        Numeric cells (Gaussian, counts) get their conditional expectation given the row's
        observed cells (weighted by the row's posterior over components); categorical and
        binary cells their most probable value given them. Observed cells come back bit for
        bit, as do the index, the column order, other columns and the dtypes (an integer
        column gets a rounded expectation; a ``category`` column gains no level unless its
        dtype lacked one the model fills in; a text column of numbers comes back parsed to
        float64: see :mod:`emdask.engine.columns`).

        Returns
        -------
        Same type as ``X``: numpy array, pandas DataFrame, or a lazy dask DataFrame / Array
        with the same partitions.
        """
        self._check_fitted()
        return self._fill(X, _Impute(self._make_family(), self._fitted_params()))

    def sample_imputations(self, X, n_imputations=5, random_state=None):
        """Multiple imputation: ``n_imputations`` completed copies of ``X``.

        In every copy each row draws a component from its posterior given the observed cells,
        then its missing cells from that component (categorical levels, binary values, counts,
        conditional normal for Gaussian cells). Observed cells are unchanged. Every draw is
        keyed to ``random_state``, the copy and the row's global position (and cell), so the
        copies do not depend on how ``X`` is partitioned (a dask DataFrame takes one pass
        counting the rows of its partitions).

        Returns
        -------
        list of tables of ``X``'s type (lazy for dask input)
        """
        self._check_fitted()
        _check_number("n_imputations", n_imputations, kind=numbers.Integral, low=1)
        seed = seed_from(random_state)
        params_list, starts = self._imputation_params(X, n_imputations, seed)
        family = self._make_family()
        return [
            self._fill(X, _Draw(family, params, seed, b, starts))
            for b, params in enumerate(params_list)
        ]

    def _fill(self, X, fill):
        """``X`` with ``fill`` applied to the modelled columns of every partition."""
        raise NotImplementedError

    def _imputation_params(self, X, n_imputations, seed):
        """``(parameters of every copy, first row of every partition)``."""
        raise NotImplementedError
