"""What every mixture estimator shares: arguments, fitting on the driver, per-row methods.

Subclasses say which family they fit (``_make_family``), how to start (``_initialize``) and
how fitted parameters map to public attributes (``_set_fitted`` / ``_fitted_params``).
Everything else — data preparation, restarts sharing each pass, convergence, callbacks,
``predict``/``score``/``bic`` on any input — lives here once.
"""

from __future__ import annotations

import inspect
import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import NotFittedError

from ..engine import EMModel, map_rows, prepare, run_em
from ..engine.data import one_blas_thread, reject_infinite
from ..degeneracy import describe_singular, singular_components
from ..engine.squarem import ALGORITHMS
from ..exceptions import ConvergenceWarning, DataWarning
from ..families.base import logsumexp_rows, normalize_log_rows

__all__ = ["BaseMixture", "seed_from"]


def seed_from(random_state):
    """An integer seed from ``None``, an int, a ``RandomState`` or a ``Generator``."""
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state={random_state} must be non-negative")
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63 - 1))
    raise ValueError(
        f"random_state={random_state!r} must be None, an int, a numpy RandomState or Generator"
    )


def _check_number(name, value, *, kind=numbers.Real, low=None, low_open=False, high=None):
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if kind is numbers.Integral else "a number"
        raise ValueError(f"{name}={value!r} must be {what}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value!r} must be <= {high}")


def _score_chunk(block, index, family, params):
    informative = ~np.isnan(block).all(axis=1)
    ll = logsumexp_rows(family.weighted_log_prob(block, params))
    return np.array([ll[informative].sum(), informative.sum()], dtype=np.float64)


