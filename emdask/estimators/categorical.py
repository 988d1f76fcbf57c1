"""Latent class analysis: a mixture of independent categorical distributions."""

from __future__ import annotations

import numpy as np
from sklearn.utils._param_validation import StrOptions

from ..exceptions import StateError
from ..families.discrete import MISSING_MODES, CategoricalFamily, CategoricalParams
from . import state as rules
from .table import _COMMON_DOC, _marginals, _start_levels, _TableMixture, _TableFillMixin

__all__ = ["CategoricalMixture"]


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


class CategoricalMixture(_TableFillMixin, _TableMixture):
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
