"""Mixtures of discrete and mixed-type columns, fitted by map-reduce EM.

=====================  ===================================  ==========================================
estimator              columns                              fitted parameters (besides ``weights_``)
=====================  ===================================  ==========================================
BernoulliMixture       binary (0/1, bool)                   ``probabilities_`` (k, d)
BinomialMixture        successes (+ trials, or n_trials)    ``probabilities_`` (k,)
CategoricalMixture     categorical (category, str, ints)    ``probabilities_`` (k, d, max_levels)
PoissonMixture         counts                               ``rates_`` (k, d)
MixedMixture           any mix of the above + Gaussian      ``means_``, ``covariances_``,
                                                            ``binary_probabilities_``,
                                                            ``category_probabilities_``, ``rates_``
=====================  ===================================  ==========================================

All take tables of any size (numpy, pandas, dask), marginalize missing cells (NaN, None,
``pd.NA``), smooth probabilities with the pseudo-count ``alpha`` and can hold the mixing
weights fixed (``fit_weights=False``). Column values are checked as they are converted, and a
bad value stops the fit with an error naming its column (:mod:`emdask.engine.encoding`).

Categorical levels are gathered in one pass over the data before fitting, so every partition
encodes a level the same way. At ``predict`` / ``score`` time a level not seen during fit is an
error by default; ``handle_unknown='missing'`` treats it as a missing cell instead.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd

import dask.array as da
import dask.dataframe as dd
from sklearn.utils._param_validation import Interval, StrOptions

from ..engine import prepare
from ..engine.data import check_2d, partition_starts
from ..engine.encoding import (
    TableEncoder, infer_kind, is_categorical_dtype, numbers_as_text, scan_columns,
)
from ..engine.kmeans import sample_rows_many, sq_distances
from ..engine.randomness import row_draws, stream_rng
from ..exceptions import DataWarning, StateError
from ..families.discrete import (
    MISSING_MODES,
    BernoulliFamily,
    BernoulliParams,
    BinomialFamily,
    BinomialParams,
    CategoricalFamily,
    CategoricalParams,
    PoissonFamily,
    PoissonParams,
)
from ..families.gaussian import GaussianParams
from ..families.mixed import MIXED_COVARIANCE_TYPES, MIXED_KINDS, MixedFamily, MixedParams
from . import state as rules
from .base import BaseMixture, FitContext, _check_number, seed_from

__all__ = [
    "BernoulliMixture",
    "BinomialMixture",
    "CategoricalMixture",
    "MixedMixture",
    "PoissonMixture",
]

INIT_METHODS = ("k-means++", "random_from_data", "random")
#: Rows sampled (one pass) to start EM: seed rows and the spread of Gaussian columns.
INIT_SAMPLE = 2000

_KIND_OF_FAMILY = {
    "gaussian": "real",
    "bernoulli": "binary",
    "categorical": "categorical",
    "poisson": "count",
}
_FAMILY_OF_KIND = {v: k for k, v in _KIND_OF_FAMILY.items()}


# --------------------------------------------------------------------------------------
# Helpers: columns, starting values
# --------------------------------------------------------------------------------------


def _is_number_dtype(dtype):
    return not is_categorical_dtype(dtype)


def _table_columns(X, columns, default, what):
    """``(names, named, dtypes)`` of the columns to model."""
    if isinstance(X, (pd.DataFrame, dd.DataFrame)):
        dtypes = X.dtypes
        if columns is None:
            names = [c for c in X.columns if default(dtypes[c])]
            if not names:
                raise TypeError(
                    f"the table has no {what} column (columns: {list(X.columns)}); pass "
                    "columns= to choose them"
                )
        else:
            names = [columns] if isinstance(columns, (str, int)) else list(columns)
            absent = [c for c in names if c not in X.columns]
            if absent:
                raise KeyError(
                    f"column(s) {absent} not in the table; available columns: {list(X.columns)}"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"columns= names a column twice: {names}")
        return names, True, {c: dtypes[c] for c in names}
    if isinstance(X, (pd.Series, dd.Series)):
        raise TypeError("X is a Series; pass a DataFrame (e.g. s.to_frame()) instead")
    if columns is not None:
        raise ValueError("columns= selects columns of a DataFrame; slice the array instead")
    if not isinstance(X, da.Array):
        X = check_2d(X, allow_object=True)
    shape = X.shape
    if len(shape) != 2:
        raise ValueError(
            f"X must be 2-D (rows × columns), got shape {shape}. Reshape your data with "
            "X.reshape(-1, 1) for a single column"
        )
    if np.iscomplexobj(X):
        raise ValueError(f"Complex data not supported: X has dtype {X.dtype}")
    dtype = X.dtype
    names = [f"x{j}" for j in range(shape[1])]
    return names, False, {c: dtype for c in names}


def _check_probabilities(name, p, shape):
    p = np.asarray(p, dtype=np.float64)
    if p.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {p.shape}")
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"{name} must hold probabilities in [0, 1]")
    return p


def _start_binary(k, mean, seeds, rng):
    """(k, d) start probabilities: each seed row blended with the column means, or random
    probabilities about the means."""
    m = np.clip(np.nan_to_num(mean, nan=0.5), 0.0, 1.0)
    if seeds is None:
        p = rng.beta(1.0 + 8.0 * m, 1.0 + 8.0 * (1.0 - m), size=(k, m.size))
    else:
        p = 0.5 * m + 0.5 * np.where(np.isnan(seeds), m, seeds)
    return np.clip(p, 1e-3, 1.0 - 1e-3)


def _start_counts(k, mean, seeds, rng):
    """(k, d) start rates, as :func:`_start_binary`."""
    m = np.maximum(np.nan_to_num(mean, nan=1.0), 0.0)
    if seeds is None:
        rate = m * rng.gamma(4.0, 0.25, size=(k, m.size))
    else:
        rate = 0.5 * m + 0.5 * np.where(np.isnan(seeds), m, seeds)
    return rate + 1e-3 * (m + 1e-3)


def _start_levels(k, marginals, seeds, rng):
    """(k, d, max_levels) start probabilities from each column's level frequencies."""
    d = len(marginals)
    lmax = max((m.size for m in marginals), default=0)
    theta = np.zeros((k, d, lmax))
    for j, marg in enumerate(marginals):
        L = marg.size
        if seeds is None:
            t = rng.dirichlet(20.0 * marg + 0.5, size=k)
        else:
            onehot = np.tile(marg, (k, 1))
            seen = np.flatnonzero(~np.isnan(seeds[:, j]))
            onehot[seen] = 0.0
            onehot[seen, seeds[seen, j].astype(np.intp)] = 1.0
            t = 0.5 * marg + 0.5 * onehot
        t = np.maximum(t, 1e-4)
        theta[:, j, :L] = t / t.sum(axis=1, keepdims=True)
    return theta


