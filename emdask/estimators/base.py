"""What every mixture estimator shares: arguments, fitting on the driver, per-row methods,
fitted state.

Subclasses say which family they fit (``_make_family`` / ``_family_for``), how to start
(``_initialize_jobs``), how fitted parameters map to public attributes (``_set_fitted`` /
``_fitted_params``) and what a fitted state may hold (``_state_rules``). Everything else —
data preparation, restarts and candidates sharing each pass (:func:`fit_candidates`, which
``fit`` and :func:`emdask.select_components` both run), convergence, callbacks, the fitted
state (``_get_state`` / ``_set_state``) and ``predict``/``score``/``bic`` on any input —
lives here once. What a fit learns of its data before EM is handed from step to step in a
:class:`FitContext`, never left on the estimator or on other objects.

Every public subclass defined in emdask is registered by name as it is defined
(``__init_subclass__``); model files name estimators by these names.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions

from ..engine import EMModel, map_rows, prepare, run_em
from ..engine.checkpoint import CheckpointWriter, read_checkpoint
from ..engine.data import one_blas_thread, reject_infinite
from ..engine.modelfile import check_declared, write_model
from ..degeneracy import describe_singular, singular_components
from ..engine.squarem import ALGORITHMS
from ..exceptions import ConvergenceWarning, DataWarning, StateError
from ..families.base import logsumexp_rows, normalize_log_rows
from . import state as rules

__all__ = ["BaseMixture", "FitContext", "fit_candidates", "estimator_class", "known_estimators", "register_estimator", "seed_from"]

#: Estimator classes by the name model files give them: emdask's own by class name (filled
#: by ``BaseMixture.__init_subclass__``), others by ``module.qualname`` once registered.
_REGISTRY = {}


def register_estimator(cls):
    """Let :func:`emdask.load` rebuild ``cls`` (a :class:`BaseMixture` subclass defined
    outside emdask). Usable as a class decorator; returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, BaseMixture)):
        raise TypeError(f"{cls!r} is not a subclass of emdask's BaseMixture")
    _REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def estimator_class(name):
    """The estimator class a model file names, or ``None``."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def known_estimators():
    """The names of every estimator class model files may name."""
    return sorted(_REGISTRY)


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


@dataclass(frozen=True)
class FitContext:
    """What a fit knows of its data before EM starts, handed explicitly to the steps of
    the fit (checks, family, starting values, fitted attributes).

    Attributes
    ----------
    data : BlockData
        The prepared data.
    encoder : TableEncoder or None
        The encoding of the columns (table mixtures: kinds, levels), learnt by a scan.
    level_counts : list of ndarray or None
        Rows at each level of every categorical column, from that scan.
    scan_passes : int
        Passes over the data the scan took.
    """

    data: Any
    encoder: Any = None
    level_counts: Any = None
    scan_passes: int = 0


def fit_candidates(candidates, context, seed, *, callbacks=(), models=None, checkpoint=None):
    """Fit a list of candidate estimators in shared passes; returns each one's best model.

    Every candidate (the same class; in a model selection, clones differing in
    ``n_components``) runs its ``n_init`` restarts, seeds ``seed``, ``seed + 1``, ...;
    the starting values of all jobs come from the class's ``_initialize_jobs`` and every
    EM pass hands each block to every model still iterating. Each candidate then takes the
    fitted state of its best restart (``_finish_fit``).

    Parameters
    ----------
    candidates : list of BaseMixture
        Checked against the data already (``_check_data``); ``tol``, ``max_iter``,
        ``verbose`` and ``algorithm`` are the first one's.
    context : FitContext
    seed : int
    callbacks : sequence of callables
        As in ``fit``; ``info.model`` indexes every restart of every candidate in order.
    models : list of EMModel, optional
        Models to go on with instead of starting values (a resumed checkpoint, a warm
        start); only with a single candidate.
    checkpoint : str or path, optional
        Where the state of every model is written after the start and every pass; only
        with a single candidate.

    Returns
    -------
    list of EMModel
        The best model (highest lower bound) of each candidate.
    """
    lead = candidates[0]
    data = context.data
    if models is not None or checkpoint is not None:
        if len(candidates) != 1:
            raise ValueError("models to go on with and checkpoints are for a single estimator")
    if models is None:
        jobs = [
            (cand, cand._family_for(context), seed + r)
            for cand in candidates
            for r in range(cand.n_init)
        ]
        starts = type(lead)._initialize_jobs(data, jobs, context)
        models = [EMModel(family, start) for (_, family, _), start in zip(jobs, starts)]
        owners = [cand for cand, _, _ in jobs]
    else:
        owners = [lead] * len(models)
    after_pass = None
    if checkpoint is not None:
        after_pass = CheckpointWriter(
            checkpoint, lead, data, seed, lambda params: lead._params_state(params, context)
        )
        after_pass(models)
    run_em(
        data,
        models,
        tol=lead.tol,
        max_iter=lead.max_iter,
        callbacks=callbacks,
        verbose=lead.verbose,
        verbose_interval=lead.verbose_interval,
        after_pass=after_pass,
        algorithm=lead.algorithm,
    )
    bests = []
    for cand in candidates:
        best = max((m for c, m in zip(owners, models) if c is cand), key=lambda m: m.lower_bound)
        cand._finish_fit(best, context)
        bests.append(best)
    return bests


def _score_chunk(block, index, family, params):
    informative = ~np.isnan(block).all(axis=1)
    ll = logsumexp_rows(family.weighted_log_prob(block, params))
    return np.array([ll[informative].sum(), informative.sum()], dtype=np.float64)


class BaseMixture(DensityMixin, BaseEstimator):
    """Base class for mixture estimators (scikit-learn conventions).

    The fitted state of an estimator is, in full: its constructor arguments
    (``get_params()``), the common attributes in ``_common_fitted``, the ndarray attributes
    a subclass lists in ``_fitted_arrays`` and the JSON-able ones it lists in
    ``_fitted_meta`` (category levels, column-to-family maps, ...). ``_get_state()``
    returns it as ``(arrays, meta)``; ``_set_state(arrays, meta)`` checks it and takes it.
    An estimator rebuilt from these alone predicts exactly as the original (model files
    and checkpoints rely on it).
    """

    #: init_params values a subclass accepts
    _init_methods: tuple = ()
    #: The arguments' types and ranges (scikit-learn's parameter validation, run by ``fit``
    #: through ``_validate_params``; emdask's own checks add their messages).
    _parameter_constraints: dict = {
        "n_components": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0.0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "n_init": [Interval(numbers.Integral, 1, None, closed="left")],
        "weights_init": ["array-like", None],
        "random_state": [
            Interval(numbers.Integral, 0, None, closed="left"),
            np.random.RandomState,
            np.random.Generator,
            None,
        ],
        "verbose": [Interval(numbers.Integral, 0, None, closed="left")],
        "verbose_interval": [Interval(numbers.Integral, 1, None, closed="left")],
        "split_every": [Interval(numbers.Integral, 2, None, closed="left")],
        "persist": [StrOptions({"auto"}), "boolean"],
        "algorithm": [StrOptions(set(ALGORITHMS))],
    }
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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("emdask.") and not cls.__name__.startswith("_"):
            _REGISTRY.setdefault(cls.__name__, cls)

    @classmethod
    def _registry_name(cls):
        """The name model files give this class (``TypeError`` when :func:`emdask.load`
        could not find it by that name)."""
        if _REGISTRY.get(cls.__name__) is cls:
            return cls.__name__
        name = f"{cls.__module__}.{cls.__qualname__}"
        if _REGISTRY.get(name) is not cls:
            raise TypeError(
                f"{cls.__name__} is not an emdask estimator; call "
                f"emdask.register_estimator({cls.__name__}) before saving so that load can find it"
            )
        return name

    # -- fitted state -----------------------------------------------------------------------

    def _get_state(self):
        """The fitted state: ``(arrays, meta)``, the fitted numpy arrays and the JSON-able
        fitted metadata (common attributes, ``_fitted_meta``; arrays of strings). An
        estimator given this state by :meth:`_set_state` predicts exactly as this one."""
        self._check_fitted()
        return self._collect_state(self._common_fitted + self._fitted_meta)

    def _params_state(self, params, context):
        """``(arrays, meta)`` of the fitted parameters ``params`` of a fit in ``context``
        alone (the class's own metadata, no history or data attributes): a model of a
        checkpoint."""
        scratch = copy.copy(self)
        scratch._take_context(context)
        scratch._set_fitted(params)
        return scratch._collect_state(self._fitted_meta)

    def _collect_state(self, meta_names):
        arrays, meta = {}, {}
        for name in self._fitted_arrays:
            if hasattr(self, name):
                a = np.asarray(getattr(self, name))
                if a.dtype.kind in "biuf":
                    arrays[name] = a
                else:
                    meta[name] = a
        for name in meta_names:
            if hasattr(self, name):
                meta[name] = getattr(self, name)
        return arrays, meta

    def _state_rules(self, meta):
        """Check the fitted metadata ``meta``; return the rules of the fitted arrays,
        ``{name: (shape, why, problem)}`` (see :mod:`emdask.estimators.state`).

        Raises :class:`~emdask.exceptions.StateError` for metadata no fit leaves."""
        cls = type(self)
        check_declared(cls, meta, cls._common_fitted + cls._fitted_meta + cls._fitted_arrays,
                       "the fitted state")
        rules.check_common(meta)
        self._check_state_meta(meta)
        return self._array_rules(self.n_components, meta["n_features_in_"], meta)

    def _check_state_meta(self, meta):
        """Subclass checks of its own fitted metadata (category levels, column maps)."""

    def _array_rules(self, k, d, meta):
        """Shapes and constraints of the fitted arrays; by default only their names."""
        return {name: (None, None, None) for name in self._fitted_arrays}

    def _set_state(self, arrays, meta):
        """Take the fitted state ``(arrays, meta)`` of :meth:`_get_state`, after checking
        it (:class:`~emdask.exceptions.StateError` names what no fit leaves); returns self."""
        rules.check_arrays(type(self), arrays, self._state_rules(meta))
        if "feature_names_in_" not in meta and hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        for name, value in meta.items():
            setattr(self, name, value)
        for name, a in arrays.items():
            setattr(self, name, a)
        try:
            self._fitted_params()
        except Exception as err:  # the arrays do not make a model
            raise StateError("the fitted arrays", f"do not form a valid model: {err}") from None
        return self

    def _check_starting_values(self):
        """The starting values among the arguments (``means_init``, ...) fit the fitted
        model, as ``fit`` would require."""
        self._check_extra_parameters(self.n_features_in_)

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
    def _initialize_jobs(cls, data, jobs, context=None):
        """Starting parameters for several ``(estimator, family, seed)`` jobs.

        ``n_init`` restarts and the candidates of :func:`emdask.select_components` start
        through this hook (``context``: the :class:`FitContext` of the fit). A subclass that
        can share passes between jobs overrides it; by default each job runs its
        estimator's ``_initialize`` in turn.
        """
        return [est._initialize(data, family, seed) for est, family, seed in jobs]

    def _prepare_fit(self, X, columns):
        """The :class:`FitContext` of a fit on ``X``: the prepared data (and what a
        subclass learns of the columns before EM, e.g. their levels)."""
        return FitContext(self._prepare(X, columns))

    def _family_for(self, context):
        """The family to fit in ``context`` (by default, the estimator's own)."""
        return self._make_family()

    def _take_context(self, context):
        """Set what a fit in ``context`` knows of the columns as fitted attributes (a
        subclass's encoding of its columns); called before ``_set_fitted``."""

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

    def _validate_params(self):
        """Check the arguments: scikit-learn's validation against
        ``_parameter_constraints`` and emdask's own checks (``_check_parameters``), whose
        message, naming the argument and what it must be, comes first.

        Raises
        ------
        sklearn.utils._param_validation.InvalidParameterError
            A ``ValueError`` (and ``TypeError``) naming the argument.
        """
        try:
            self._check_parameters()
            own = None
        except (ValueError, TypeError) as err:
            own = err
        try:
            super()._validate_params()
        except InvalidParameterError as err:
            if own is None:
                raise
            raise InvalidParameterError(f"{own} ({err})") from None
        if own is not None:
            raise InvalidParameterError(str(own)) from None

    def _check_fitted(self):
        if not hasattr(self, "converged_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    def _check_data(self, context):
        data = context.data
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

    @_fit_context(prefer_skip_nested_validation=True)
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

        Raises
        ------
        sklearn.utils._param_validation.InvalidParameterError
            An invalid argument (a ``ValueError``), named with what it must be.
        """
        if resume and checkpoint is None:
            raise ValueError("resume=True continues from a checkpoint: pass checkpoint=path too")
        context = self._prepare_fit(X, columns)
        data = context.data
        self._check_extra_parameters(data.n_features)
        self._check_data(context)
        seed = seed_from(self.random_state)
        models = None
        if resume:
            models = read_checkpoint(checkpoint, self, self._family_for(context), data)
        if models is None and getattr(self, "warm_start", False) and hasattr(self, "converged_"):
            if data.n_features != self.n_features_in_:
                raise ValueError(
                    f"X has {data.n_features} features, but the model to warm-start was "
                    f"fitted on {self.n_features_in_}"
                )
            # as scikit-learn: the convergence test goes on from the previous fit's bound
            models = [
                EMModel(
                    self._family_for(context),
                    self._fitted_params(),
                    previous_bound=float(self.lower_bound_),
                )
            ]
        (best,) = fit_candidates(
            [self], context, seed, callbacks=callbacks, models=models, checkpoint=checkpoint
        )
        if self.max_iter == 0:  # scikit-learn stays silent; a model that saw no E-step is not fitted
            warnings.warn(
                "max_iter=0: no EM iteration ran; the parameters are the initialisation's "
                "(converged_=False, n_iter_=0, lower_bound_=-inf). Use max_iter >= 1 to fit.",
                ConvergenceWarning,
                stacklevel=4,  # the caller of fit (_fit_context and one_blas_thread wrap it)
            )
        elif not best.converged:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=4,  # the caller of fit (_fit_context and one_blas_thread wrap it)
            )
        self._warn_singular(data.n_rows - data.summary.n_empty_rows, stacklevel=5)
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

    def _finish_fit(self, best, context):
        """Set the fitted attributes from the best :class:`~emdask.engine.EMModel` of a fit
        in ``context``."""
        data = context.data
        self._take_context(context)
        self._set_fitted(best.params)
        self.converged_ = best.converged
        self.n_iter_ = best.n_iter
        self.lower_bound_ = best.lower_bound
        self.lower_bounds_ = list(best.lower_bounds)
        self._set_data_attributes(data.n_features, data.feature_names if data.has_names else None)
        self.n_passes_ = data.n_passes + context.scan_passes

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
        return write_model(self, path)

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
