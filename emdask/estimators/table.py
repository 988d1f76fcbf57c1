"""What the discrete and mixed-type mixtures share: the table base class, starting values
and the documentation of their common arguments.

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

(:mod:`emdask.estimators.counts`, :mod:`~emdask.estimators.categorical`,
:mod:`~emdask.estimators.mixed`.) All take tables of any size (numpy, pandas, dask),
marginalize missing cells (NaN, None, ``pd.NA``), smooth probabilities with the pseudo-count
``alpha`` and can hold the mixing weights fixed (``fit_weights=False``). Column values are
checked as they are converted, and a bad value stops the fit with an error naming its column
(:mod:`emdask.engine.encoding`).

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
from ..engine.columns import holds_labels
from ..engine.data import check_2d, partition_starts
from ..engine.encoding import TableEncoder, numbers_as_text, scan_columns, table_columns
from ..engine.kmeans import sample_rows_many, sq_distances
from ..engine.randomness import stream_rng
from ..families.discrete import MISSING_MODES
from .base import BaseMixture, FitContext, _check_number
from .fill import FillMixin, _map_fill

INIT_METHODS = ("k-means++", "random_from_data", "random")
#: Rows sampled (one pass) to start EM: seed rows and the spread of Gaussian columns.
INIT_SAMPLE = 2000


def _is_number_dtype(dtype):
    return not holds_labels(dtype)


# --------------------------------------------------------------------------------------
# Starting values
# --------------------------------------------------------------------------------------


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
# The shared estimator
# --------------------------------------------------------------------------------------


class _TableMixture(BaseMixture):
    """What the discrete and mixed-type mixtures share: encoding of the columns (with a level
    scan before fitting), checks, starting values, per-row methods on encoded data and
    drawing rows (filling missing cells: :class:`_TableFillMixin`).

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
        names, named, dtypes = table_columns(X, columns, self._default_column, self._what)
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


class _TableFillMixin(FillMixin):
    """The filling hooks of the table mixtures: cells are encoded and decoded by the fitted
    encoding, and every copy of a multiple imputation uses the fitted parameters."""

    def _fill(self, X, fill):
        return _map_fill(self._checked(X), self._encoder(), fill)

    def _imputation_params(self, X, n_imputations, seed):
        return [self._fitted_params()] * n_imputations, partition_starts(self._checked(X))


# --------------------------------------------------------------------------------------
# The arguments every table mixture shares
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