def _start_gaussian(k, mean, var, seeds, covariance_type, reg_covar, rng):
    """Start means (seed rows, or random about the column means) and diagonal covariances
    (the column variances)."""
    d = mean.size
    var = np.where(np.isfinite(var) & (var > 0), var, 1.0)
    if seeds is None:
        means = mean + rng.standard_normal((k, d)) * np.sqrt(var)
    else:
        means = np.where(np.isnan(seeds), mean, seeds)
    diag = np.tile(var + reg_covar, (k, 1))
    if covariance_type == "full":
        return means, np.stack([np.diag(v) for v in diag])
    return means, diag


def _seeding_space(sample, kinds):
    """The sample in a space where squared distances compare rows of mixed kinds: numbers
    (real, counts) standardized, binary cells as 0/1, a categorical cell one-hot and scaled
    so that two different levels are at distance 1. Missing cells stay NaN."""
    cols = []
    for j, kind in enumerate(kinds):
        x = sample[:, j]
        if kind == "categorical":
            seen = ~np.isnan(x)
            levels = np.unique(x[seen])
            onehot = (x[:, None] == levels[None, :]) / np.sqrt(2.0)
            onehot[~seen] = np.nan
            cols.append(onehot)
        elif kind == "binary":
            cols.append(x[:, None])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column
                mean, sd = np.nanmean(x), np.nanstd(x)
            cols.append(((x - mean) / (sd if sd > 0 else 1.0))[:, None])
    return np.hstack(cols) if cols else np.zeros((sample.shape[0], 0))


def _spread_seeds(sample, kinds, k, rng):
    """``k`` rows of the sample chosen by k-means++ seeding (Arthur & Vassilvitskii, 2007):
    the first uniformly, each next one with probability proportional to its squared
    distance to the nearest row already chosen (in :func:`_seeding_space`). Small groups of
    unusual rows — the components random rows miss — get seeds."""
    Z = _seeding_space(sample, kinds)
    n = Z.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = sq_distances(Z, np.nan_to_num(Z[chosen[0]])[None, :])[:, 0]
    for _ in range(1, min(k, n)):
        total = d2.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=d2 / total))
        else:  # every row equals a seed already: any other row
            nxt = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
        chosen.append(nxt)
        d2 = np.minimum(d2, sq_distances(Z, np.nan_to_num(Z[nxt])[None, :])[:, 0])
    return sample[chosen]


def _marginals(counts, n_levels, sample_codes):
    """Smoothed level frequencies of each categorical column (from the level scan when it
    ran, else from the sample)."""
    out = []
    for j, L in enumerate(n_levels):
        if counts is not None:
            c = np.asarray(counts[j], dtype=np.float64)
        else:
            col = sample_codes[:, j]
            c = np.bincount(col[~np.isnan(col)].astype(np.intp), minlength=L).astype(np.float64)
        out.append((c + 1.0) / (c.sum() + L))
    return out


# --------------------------------------------------------------------------------------
# Per-partition filling (impute / sample_imputations)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The shared estimator
# --------------------------------------------------------------------------------------