class BaseMixture(DensityMixin, BaseEstimator):
    """Base class for mixture estimators (scikit-learn conventions).

    The fitted state of an estimator is, in full: its constructor arguments
    (``get_params()``), the common attributes in ``_common_fitted``, the ndarray attributes
    a subclass lists in ``_fitted_arrays`` and the JSON-able ones it lists in
    ``_fitted_meta`` (category levels, column-to-family maps, ...). An estimator rebuilt
    from these alone predicts exactly as the original (model files rely on it).
    """

    #: init_params values a subclass accepts
    _init_methods: tuple = ()
    #: fitted attributes every mixture has
    _common_fitted = (
        "converged_",
        "n_iter_",
        "lower_bound_",
        "lower_bounds_",
        "n_features_in_",
        "feature_names_in_",
        "n_passes_",
        "_columns",
    )
    #: ndarray attributes holding a subclass's fitted parameters
    _fitted_arrays: tuple = ()
    #: JSON-able attributes of a subclass's fitted state
    _fitted_meta: tuple = ()

    # -- scikit-learn estimator protocol ------------------------------------------------------

    @classmethod
    def _param_names(cls):
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep=True):
        """Constructor arguments as a dict."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        """Set constructor arguments; returns self."""
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {valid}")
            setattr(self, key, value)
        return self

    def __repr__(self):
        sig = inspect.signature(type(self).__init__)
        shown = []
        for name, p in sig.parameters.items():
            if name == "self":
                continue
            value = getattr(self, name)
            default = p.default
            same = value is default
            if not same:
                try:
                    same = bool(value == default)
                except (ValueError, TypeError):
                    same = False
            if not same:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # a missing cell, marginalized out
        return tags

    # -- hooks for subclasses -------------------------------------------------------------------

    def _make_family(self):
        raise NotImplementedError

    def _initialize(self, data, family, seed):
        raise NotImplementedError

    @classmethod
    def _initialize_jobs(cls, data, jobs):
        """Starting parameters for several ``(estimator, family, seed)`` jobs.

        ``n_init`` restarts and the candidates of :func:`emdask.select_components` start
        through this hook. A subclass that can share passes between jobs overrides it; by
        default each job runs its estimator's ``_initialize`` in turn.
        """
        return [est._initialize(data, family, seed) for est, family, seed in jobs]

    def _set_fitted(self, params):
        raise NotImplementedError

    def _fitted_params(self):
        raise NotImplementedError

    def _check_extra_parameters(self, n_features):
        """Subclass checks of arguments that need the number of features."""

    def _prepare(self, X, columns, persist=None):
        return prepare(
            X,
            columns,
            allow_nan=True,
            persist=self.persist if persist is None else persist,
            npartitions=None,
            split_every=self.split_every,
        )

    # -- checks ---------------------------------------------------------------------------

    def _check_parameters(self):
        _check_number("n_components", self.n_components, kind=numbers.Integral, low=1)
        _check_number("tol", self.tol, low=0.0)
        _check_number("max_iter", self.max_iter, kind=numbers.Integral, low=0)
        _check_number("n_init", self.n_init, kind=numbers.Integral, low=1)
        _check_number("verbose", self.verbose, kind=numbers.Integral, low=0)
        _check_number("verbose_interval", getattr(self, "verbose_interval", 10),
                      kind=numbers.Integral, low=1)
        _check_number("split_every", self.split_every, kind=numbers.Integral, low=2)
        if getattr(self, "algorithm", "em") not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} is not one of {list(ALGORITHMS)}")
        if self.persist not in ("auto", True, False):
            raise ValueError(f"persist={self.persist!r} must be 'auto', True or False")
        if self._init_methods and self.init_params not in self._init_methods:
            raise ValueError(
                f"init_params={self.init_params!r} is not one of {list(self._init_methods)}"
            )

    def _check_fitted(self):
        if not hasattr(self, "converged_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    def _check_data(self, data):
        informative = data.n_rows - data.summary.n_empty_rows
        if self.n_components > informative:
            raise ValueError(
                f"n_components={self.n_components} must be <= the number of rows with an "
                f"observed value ({informative})"
            )
        constant = data.constant_columns()
        if constant:
            warnings.warn(
                f"column(s) {constant} are constant; their variance is only reg_covar. "
                "Drop them if they carry no information.",
                DataWarning,
                stacklevel=3,
            )

    # -- fitting ----------------------------------------------------------------------------------

    @one_blas_thread
    def fit(self, X, y=None, *, columns=None, callbacks=(), checkpoint=None, resume=False):
        """Estimate the model parameters with EM.

        Parameters
        ----------
        X : array-like or dask collection of shape (n_rows, n_features)
            numpy array, pandas DataFrame, dask DataFrame or dask array. NaN marks a
            missing cell.
        y : ignored
        columns : list of str, optional
            Columns of a frame to model (default: every numeric column).
        callbacks : sequence of callables
            Called with an :class:`~emdask.engine.IterationInfo` after every iteration; a
            callback returning ``True`` stops the fit.
        checkpoint : str or path, optional
            Directory where the state of the fit (every restart's parameters and history)
            is written after the initialisation and after every iteration, atomically: a
            crash leaves the previous checkpoint whole. :func:`emdask.load` reads it as the
            best model so far.
        resume : bool, default=False
            Continue from ``checkpoint`` when it exists (it must come from the same
            estimator arguments and data), reaching the same result as a fit that was never
            interrupted; start afresh when it does not exist yet.

        Returns
        -------
        self
        """
        if resume and checkpoint is None:
            raise ValueError("resume=True continues from a checkpoint: pass checkpoint=path too")
        self._check_parameters()
        data = self._prepare(X, columns)
        self._check_extra_parameters(data.n_features)
        self._check_data(data)
        family = self._make_family()
        seed = seed_from(self.random_state)
        models = None
        previous = -np.inf
        if resume:
            from ..persistence import read_checkpoint

            models = read_checkpoint(checkpoint, self, family, data)
        if models is None:
            if getattr(self, "warm_start", False) and hasattr(self, "converged_"):
                if data.n_features != self.n_features_in_:
                    raise ValueError(
                        f"X has {data.n_features} features, but the model to warm-start was "
                        f"fitted on {self.n_features_in_}"
                    )
                starts = [self._fitted_params()]
                # as scikit-learn: the convergence test goes on from the previous fit's bound
                previous = float(self.lower_bound_)
            else:
                jobs = [(self, family, seed + i) for i in range(self.n_init)]
                starts = type(self)._initialize_jobs(data, jobs)
            models = [EMModel(family, params, previous_bound=previous) for params in starts]
        after_pass = None
        if checkpoint is not None:
            from ..persistence import CheckpointWriter

            after_pass = CheckpointWriter(checkpoint, self, data, seed)
            after_pass(models)
        run_em(
            data,
            models,
            tol=self.tol,
            max_iter=self.max_iter,
            callbacks=callbacks,
            verbose=self.verbose,
            verbose_interval=self.verbose_interval,
            after_pass=after_pass,
            algorithm=self.algorithm,
        )
        best = max(models, key=lambda m: m.lower_bound)
        if self.max_iter == 0:  # scikit-learn stays silent; a model that saw no E-step is not fitted
            warnings.warn(
                "max_iter=0: no EM iteration ran; the parameters are the initialisation's "
                "(converged_=False, n_iter_=0, lower_bound_=-inf). Use max_iter >= 1 to fit.",
                ConvergenceWarning,
                stacklevel=3,
            )
        elif not best.converged:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,  # the caller of fit (one_blas_thread wraps it)
            )
        self._finish_fit(best, data)
        self._warn_singular(data.n_rows - data.summary.n_empty_rows, stacklevel=4)
        return self

    def _singular(self, n_rows):
        """Singular components of the fitted model (see :mod:`emdask.degeneracy`)."""
        return singular_components(self, n_rows)

    #: what to do about a singular component, for the warning
    _singular_advice = (
        "Use fewer components or a simpler covariance_type, or a larger reg_covar on the "
        "data's scale; a column of few repeated values (integers) invites such spikes."
    )

    def _warn_singular(self, n_rows, stacklevel=2):
        singular = self._singular(n_rows)
        if singular:
            warnings.warn(
                f"the fit is singular: {describe_singular(singular)}. Its likelihood there "
                "is a spike, not structure; its estimates and criteria (BIC) are not to be "
                f"trusted. {self._singular_advice}",
                DataWarning,
                stacklevel=stacklevel,
            )

    def _finish_fit(self, best, data):
        """Set the fitted attributes from the best :class:`~emdask.engine.EMModel`."""
        self._set_fitted(best.params)
        self.converged_ = best.converged
        self.n_iter_ = best.n_iter
        self.lower_bound_ = best.lower_bound
        self.lower_bounds_ = list(best.lower_bounds)
        self._set_data_attributes(data.n_features, data.feature_names if data.has_names else None)
        self.n_passes_ = data.n_passes

    def _set_data_attributes(self, n_features, names):
        """``n_features_in_``, ``feature_names_in_`` (only with names) and the columns to take."""
        self.n_features_in_ = int(n_features)
        self._columns = list(names) if names is not None else None
        if names is not None:
            self.feature_names_in_ = np.asarray(list(names), dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_

    def save(self, path):
        """Write the fitted model to the directory ``path`` (see :func:`emdask.save`).

        The directory holds ``model.json`` (estimator, arguments, fitted metadata, history,
        versions) and one ``.npz`` file of the fitted arrays; no pickle. Returns the path.
        """
        from ..persistence import save

        return save(self, path)

    def fit_predict(self, X, y=None, *, columns=None):
        """Fit, then return the component of every row (see :meth:`predict`)."""
        return self.fit(X, columns=columns).predict(X)

    # -- per-row methods ----------------------------------------------------------------------------

    def _columns_of(self, X):
        cols = getattr(self, "_columns", None)
        if cols is None and hasattr(X, "columns"):
            cols = list(X.columns)
        if cols is None:
            shape = getattr(X, "shape", None)
            if shape is not None and len(shape) == 2 and shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
        elif len(cols) != self.n_features_in_:
            raise ValueError(
                f"X has {len(cols)} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        return cols

    def _rows(self, X, fn, n_out=None, dtype=np.float64, out_columns=None):
        self._check_fitted()
        family, params = self._make_family(), self._fitted_params()
        columns = self._columns_of(X)
        return map_rows(
            X,
            columns,
            lambda block: fn(family.weighted_log_prob(reject_infinite(block, columns), params)),
            n_out=n_out,
            dtype=dtype,
            out_columns=out_columns,
        )

    def score_samples(self, X):
        """Log-likelihood of every row (of its observed cells), shape (n_rows,)."""
        return self._rows(X, logsumexp_rows)

    def predict_proba(self, X):
        """Posterior probability of each component for every row, shape (n_rows, k)."""
        return self._rows(
            X, lambda lp: normalize_log_rows(lp)[0], n_out=self.n_components
        )

    def predict(self, X):
        """Most probable component of every row, shape (n_rows,)."""
        return self._rows(X, lambda lp: lp.argmax(axis=1), dtype=np.int64)

    def _score_total(self, X):
        self._check_fitted()
        data = self._prepare(X, self._columns_of(X), persist=False)
        total, n = data.map_reduce(_score_chunk, self._make_family(), self._fitted_params())
        return total, n

    def score(self, X, y=None):
        """Mean log-likelihood per row with at least one observed cell."""
        total, n = self._score_total(X)
        return float(total / n)

    def bic(self, X):
        """Bayesian information criterion on ``X`` (lower is better)."""
        total, n = self._score_total(X)
        return float(-2 * total + self._n_parameters() * np.log(n))

    def aic(self, X):
        """Akaike information criterion on ``X`` (lower is better)."""
        total, _ = self._score_total(X)
        return float(-2 * total + 2 * self._n_parameters())

    def _n_parameters(self):
        return self._make_family().n_parameters(self.n_features_in_)

    def sample(self, n_samples=1):
        """Draw rows from the fitted model; returns ``(X, labels)``."""
        self._check_fitted()
        _check_number("n_samples", n_samples, kind=numbers.Integral, low=1)
        rng = np.random.default_rng(seed_from(self.random_state))
        return self._make_family().sample(self._fitted_params(), n_samples, rng)
