"""Choosing the number of components: every candidate fitted in the same passes.

:func:`select_components` clones an estimator once per candidate ``n_components`` and fits
all candidates (times ``n_init`` restarts) together. Reading the table is the expensive
part, so every pass hands each block to every model still iterating:

======================  ==========================================================
pass                    what it does
======================  ==========================================================
1                       summary of the columns (row count, missing cells, ...)
initialisation          the estimator's own, shared between candidates where its
                        class allows; for GaussianMixture with ``'k-means||'``:
                        1 sample + 5 rounds + 1 weighting + 2 Lloyd + 1 assignment
                        = 10, whatever the number of candidates and restarts (the
                        k-means|| candidates of one seed are oversampled for the
                        largest ``k`` and re-clustered locally for each ``k``)
EM                      one pass per iteration for all models; a model that has
                        converged drops out, so this is the iterations of the
                        slowest candidate
1                       the log-likelihood (and classification entropy) of every
                        candidate at its final parameters, for the criteria
======================  ==========================================================

Separate fits would read the table ``summary + initialisation + iterations`` times each;
the shared search reads it about as often as its slowest single fit.

A candidate with a singular component (its covariance at the ``reg_covar`` floor, or a
component on fewer rows than its parameters: :mod:`emdask.degeneracy`) owes its criterion to
a spike of an unbounded likelihood; it is marked in ``table_`` and never chosen.

Criteria (lower is better), with ``L`` the log-likelihood of the rows with an observed cell,
``n`` their number and ``p`` the number of free parameters:

* ``bic = -2 L + p log n``
* ``aic = -2 L + 2 p``
* ``icl = bic + 2 EN``, ``EN = -Σ_i Σ_k t_ik log t_ik`` the entropy of the posterior
  probabilities ``t`` (Biernacki, Celeux & Govaert, 2000), which penalizes overlapping
  components.
"""

from __future__ import annotations

import numbers
import operator
import warnings

import numpy as np
import pandas as pd

from .degeneracy import describe_singular
from .engine.driver import map_reduce_many
from .estimators.base import BaseMixture, fit_candidates, seed_from
from .exceptions import ConvergenceWarning, DataWarning
from .families.base import normalize_log_rows

__all__ = ["CRITERIA", "SelectionResult", "select_components"]

CRITERIA = ("bic", "aic", "icl")


def _criteria_chunk(block, index, family, params):
    informative = ~np.isnan(block).all(axis=1)
    log_prob = family.weighted_log_prob(block, params)[informative]
    resp, log_norm = normalize_log_rows(log_prob)
    with np.errstate(invalid="ignore"):
        log_resp = log_prob - log_norm[:, None]
        entropy = -np.where(resp > 0, resp * log_resp, 0.0).sum()
    return np.array([log_norm.sum(), float(informative.sum()), entropy])