class _TableMixture(BaseMixture):
    """What the discrete and mixed-type mixtures share: encoding of the columns (with a level
    scan before fitting), checks, starting values, per-row methods on encoded data and
    filling of missing cells.

    Subclasses give the kinds of their columns (``_column_kinds``), the family
    (``_family_from``), their fitted attributes (``_set_fitted`` / ``_fitted_params``) and
    starting values (``_start``).
    """

    _init_methods = INIT_METHODS
    _parameter_constraints: dict = {
        **BaseMixture._parameter_constraints,
        "alpha": [Interval(numbers.Real, 0.0, None, closed="left")],
        "fit_weights": ["boolean"],
        "init_params": [StrOptions(set(INIT_METHODS))],
    }
    _singular_advice = (
        "Use fewer components or a larger alpha (pseudo-count); for Gaussian columns a "
        "larger reg_covar on the data's scale."
    )
    #: pick the columns of a frame when ``columns=None``
    _default_column = staticmethod(_is_number_dtype)
    _what = "numeric"
    #: whether text columns of numbers are read as numbers (else they stay categorical)
    _parse_text = False

    # -- encoder --------------------------------------------------------------------------

    def _column_kinds(self, names, dtypes):
        """``(kinds, to_scan_levels, to_scan_ranges)`` for the chosen columns."""
        raise NotImplementedError

    def _kinds_after_scan(self, names, kinds, ranges):
        return kinds

    def _encoder_options(self):
        return {}

    def _prepare_fit(self, X, columns):
        """Scan the columns (kinds, levels: the encoding), then prepare the encoded data."""
        names, named, dtypes = _table_columns(X, columns, self._default_column, self._what)
        kinds, cat, ranged = self._column_kinds(names, dtypes)
        levels, counts, ranges, n_passes = scan_columns(
            X, names, cat, ranged, split_every=self.split_every, parse_text=self._parse_text
        )
        kinds = self._kinds_after_scan(names, kinds, ranges)
        if self._parse_text:
            kinds = numbers_as_text(names, kinds, levels, dtypes, self.column_families)
        encoder = TableEncoder(
            names,
            kinds,
            levels,
            named=named,
            model=type(self).__name__,
            **self._encoder_options(),
        )
        return FitContext(
            self._prepare_encoded(X, encoder),
            encoder=encoder,
            level_counts=[counts[c] for c, k in zip(names, kinds) if k == "categorical"],
            scan_passes=n_passes,
        )

    def _fitted_encoder(self):
        names = self._fitted_names()
        return TableEncoder(
            names,
            self._fitted_kinds(names),
            self._fitted_categories(names),
            named=getattr(self, "_columns", None) is not None,
            model=type(self).__name__,
            **self._encoder_options(),
        )

    def _fitted_names(self):
        cols = getattr(self, "_columns", None)
        return list(cols) if cols is not None else [f"x{j}" for j in range(self.n_features_in_)]

    def _fitted_kinds(self, names):
        raise NotImplementedError

    def _fitted_categories(self, names):
        return {}

    def _encoder(self):
        """The encoding of the fitted columns; ``None`` before any fit."""
        if hasattr(self, "n_features_in_"):
            return self._fitted_encoder()
        return None

    # -- base hooks -------------------------------------------------------------------------

    def fit(self, X, y=None, *, columns=None, **kwargs):
        """Estimate the model parameters with EM.

        Parameters
        ----------
        X : array-like or dask collection of shape (n_rows, n_features)
            numpy array, pandas DataFrame, dask DataFrame or dask array. NaN, None and
            ``pd.NA`` mark a missing cell.
        y : ignored
        columns : list of str, optional
            Columns of a frame to model (default: see the class).
        callbacks, checkpoint, resume
            As for :meth:`emdask.GaussianMixture.fit`.

        Returns
        -------
        self
        """
        return super().fit(X, y, columns=columns, **kwargs)

    def _prepare(self, X, columns, persist=None):
        """The data of ``X`` encoded as the fitted model encodes it (scoring)."""
        return self._prepare_encoded(X, self._encoder(), persist)

    def _prepare_encoded(self, X, encoder, persist=None):
        encoded = encoder.transform(X)
        return prepare(
            encoded,
            encoder.columns if isinstance(encoded, (pd.DataFrame, dd.DataFrame)) else None,
            allow_nan=True,
            persist=self.persist if persist is None else persist,
            npartitions=None,
            split_every=self.split_every,
        )

    def _check_parameters(self):
        super()._check_parameters()
        _check_number("alpha", self.alpha, low=0.0)
        if not isinstance(self.fit_weights, (bool, np.bool_)):
            raise ValueError(f"fit_weights={self.fit_weights!r} must be True or False")
        if getattr(self, "missing", "marginalize") not in MISSING_MODES:
            raise ValueError(f"missing={self.missing!r} is not one of {list(MISSING_MODES)}")
        if self.weights_init is not None:
            k = self.n_components
            w = np.asarray(self.weights_init, dtype=np.float64)
            if w.shape != (k,):
                raise ValueError(f"weights_init must have shape ({k},), got {w.shape}")
            if np.any(w < 0) or np.any(w > 1) or not np.isclose(w.sum(), 1.0):
                raise ValueError("weights_init must be in [0, 1] and sum to 1")

    def _check_data(self, context):
        data = context.data
        informative = data.n_rows - data.summary.n_empty_rows
        if self.n_components > informative:
            raise ValueError(
                f"n_components={self.n_components} must be <= the number of rows with an "
                f"observed value ({informative})"
            )
        self._check_init_shapes(context.encoder)

    def _check_init_shapes(self, encoder):
        """Subclass checks of the user's starting values against the columns."""

    def _check_starting_values(self):
        super()._check_starting_values()
        self._check_init_shapes(self._fitted_encoder())

    def _take_context(self, context):
        self._set_encoding(context.encoder)

    def _family_for(self, context):
        return self._family_from(context.encoder)

    def _set_fitted(self, params):
        self._set_params(params)

    def _set_encoding(self, encoder):
        """Store the encoding in the fitted attributes (``categories_``, ...)."""

    def _make_family(self):
        return self._family_from(self._encoder())

    def _rows(self, X, fn, n_out=None, dtype=np.float64, out_columns=None):
        self._check_fitted()
        return super()._rows(self._encoder().transform(self._checked(X)), fn, n_out, dtype,
                             out_columns)

    def _checked(self, X):
        """An array-like ``X`` as a 2-D array with the fitted number of columns (frames and
        dask collections are checked by column name when encoded)."""
        if isinstance(X, (pd.DataFrame, dd.DataFrame, da.Array)):
            return X
        if isinstance(X, (pd.Series, dd.Series)):
            raise TypeError("X is a Series; pass a DataFrame (e.g. s.to_frame()) instead")
        X = check_2d(X, allow_object=True)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        return X

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # category labels of any type; the discrete families check their values' domain
        # (0/1, counts, levels) themselves
        tags.input_tags.string = self._what in ("categorical", "modellable")
        return tags

    def _weights_start(self):
        if self.weights_init is not None:
            return np.asarray(self.weights_init, dtype=np.float64)
        return np.full(self.n_components, 1.0 / self.n_components)

    # -- starting values --------------------------------------------------------------------

    def _given_start(self, family):
        """Parameters from the user's starting values when they fix every parameter, else
        ``None`` (then a sample of the data is drawn)."""
        return None

    def _start(self, data, family, context, sample, seeds, rng):
        raise NotImplementedError

    @classmethod
    def _initialize_jobs(cls, data, jobs, context=None):
        """Starting values of every job; the row samples of all restarts and candidates
        come from one pass."""
        sizes = {}
        for est, family, seed in jobs:
            if est._given_start(family) is None:
                size = max(INIT_SAMPLE, 10 * est.n_components)
                sizes[seed] = max(size, sizes.get(seed, 0))
        shift = np.full(data.n_features, np.nan)  # keep missing cells missing
        samples = sample_rows_many(data, sizes, shift) if sizes else {}
        starts = []
        for est, family, seed in jobs:
            given = est._given_start(family)
            if given is not None:
                starts.append(given)
                continue
            sample = samples[seed]
            rng = stream_rng(seed, "table_init")
            seeds = None
            if est.init_params == "random_from_data":
                seeds = sample[: est.n_components]
            elif est.init_params == "k-means++":
                seeds = _spread_seeds(sample, context.encoder.kinds, est.n_components, rng)
            starts.append(est._start(data, family, context, sample, seeds, rng))
        return starts

    # -- drawing and filling ----------------------------------------------------------------

    def _decode_sample(self, X):
        encoder = self._encoder()
        if encoder.named:
            return encoder.decoded_frame(X)
        return encoder.decoded_array(X)

    def sample(self, n_samples=1):
        """Draw rows from the fitted model.

        Returns
        -------
        X : pandas DataFrame (fitted on a frame; categorical columns as ``category``) or
            ndarray of shape (n_samples, n_features)
        labels : ndarray of shape (n_samples,)
        """
        X, labels = super().sample(n_samples)
        return self._decode_sample(X), labels


class _FillMixin:
    """``impute`` and ``sample_imputations`` for the product-form mixtures."""

    def impute(self, X):
        """``X`` with every missing cell of the modelled columns filled from its row.

        Numeric cells (Gaussian, counts) get their conditional expectation given the row's
        observed cells; categorical and binary cells their most probable value given them.
        Observed cells are unchanged, as are the index, the column order, other columns and
        the dtypes (an integer column gets a rounded expectation; a ``category`` column gains
        no level unless its dtype lacked one the model fills in).

        Returns
        -------
        Same type as ``X``: numpy array, pandas DataFrame, or a lazy dask DataFrame / Array
        with the same partitions.
        """
        self._check_fitted()
        fill = _Impute(self._make_family(), self._fitted_params())
        return _map_fill(self._checked(X), self._encoder(), fill)

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
        family, params, encoder = self._make_family(), self._fitted_params(), self._encoder()
        X = self._checked(X)
        starts = partition_starts(X)
        return [
            _map_fill(X, encoder, _Draw(family, params, seed, b, starts))
            for b in range(n_imputations)
        ]


# --------------------------------------------------------------------------------------
# Bernoulli
# --------------------------------------------------------------------------------------

