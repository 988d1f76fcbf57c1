"""Mixtures of binary and count columns: Bernoulli, Poisson and binomial mixtures."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from ..exceptions import StateError
from ..families.discrete import (
    MISSING_MODES,
    BernoulliFamily,
    BernoulliParams,
    BinomialFamily,
    BinomialParams,
    PoissonFamily,
    PoissonParams,
)
from . import state as rules
from .base import _check_number, seed_from
from .table import (
    _COMMON_DOC,
    _check_probabilities,
    _start_binary,
    _start_counts,
    _TableMixture,
    _TableFillMixin,
)

__all__ = ["BernoulliMixture", "BinomialMixture", "PoissonMixture"]


class _SimpleTableMixture(_TableFillMixin, _TableMixture):
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