class SelectionResult:
    """What :func:`select_components` found.

    Attributes
    ----------
    best_estimator_ : BaseMixture
        The fitted candidate with the lowest criterion among those that are not singular
        (the smallest ``n_components`` on a tie).
    best_n_components_ : int
    criterion : str
        ``'bic'``, ``'aic'`` or ``'icl'``: the column of ``table_`` that chose.
    table_ : pandas.DataFrame
        One row per candidate, by ``n_components``: ``bic``, ``aic``, ``icl``,
        ``log_likelihood`` (total over the rows with an observed cell), ``n_parameters``,
        ``n_iter``, ``converged``, ``singular`` and ``singular_reason`` (which components
        are singular and why, see :mod:`emdask.degeneracy`: such a candidate's criteria
        come from a spike of an unbounded likelihood, like mclust's ``NA``, and it is never
        chosen).
    estimators_ : dict of int to BaseMixture
        Every fitted candidate, by ``n_components``.
    n_passes_ : int
        Passes over the data made by the whole search.
    """

    def __init__(self, best_estimator, criterion, table, estimators, n_passes):
        self.best_estimator_ = best_estimator
        self.best_n_components_ = int(best_estimator.n_components)
        self.criterion = criterion
        self.table_ = table
        self.estimators_ = estimators
        self.n_passes_ = int(n_passes)

    def __repr__(self):
        return (
            f"SelectionResult(criterion={self.criterion!r}, "
            f"best_n_components_={self.best_n_components_}, n_passes_={self.n_passes_})"
        )

    def plot(self, path, *, dpi=100):
        """Write a PNG of the criterion against ``n_components`` to ``path``; returns it.

        Needs matplotlib (drawn off-screen, without pyplot).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError(
                "SelectionResult.plot needs matplotlib: pip install matplotlib"
            ) from None
        t = self.table_
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(t["n_components"], t[self.criterion], marker="o", color="tab:blue")
        singular = t[t["singular"]] if "singular" in t else t.iloc[:0]
        if len(singular):
            ax.plot(singular["n_components"], singular[self.criterion], marker="x",
                    markersize=10, color="tab:gray", linestyle="none",
                    label="singular (never chosen)")
        best = t[t["n_components"] == self.best_n_components_]
        ax.plot(best["n_components"], best[self.criterion], marker="o", markersize=12,
                markerfacecolor="none", markeredgecolor="tab:red", linestyle="none",
                label=f"best: {self.best_n_components_}")
        ax.set_xlabel("number of components")
        ax.set_ylabel(f"{self.criterion.upper()} (lower is better)")
        ax.set_xticks(list(t["n_components"]))
        ax.set_title(f"{type(self.best_estimator_).__name__}: {self.criterion.upper()} by number of components")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=dpi)
        return path


def _check_candidates(n_components):
    try:
        values = list(n_components)
    except TypeError:
        raise ValueError(
            f"n_components={n_components!r} must be a sequence of integers, e.g. range(1, 11)"
        ) from None
    if not values:
        raise ValueError("n_components is empty; give at least one candidate, e.g. range(1, 11)")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"n_components holds {k!r}; every candidate must be an integer >= 1")
    if len(set(values)) != len(values):
        raise ValueError(f"n_components={values} names a candidate twice")
    return sorted(int(k) for k in values)


def select_components(
    estimator, X, n_components=range(1, 11), criterion="bic", *, columns=None, callbacks=()
):
    """Fit ``estimator`` for every candidate number of components in shared passes and
    keep the best by an information criterion.

    Parameters
    ----------
    estimator : BaseMixture
        Any emdask mixture (unfitted or not); each candidate is a clone with
        ``set_params(n_components=k)`` and the estimator's other arguments (``n_init``
        restarts, ``tol``, ``max_iter``, ``random_state``, ...). ``estimator`` itself is
        left unchanged.
    X : array-like or dask collection of shape (n_rows, n_features)
    n_components : iterable of int, default=range(1, 11)
    criterion : {'bic', 'aic', 'icl'}, default='bic'
        See the module documentation; lower is better.
    columns : list of str, optional
        Columns of a frame to model.
    callbacks : sequence of callables
        As in ``fit``: called after every model's M-step (``info.model`` indexes the
        restarts of all candidates, in order of ``n_components``); ``True`` stops.

    Returns
    -------
    SelectionResult
        ``.best_estimator_``, ``.table_`` (pandas), ``.plot(path)``.
    """
    if not isinstance(estimator, BaseMixture):
        raise TypeError(f"estimator must be an emdask mixture estimator, got {type(estimator).__name__}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {list(CRITERIA)}")
    ks = _check_candidates(n_components)
    params = estimator.get_params()
    candidates = [type(estimator)(**params).set_params(n_components=k) for k in ks]
    for cand in candidates:
        cand._validate_params()
    context = candidates[0]._prepare_fit(X, columns)
    data = context.data
    for i, cand in enumerate(candidates):
        try:
            cand._check_extra_parameters(data.n_features)
        except ValueError as err:
            raise ValueError(f"with n_components={cand.n_components}: {err}") from None
        with warnings.catch_warnings():
            if i:  # say it once
                warnings.simplefilter("ignore", DataWarning)
            cand._check_data(context)

    bests = fit_candidates(candidates, context, seed_from(estimator.random_state), callbacks=callbacks)
    unconverged = [
        cand.n_components
        for cand, best in zip(candidates, bests)
        if not best.converged and estimator.max_iter > 0
    ]
    if unconverged:
        warnings.warn(
            f"the candidates with n_components={unconverged} did not converge; increase "
            "max_iter or tol, or try other init parameters",
            ConvergenceWarning,
            stacklevel=2,
        )

    tasks = [
        (_criteria_chunk, (best.family, cand._fitted_params()), operator.add)
        for cand, best in zip(candidates, bests)
    ]
    rows = []
    for cand, (loglik, n, entropy) in zip(candidates, map_reduce_many(data, tasks)):
        p = cand._n_parameters()
        singular = cand._singular(n)
        bic = -2.0 * loglik + p * np.log(n)
        rows.append(
            {
                "n_components": cand.n_components,
                "bic": float(bic),
                "aic": float(-2.0 * loglik + 2.0 * p),
                "icl": float(bic + 2.0 * entropy),
                "log_likelihood": float(loglik),
                "n_parameters": int(p),
                "n_iter": int(cand.n_iter_),
                "converged": bool(cand.converged_),
                "singular": bool(singular),
                "singular_reason": describe_singular(singular),
            }
        )
    for cand in candidates:
        cand.n_passes_ = data.n_passes
    table = pd.DataFrame(rows)
    values = table[criterion].to_numpy()
    eligible = np.isfinite(values) & ~table["singular"].to_numpy()
    if not eligible.any():
        warnings.warn(
            f"every candidate is singular ({'; '.join(table['singular_reason'])}); the "
            f"{criterion.upper()} chose among them anyway. Use a larger reg_covar (or alpha) "
            "on the data's scale, or a simpler model.",
            DataWarning,
            stacklevel=2,
        )
        eligible = np.isfinite(values)
    finite = np.where(eligible, values, np.inf)
    best = int(np.argmin(finite))  # first minimum: the smallest k on a tie
    return SelectionResult(
        candidates[best],
        criterion,
        table,
        {cand.n_components: cand for cand in candidates},
        data.n_passes,
    )