_COMMON_DOC = """
    alpha : float, default=1e-6
        Pseudo-count added to every count in the M-step (a Dirichlet / Beta prior), so no
        probability is ever exactly 0; use 1.0 for Laplace smoothing on small data and 0 for
        the maximum-likelihood estimate.
    fit_weights : bool, default=True
        ``False`` holds the mixing weights at ``weights_init`` (uniform by default), for
        models where the latent choice is known to be uniform.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood per row.
    max_iter : int, default=100
    n_init : int, default=1
        Restarts; they share each pass over the data and the best is kept.
    init_params : {'k-means++', 'random_from_data', 'random'}, default='k-means++'
        ``'k-means++'`` starts each component from a row of a uniform sample chosen by
        k-means++ seeding (each next row with probability proportional to its squared
        distance to the rows already chosen, numbers standardized and levels one-hot),
        blended half and half with the column marginals: small groups of unusual rows get a
        component to start from, which uniformly drawn rows miss (``benchmarks/starts.py``:
        on the epil seizure counts, 65% of restarts reach the best optimum against 10% for
        ``'random_from_data'``; as often or more on the other families measured). ``'random_from_data'`` takes uniformly drawn rows instead;
        ``'random'`` draws the parameters at random about the marginals. Each way one pass
        draws the sample; restarts and candidates share it.
    weights_init : array-like of shape (n_components,), optional
    random_state : int, RandomState or Generator, optional
    verbose : int, default=0
        ``1`` prints a line every ``verbose_interval`` iterations and at the last one;
        ``2`` every iteration.
    verbose_interval : int, default=10
    split_every : int, default=8
        Fan-in of the tree reduction of the statistics.
    persist : {'auto', True, False}, default='auto'
        Keep the converted data in memory between iterations.
    algorithm : {'em', 'squarem'}, default='squarem'
        Plain EM, or EM accelerated by SQUAREM (same fixed point, usually far fewer
        passes; see :class:`emdask.GaussianMixture`)."""


class _SimpleTableMixture(_FillMixin, _TableMixture):
    """Mixtures whose columns are all of one kind (binary or counts)."""

    _kind = "binary"

    def _column_kinds(self, names, dtypes):
        return [self._kind] * len(names), [], []

    def _fitted_kinds(self, names):
        return [self._kind] * len(names)

    def _encoder_options(self):
        return {}

    def _n_features(self, encoder):
        return 0 if encoder is None else len(encoder.columns)


class BernoulliMixture(_SimpleTableMixture):
    """Mixture of independent Bernoulli distributions over binary columns.

    Columns hold 0/1 or booleans; NaN / None / ``pd.NA`` mark a missing cell, left out of the
    row's likelihood. With a frame, ``fit(columns=None)`` takes every numeric and boolean
    column.

    Parameters
    ----------
    n_components : int, default=1
    missing : {'marginalize', 'expected'}, default='marginalize'
        ``'marginalize'`` leaves a missing cell out of its row's likelihood;
        ``'expected'`` treats it as a hidden variable whose expected value the E-step adds
        (the textbook form of EM: same estimate, slower convergence).
    probabilities_init : array-like of shape (n_components, n_features), optional
    """ + _COMMON_DOC + """

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    probabilities_ : ndarray of shape (n_components, n_features)
        Probability of a 1 in each column, per component.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_, feature_names_in_,
    n_passes_ : as for :class:`~emdask.GaussianMixture`
    """

    _kind = "binary"
    _parameter_constraints: dict = {
        **_TableMixture._parameter_constraints,
        "missing": [StrOptions(set(MISSING_MODES))],
        "probabilities_init": ["array-like", None],
    }
    _fitted_arrays = ("weights_", "probabilities_")

    def __init__(
        self,
        n_components=1,
        *,
        alpha=1e-6,
        fit_weights=True,
        missing="marginalize",
        tol=1e-3,
        max_iter=100,
        n_init=1,
        init_params="k-means++",
        weights_init=None,
        probabilities_init=None,
        random_state=None,
        verbose=0,
        verbose_interval=10,
        split_every=8,
        persist="auto",
        algorithm="squarem",
    ):
        self.n_components = n_components
        self.alpha = alpha
        self.fit_weights = fit_weights
        self.missing = missing
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.probabilities_init = probabilities_init
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.split_every = split_every
        self.persist = persist
        self.algorithm = algorithm

    def _family_from(self, encoder):
        return BernoulliFamily(
            self.n_components,
            self._n_features(encoder),
            alpha=self.alpha,
            fit_weights=self.fit_weights,
            missing=self.missing,
        )

    def _check_init_shapes(self, encoder):
        if self.probabilities_init is not None:
            _check_probabilities(
                "probabilities_init",
                self.probabilities_init,
                (self.n_components, len(encoder.columns)),
            )

    def _given_start(self, family):
        if self.probabilities_init is None:
            return None
        return family.make_params(self._weights_start(), self.probabilities_init)

    def _start(self, data, family, context, sample, seeds, rng):
        p = _start_binary(self.n_components, data.summary.col_mean, seeds, rng)
        if self.probabilities_init is not None:
            p = np.asarray(self.probabilities_init, dtype=np.float64)
        return family.make_params(self._weights_start(), p)

    def _array_rules(self, k, d, meta):
        return {
            "weights_": ((k,), f"n_components={k}", rules.weights_problem),
            "probabilities_": ((k, d), f"n_components={k} and n_features_in_={d}",
                               rules.probabilities_problem),
        }

    def _set_params(self, params):
        self.weights_ = params.weights
        self.probabilities_ = params.probabilities

    def _fitted_params(self):
        return BernoulliParams(
            np.asarray(self.weights_, dtype=np.float64),
            np.asarray(self.probabilities_, dtype=np.float64),
        )


