"""A mixture over a table of mixed column types (Gaussian, categorical, binary, counts)."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from ..engine.encoding import FAMILY_OF_KIND, KIND_OF_FAMILY, kinds_after_scan, mixed_kinds
from ..exceptions import DataWarning, StateError
from ..families.gaussian import GaussianParams
from ..families.mixed import MIXED_COVARIANCE_TYPES, MIXED_KINDS, MixedFamily, MixedParams
from . import state as rules
from .base import _check_number
from .table import (
    _COMMON_DOC,
    _marginals,
    _start_binary,
    _start_counts,
    _start_gaussian,
    _start_levels,
    _TableMixture,
    _TableFillMixin,
)

__all__ = ["MixedMixture"]


class MixedMixture(_TableFillMixin, _TableMixture):
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
        return mixed_kinds(names, dtypes, given)

    def _kinds_after_scan(self, names, kinds, ranges):
        return kinds_after_scan(names, kinds, ranges)

    def _fitted_kinds(self, names):
        return [KIND_OF_FAMILY[self.column_families_[c]] for c in names]

    def _fitted_categories(self, names):
        return {c: list(v) for c, v in self.categories_.items()}

    def _set_encoding(self, encoder):
        self.column_families_ = {
            c: FAMILY_OF_KIND[k] for c, k in zip(encoder.columns, encoder.kinds)
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
                layout[FAMILY_OF_KIND[k]].append(j)
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