class PoissonMixture(_SimpleTableMixture):
    """Mixture of independent Poisson distributions over count columns.

    Columns hold non-negative whole numbers; NaN / None / ``pd.NA`` mark a missing cell.
    With a frame, ``fit(columns=None)`` takes every numeric column.

    Parameters
    ----------
    n_components : int, default=1
    missing : {'marginalize', 'expected'}, default='marginalize'
        As for :class:`BernoulliMixture`.
    rates_init : array-like of shape (n_components, n_features), optional
    """ + _COMMON_DOC.replace(
        "Pseudo-count added to every count in the M-step (a Dirichlet / Beta prior), so no\n"
        "        probability is ever exactly 0; use 1.0 for Laplace smoothing on small data and 0 for\n"
        "        the maximum-likelihood estimate.",
        "``alpha`` pseudo-rows with one event each are added to every rate's estimate (a\n"
        "        Gamma prior), so no rate is ever exactly 0; 0 gives the maximum-likelihood estimate.",
    ) + """

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    rates_ : ndarray of shape (n_components, n_features)
        Mean count of each column, per component.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_, feature_names_in_,
    n_passes_ : as for :class:`~emdask.GaussianMixture`
    """

    _kind = "count"
    _parameter_constraints: dict = {
        **_TableMixture._parameter_constraints,
        "missing": [StrOptions(set(MISSING_MODES))],
        "rates_init": ["array-like", None],
    }
    _fitted_arrays = ("weights_", "rates_")

    def __init__(
        self,
        n_components=1,
        *,
        alpha=1e-6,
        fit_weights=True,
        missing="marginalize",
        tol=1e-3,
        max_iter=100,
        n_init=1,
        init_params="k-means++",
        weights_init=None,
        rates_init=None,
        random_state=None,
        verbose=0,
        verbose_interval=10,
        split_every=8,
        persist="auto",
        algorithm="squarem",
    ):
        self.n_components = n_components
        self.alpha = alpha
        self.fit_weights = fit_weights
        self.missing = missing
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.rates_init = rates_init
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.split_every = split_every
        self.persist = persist
        self.algorithm = algorithm

    def _family_from(self, encoder):
        return PoissonFamily(
            self.n_components,
            self._n_features(encoder),
            alpha=self.alpha,
            fit_weights=self.fit_weights,
            missing=self.missing,
        )

    def _check_init_shapes(self, encoder):
        if self.rates_init is not None:
            shape = (self.n_components, len(encoder.columns))
            r = np.asarray(self.rates_init, dtype=np.float64)
            if r.shape != shape:
                raise ValueError(f"rates_init must have shape {shape}, got {r.shape}")
            if np.any(~np.isfinite(r)) or np.any(r < 0):
                raise ValueError("rates_init must hold finite non-negative rates")

    def _given_start(self, family):
        if self.rates_init is None:
            return None
        return family.make_params(self._weights_start(), self.rates_init)

    def _start(self, data, family, context, sample, seeds, rng):
        return family.make_params(
            self._weights_start(),
            _start_counts(self.n_components, data.summary.col_mean, seeds, rng),
        )

    def _array_rules(self, k, d, meta):
        return {
            "weights_": ((k,), f"n_components={k}", rules.weights_problem),
            "rates_": ((k, d), f"n_components={k} and n_features_in_={d}", rules.rates_problem),
        }

    def _set_params(self, params):
        self.weights_ = params.weights
        self.rates_ = params.rates

    def _fitted_params(self):
        return PoissonParams(
            np.asarray(self.weights_, dtype=np.float64), np.asarray(self.rates_, dtype=np.float64)
        )


# --------------------------------------------------------------------------------------
# Binomial
# --------------------------------------------------------------------------------------


class BinomialMixture(_TableMixture):
    """Mixture of binomial distributions: successes out of trials, one success probability
    per component.

    ``fit(X, columns=[successes, trials])`` takes a successes column and a trials column
    (a 2-column array: successes first); with a fixed ``n_trials``, one successes column.
    A row missing either value carries no information.

    Parameters
    ----------
    n_components : int, default=1
    n_trials : int, optional
        The same number of trials for every row (then X has only the successes column).
    probabilities_init : array-like of shape (n_components,), optional
    """ + _COMMON_DOC + """

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    probabilities_ : ndarray of shape (n_components,)
        Success probability of each component.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_, feature_names_in_,
    n_passes_ : as for :class:`~emdask.GaussianMixture`
    """

    _parameter_constraints: dict = {
        **_TableMixture._parameter_constraints,
        "n_trials": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "probabilities_init": ["array-like", None],
    }
    _fitted_arrays = ("weights_", "probabilities_")

    def __init__(
        self,
        n_components=1,
        *,
        n_trials=None,
        alpha=1e-6,
        fit_weights=True,
        tol=1e-3,
        max_iter=100,
        n_init=1,
        init_params="k-means++",
        weights_init=None,
        probabilities_init=None,
        random_state=None,
        verbose=0,
        verbose_interval=10,
        split_every=8,
        persist="auto",
        algorithm="squarem",
    ):
        self.n_components = n_components
        self.n_trials = n_trials
        self.alpha = alpha
        self.fit_weights = fit_weights
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.probabilities_init = probabilities_init
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.split_every = split_every
        self.persist = persist
        self.algorithm = algorithm

    def _check_parameters(self):
        super()._check_parameters()
        if self.n_trials is not None:
            _check_number("n_trials", self.n_trials, kind=numbers.Integral, low=1)

    def _kinds(self):
        return ["successes"] if self.n_trials is not None else ["successes", "trials"]

    def _column_kinds(self, names, dtypes):
        kinds = self._kinds()
        if len(names) != len(kinds):
            need = (
                "one column of successes (n_trials is fixed)"
                if self.n_trials is not None
                else "a successes column and a trials column"
            )
            raise ValueError(
                f"BinomialMixture needs {need}, got {len(names)} column(s) {names}; pass "
                "columns=[successes, trials] (or set n_trials and pass columns=[successes])"
            )
        return kinds, [], []

    def _fitted_kinds(self, names):
        return self._kinds()

    def _encoder_options(self):
        return {"n_trials": self.n_trials}

    def _family_from(self, encoder):
        return BinomialFamily(
            self.n_components, self.n_trials, alpha=self.alpha, fit_weights=self.fit_weights
        )

    def _check_init_shapes(self, encoder):
        if self.probabilities_init is not None:
            _check_probabilities("probabilities_init", self.probabilities_init, (self.n_components,))

    def _given_start(self, family):
        if self.probabilities_init is None:
            return None
        return family.make_params(self._weights_start(), self.probabilities_init)

    def _start(self, data, family, context, sample, seeds, rng):
        s = data.summary
        trials = float(self.n_trials) if self.n_trials is not None else s.col_mean[1]
        m = float(np.clip(s.col_mean[0] / trials if trials > 0 else 0.5, 0.0, 1.0))
        if seeds is None:
            p = rng.beta(1.0 + 8.0 * m, 1.0 + 8.0 * (1.0 - m), size=self.n_components)
        else:
            n = np.full(seeds.shape[0], trials) if self.n_trials is not None else seeds[:, 1]
            with np.errstate(invalid="ignore", divide="ignore"):
                own = seeds[:, 0] / n
            p = 0.5 * m + 0.5 * np.where(np.isfinite(own), own, m)
        return family.make_params(self._weights_start(), np.clip(p, 1e-3, 1.0 - 1e-3))

    def _check_state_meta(self, meta):
        columns = 1 if self.n_trials is not None else 2
        if meta["n_features_in_"] != columns:
            raise StateError(
                "n_features_in_",
                f"= {meta['n_features_in_']}, but a BinomialMixture with n_trials={self.n_trials} "
                f"models {columns} column(s) (successes{'' if columns == 1 else ', trials'})",
            )

    def _array_rules(self, k, d, meta):
        return {
            "weights_": ((k,), f"n_components={k}", rules.weights_problem),
            "probabilities_": ((k,), f"n_components={k}", rules.probabilities_problem),
        }

    def _set_params(self, params):
        self.weights_ = params.weights
        self.probabilities_ = params.probabilities

    def _fitted_params(self):
        return BinomialParams(
            np.asarray(self.weights_, dtype=np.float64),
            np.asarray(self.probabilities_, dtype=np.float64),
        )

    def sample(self, n_samples=1, trials=None):
        """Draw rows; returns ``(X, labels)``.

        Parameters
        ----------
        n_samples : int
        trials : array-like of shape (n_samples,), optional
            Trials of each row; needed unless ``n_trials`` is fixed.
        """
        self._check_fitted()
        _check_number("n_samples", n_samples, kind=numbers.Integral, low=1)
        if trials is not None and np.shape(trials) != (n_samples,):
            raise ValueError(f"trials must have shape ({n_samples},), got {np.shape(trials)}")
        rng = np.random.default_rng(seed_from(self.random_state))
        X, labels = self._make_family().sample(self._fitted_params(), n_samples, rng, trials)
        return self._decode_sample(X), labels


# --------------------------------------------------------------------------------------
# Categorical (latent class analysis)
# --------------------------------------------------------------------------------------


def _probabilities_table(value, k, n_levels, name):
    """A (k, d, max_levels) table from a padded array or a list of (k, levels_j) arrays."""
    d, lmax = len(n_levels), max(n_levels, default=0)
    if isinstance(value, (list, tuple)) and len(value) == d and all(
        np.ndim(v) == 2 for v in value
    ):
        table = np.zeros((k, d, lmax))
        for j, (v, L) in enumerate(zip(value, n_levels)):
            v = np.asarray(v, dtype=np.float64)
            if v.shape != (k, L):
                raise ValueError(f"{name}[{j}] must have shape ({k}, {L}), got {v.shape}")
            table[:, j, :L] = v
    else:
        table = np.asarray(value, dtype=np.float64)
        if table.shape != (k, d, lmax):
            raise ValueError(
                f"{name} must have shape ({k}, {d}, {lmax}) (zero-padded), or be a list of "
                f"{d} arrays of shape ({k}, levels), got {table.shape}"
            )
    for j, L in enumerate(n_levels):
        t = table[:, j, :L]
        if np.any(~np.isfinite(t)) or np.any(t < 0) or not np.allclose(t.sum(axis=1), 1.0):
            raise ValueError(
                f"{name} of column {j} must hold probabilities that sum to 1 over its {L} levels"
            )
        if np.any(table[:, j, L:] != 0):
            raise ValueError(f"{name} of column {j} must be 0 beyond its {L} levels")
    return table


class CategoricalMixture(_FillMixin, _TableMixture):
    """Latent class model: a mixture of independent categorical distributions.

    Columns may be pandas ``category``, strings, booleans or small integers; levels are
    gathered in one pass before fitting and kept in ``categories_`` (a ``category``
    column keeps its declared order, other levels are sorted). With a frame,
    ``fit(columns=None)`` takes every column. A column with more than 1000 levels draws a
    :class:`~emdask.DataWarning`.

    Parameters
    ----------
    n_components : int, default=1
    handle_unknown : {'error', 'missing'}, default='error'
        What a level not seen during fit becomes in ``predict``, ``score``, ``impute``...:
        an error naming the column and the level, or a missing cell.
    missing : {'marginalize', 'expected'}, default='marginalize'
        As for :class:`BernoulliMixture`.
    probabilities_init : array-like, optional
        Shape (n_components, n_features, max_levels), zero-padded, or a list of one
        (n_components, levels_j) array per column, levels in the order of ``categories_``.
    """ + _COMMON_DOC + """

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    probabilities_ : ndarray of shape (n_components, n_features, max_levels)
        ``probabilities_[c, j, l]``: probability of level ``categories_[j][l]`` in column
        ``j`` for component ``c`` (0 beyond the column's levels).
    categories_ : list of lists
        Levels of each column.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_, feature_names_in_,
    n_passes_ : as for :class:`~emdask.GaussianMixture` (``n_passes_`` counts the level
    scan)
    """

    _parameter_constraints: dict = {
        **_TableMixture._parameter_constraints,
        "handle_unknown": [StrOptions({"error", "missing"})],
        "missing": [StrOptions(set(MISSING_MODES))],
        "probabilities_init": ["array-like", None],
    }
    _fitted_arrays = ("weights_", "probabilities_")
    _fitted_meta = ("categories_",)
    _default_column = staticmethod(lambda dtype: True)
    _what = "categorical"

    def __init__(
        self,
        n_components=1,
        *,
        alpha=1e-6,
        fit_weights=True,
        handle_unknown="error",
        missing="marginalize",
        tol=1e-3,
        max_iter=100,
        n_init=1,
        init_params="k-means++",
        weights_init=None,
        probabilities_init=None,
        random_state=None,
        verbose=0,
        verbose_interval=10,
        split_every=8,
        persist="auto",
        algorithm="squarem",
    ):
        self.n_components = n_components
        self.alpha = alpha
        self.fit_weights = fit_weights
        self.handle_unknown = handle_unknown
        self.missing = missing
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.probabilities_init = probabilities_init
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.split_every = split_every
        self.persist = persist
        self.algorithm = algorithm

    def _check_parameters(self):
        super()._check_parameters()
        if self.handle_unknown not in ("error", "missing"):
            raise ValueError(
                f"handle_unknown={self.handle_unknown!r} is not one of ['error', 'missing']"
            )

    def _column_kinds(self, names, dtypes):
        return ["categorical"] * len(names), list(names), []

    def _fitted_kinds(self, names):
        return ["categorical"] * len(names)

    def _fitted_categories(self, names):
        return {c: list(levels) for c, levels in zip(names, self.categories_)}

    def _set_encoding(self, encoder):
        self.categories_ = [list(encoder.categories[c]) for c in encoder.columns]

    def _encoder_options(self):
        return {"handle_unknown": self.handle_unknown}

    def _family_from(self, encoder):
        n_levels = () if encoder is None else encoder.n_levels
        return CategoricalFamily(
            self.n_components,
            n_levels,
            alpha=self.alpha,
            fit_weights=self.fit_weights,
            missing=self.missing,
        )

    def _check_init_shapes(self, encoder):
        if self.probabilities_init is not None:
            _probabilities_table(
                self.probabilities_init, self.n_components, encoder.n_levels, "probabilities_init"
            )

    def _given_start(self, family):
        if self.probabilities_init is None:
            return None
        table = _probabilities_table(
            self.probabilities_init, self.n_components, family.n_levels, "probabilities_init"
        )
        return family.make_params(self._weights_start(), table)

    def _start(self, data, family, context, sample, seeds, rng):
        marginals = _marginals(context.level_counts, family.n_levels, sample)
        theta = _start_levels(self.n_components, marginals, seeds, rng)
        return family.make_params(self._weights_start(), theta)

    def _check_state_meta(self, meta):
        rules.require(meta, self._fitted_meta)
        cats, d = meta["categories_"], meta["n_features_in_"]
        if not isinstance(cats, list):
            raise StateError("categories_", "must be a list of the levels of every column")
        if len(cats) != d:
            raise StateError("categories_", f"lists the levels of {len(cats)} columns but n_features_in_={d}")
        for j, levels in enumerate(cats):
            rules.check_levels(levels, f"categories_[{j}]")

    def _array_rules(self, k, d, meta):
        n_levels = [len(levels) for levels in meta["categories_"]]
        lmax = max(n_levels, default=0)
        why = f"n_components={k} and categories_ ({d} columns, at most {lmax} levels)"
        return {
            "weights_": ((k,), f"n_components={k}", rules.weights_problem),
            "probabilities_": ((k, d, lmax), why, rules.levels_problem(n_levels)),
        }

    def _set_params(self, params):
        self.weights_ = params.weights
        self.probabilities_ = params.probabilities

    def _fitted_params(self):
        return CategoricalParams(
            np.asarray(self.weights_, dtype=np.float64),
            np.asarray(self.probabilities_, dtype=np.float64),
        )


# --------------------------------------------------------------------------------------
# Mixed
# --------------------------------------------------------------------------------------


class MixedMixture(_FillMixin, _TableMixture):
    """One latent segment variable over a table of mixed column types.

    Within a segment, Gaussian columns follow a multivariate normal (``'diag'`` or
    ``'full'`` covariance), categorical columns categorical distributions, binary columns
    Bernoulli distributions and count columns Poisson distributions, all independent of
    each other given the segment. Missing cells are marginalized.

    The family of every column comes from ``column_families`` or, for columns it does not
    name, from the dtype:

    ====================================== ==============
    dtype                                  family
    ====================================== ==============
    bool, boolean                          ``bernoulli``
    category, string, object               ``categorical``
    string, object: numbers stored as text ``gaussian``
    integer with values in {0, 1}          ``bernoulli``
    integer with values >= 0               ``poisson``
    float, other integer                   ``gaussian``
    ====================================== ==============

    (integer ranges and whether every value of a text column parses as a number come from
    the same pass that gathers the categorical levels; see :mod:`emdask.engine.columns`).
    The map used is kept in ``column_families_``.

    Parameters
    ----------
    n_components : int, default=1
    column_families : dict of str to str, optional
        Family (``'gaussian'``, ``'categorical'``, ``'bernoulli'``, ``'poisson'``) of some or
        all columns.
    covariance_type : {'diag', 'full'}, default='diag'
        Covariance of the Gaussian columns within a segment.
    reg_covar : float, default=1e-6
        Added to the diagonal of the Gaussian covariances.
    handle_unknown : {'error', 'missing'}, default='error'
        As for :class:`CategoricalMixture`.
    """ + _COMMON_DOC + """

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_gaussian)
    covariances_ : ndarray of shape (n_components, n_gaussian) ('diag') or
        (n_components, n_gaussian, n_gaussian) ('full')
    precisions_cholesky_ : ndarray, shaped as ``covariances_``
    binary_probabilities_ : ndarray of shape (n_components, n_binary)
    category_probabilities_ : ndarray of shape (n_components, n_categorical, max_levels)
    rates_ : ndarray of shape (n_components, n_count)
        Each group's columns in table order; ``column_families_`` says which is which.
    column_families_ : dict of str to str
        Family of every modelled column, in table order.
    categories_ : dict of str to list
        Levels of every categorical column.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_, feature_names_in_,
    n_passes_ : as for :class:`~emdask.GaussianMixture`
    """

    _parameter_constraints: dict = {
        **_TableMixture._parameter_constraints,
        "column_families": [dict, None],
        "covariance_type": [StrOptions(set(MIXED_COVARIANCE_TYPES))],
        "reg_covar": [Interval(numbers.Real, 0.0, None, closed="left")],
        "handle_unknown": [StrOptions({"error", "missing"})],
    }
    _fitted_arrays = (
        "weights_",
        "means_",
        "covariances_",
        "precisions_cholesky_",
        "binary_probabilities_",
        "category_probabilities_",
        "rates_",
    )
    _fitted_meta = ("column_families_", "categories_")
    _default_column = staticmethod(lambda dtype: True)
    _what = "modellable"
    _parse_text = True

    def __init__(
        self,
        n_components=1,
        *,
        column_families=None,
        covariance_type="diag",
        reg_covar=1e-6,
        alpha=1e-6,
        fit_weights=True,
        handle_unknown="error",
        tol=1e-3,
        max_iter=100,
        n_init=1,
        init_params="k-means++",
        weights_init=None,
        random_state=None,
        verbose=0,
        verbose_interval=10,
        split_every=8,
        persist="auto",
        algorithm="squarem",
    ):
        self.n_components = n_components
        self.column_families = column_families
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.alpha = alpha
        self.fit_weights = fit_weights
        self.handle_unknown = handle_unknown
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.split_every = split_every
        self.persist = persist
        self.algorithm = algorithm

    def _check_parameters(self):
        super()._check_parameters()
        if self.covariance_type not in MIXED_COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type={self.covariance_type!r} is not one of "
                f"{list(MIXED_COVARIANCE_TYPES)}"
            )
        _check_number("reg_covar", self.reg_covar, low=0.0)
        if self.handle_unknown not in ("error", "missing"):
            raise ValueError(
                f"handle_unknown={self.handle_unknown!r} is not one of ['error', 'missing']"
            )
        if self.column_families is not None:
            if not isinstance(self.column_families, dict):
                raise ValueError("column_families must be a dict of column name to family")
            bad = {c: f for c, f in self.column_families.items() if f not in MIXED_KINDS}
            if bad:
                raise ValueError(
                    f"column_families gives unknown families {bad}; use one of {list(MIXED_KINDS)}"
                )

    # -- columns ----------------------------------------------------------------------------

    def _column_kinds(self, names, dtypes):
        given = dict(self.column_families or {})
        unknown = [c for c in given if c not in names]
        if unknown:
            raise KeyError(
                f"column_families names column(s) {unknown} that are not among the columns "
                f"to fit {names}"
            )
        families, ranged = [], []
        for c in names:
            if c in given:
                families.append(given[c])
                continue
            family = infer_kind(c, dtypes[c])
            dtype = dtypes[c]
            if family in ("bernoulli", "poisson") and pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
                ranged.append(c)  # 0/1, counts or signed integers: the scan will tell
            families.append(family)
        kinds = [_KIND_OF_FAMILY[f] for f in families]
        cat = [c for c, k in zip(names, kinds) if k == "categorical"]
        return kinds, cat, ranged

    def _kinds_after_scan(self, names, kinds, ranges):
        out = list(kinds)
        for j, c in enumerate(names):
            if c in ranges:
                lo, hi = ranges[c]
                if not np.isfinite(lo):
                    raise ValueError(
                        f"column {c!r} has no observed value; drop it from the columns to fit"
                    )
                out[j] = _KIND_OF_FAMILY[infer_kind(c, np.dtype(np.int64), (lo, hi))]
        return out

    def _fitted_kinds(self, names):
        return [_KIND_OF_FAMILY[self.column_families_[c]] for c in names]

    def _fitted_categories(self, names):
        return {c: list(v) for c, v in self.categories_.items()}

    def _set_encoding(self, encoder):
        self.column_families_ = {
            c: _FAMILY_OF_KIND[k] for c, k in zip(encoder.columns, encoder.kinds)
        }
        self.categories_ = {
            c: list(encoder.categories[c])
            for c, k in zip(encoder.columns, encoder.kinds)
            if k == "categorical"
        }

    def _encoder_options(self):
        return {"handle_unknown": self.handle_unknown}

    @staticmethod
    def _layout(encoder):
        layout = {kind: [] for kind in MIXED_KINDS}
        if encoder is not None:
            for j, k in enumerate(encoder.kinds):
                layout[_FAMILY_OF_KIND[k]].append(j)
        return layout

    def _family_from(self, encoder):
        layout = self._layout(encoder)
        if not any(layout.values()):  # no data seen yet: a placeholder with one column
            layout["gaussian"] = [0]
        return MixedFamily(
            self.n_components,
            layout,
            () if encoder is None else encoder.n_levels,
            covariance_type=self.covariance_type,
            reg_covar=self.reg_covar,
            alpha=self.alpha,
            fit_weights=self.fit_weights,
        )

    def _check_data(self, context):
        super()._check_data(context)
        encoder = context.encoder
        s = context.data.summary
        constant = [
            c
            for j, (c, k) in enumerate(zip(encoder.columns, encoder.kinds))
            if k == "real" and s.col_min[j] == s.col_max[j]
        ]
        if constant:
            warnings.warn(
                f"Gaussian column(s) {constant} are constant; their variance is only reg_covar. "
                "Drop them if they carry no information.",
                DataWarning,
                stacklevel=3,
            )

    # -- starting values --------------------------------------------------------------------

    def _start(self, data, family, context, sample, seeds, rng):
        k = self.n_components
        layout = self._layout(context.encoder)
        mean = data.summary.col_mean
        g, b, c, p = (np.asarray(layout[k], dtype=np.intp) for k in MIXED_KINDS)
        pick = (lambda cols: None) if seeds is None else (lambda cols: seeds[:, cols])
        args = {}
        if g.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN sample column
                var = np.nanvar(sample[:, g], axis=0)
            args["means"], args["covariances"] = _start_gaussian(
                k, mean[g], var, pick(g), self.covariance_type, self.reg_covar, rng
            )
        if b.size:
            args["binary"] = _start_binary(k, mean[b], pick(b), rng)
        if c.size:
            marginals = _marginals(context.level_counts, family.n_levels, sample[:, c])
            args["categorical"] = _start_levels(k, marginals, pick(c), rng)
        if p.size:
            args["counts"] = _start_counts(k, mean[p], pick(p), rng)
        return family.make_params(self._weights_start(), **args)

    # -- fitted state -----------------------------------------------------------------------

    def _check_state_meta(self, meta):
        rules.require(meta, self._fitted_meta)
        families, cats, d = meta["column_families_"], meta["categories_"], meta["n_features_in_"]
        if not isinstance(families, dict) or len(families) != d:
            raise StateError(
                "column_families_", f"must map each of the n_features_in_={d} columns to its family"
            )
        names = rules.column_names(meta)
        if list(families) != names:
            raise StateError("column_families_", f"names columns {list(families)}, not the model's {names}")
        bad = {c: f for c, f in families.items() if f not in MIXED_KINDS}
        if bad:
            raise StateError("column_families_", f"gives unknown families {bad} (known: {list(MIXED_KINDS)})")
        categorical = [c for c, f in families.items() if f == "categorical"]
        if not isinstance(cats, dict) or list(cats) != categorical:
            raise StateError("categories_", f"must give the levels of the categorical columns {categorical}")
        for c, levels in cats.items():
            rules.check_levels(levels, f"categories_[{c!r}]")

    def _array_rules(self, k, d, meta):
        families, ct = list(meta["column_families_"].values()), self.covariance_type
        g, b, p = (families.count(f) for f in ("gaussian", "bernoulli", "poisson"))
        n_levels = [len(levels) for levels in meta["categories_"].values()]
        lmax = max(n_levels, default=0)
        cov = (k, g, g) if ct == "full" else (k, g)
        per = f"n_components={k} and column_families_"
        why = f"{per} ({g} gaussian columns) and covariance_type={ct!r}"
        return {
            "weights_": ((k,), f"n_components={k}", rules.weights_problem),
            "means_": ((k, g), f"{per} ({g} gaussian columns)", None),
            "covariances_": (cov, why, rules.covariances_problem(ct)),
            "precisions_cholesky_": (cov, why, rules.precisions_cholesky_problem(ct)),
            "binary_probabilities_": ((k, b), f"{per} ({b} bernoulli columns)", rules.probabilities_problem),
            "category_probabilities_": (
                (k, len(n_levels), lmax),
                f"{per} and categories_ ({len(n_levels)} categorical columns, at most {lmax} levels)",
                rules.levels_problem(n_levels),
            ),
            "rates_": ((k, p), f"{per} ({p} poisson columns)", rules.rates_problem),
        }

    def _set_params(self, params):
        k = self.n_components
        self.weights_ = params.weights
        if params.gaussian is not None:
            self.means_ = params.gaussian.means
            self.covariances_ = params.gaussian.covariances
            self.precisions_cholesky_ = params.gaussian.precisions_cholesky
        else:
            empty = (k, 0, 0) if self.covariance_type == "full" else (k, 0)
            self.means_ = np.zeros((k, 0))
            self.covariances_ = np.zeros(empty)
            self.precisions_cholesky_ = np.zeros(empty)
        self.binary_probabilities_ = params.binary
        self.category_probabilities_ = params.categorical
        self.rates_ = params.counts

    def _fitted_params(self):
        k = self.n_components
        means = np.asarray(self.means_, dtype=np.float64)
        gaussian = None
        if means.shape[1]:
            gaussian = GaussianParams(
                np.ones(k),
                means,
                np.asarray(self.covariances_, dtype=np.float64),
                np.asarray(self.precisions_cholesky_, dtype=np.float64),
                self.covariance_type,
            )
        return MixedParams(
            np.asarray(self.weights_, dtype=np.float64),
            gaussian,
            np.asarray(self.binary_probabilities_, dtype=np.float64),
            np.asarray(self.category_probabilities_, dtype=np.float64),
            np.asarray(self.rates_, dtype=np.float64),
        )
