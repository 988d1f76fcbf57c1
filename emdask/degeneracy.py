"""Singular components: fits whose likelihood is high for the wrong reason.

The likelihood of a Gaussian mixture is unbounded: a component that sits on a few rows
sharing a value (an integer-valued column, a spike of repeated answers) shrinks its variance
in that direction until only ``reg_covar`` holds it, and its log-likelihood grows without
bound. Model-based clustering calls such a fit *singular* and never selects it (mclust's
BIC is ``NA`` for it). A component is singular here when

* its covariance (any direction, for every ``covariance_type``) is at the ``reg_covar``
  floor: its smallest eigenvalue is at most ``FLOOR_FACTOR * reg_covar`` (or, with
  ``reg_covar=0``, numerically zero relative to its largest), or
* it rests on fewer effective rows (``weights_ * n_rows``) than it has free parameters
  (Gaussian families), or
* for discrete families and the discrete columns of mixed tables, it rests on fewer
  effective rows than its free parameters **and** one of its probabilities or rates has
  collapsed to the smoothing floor (less than ``COLLAPSED_MASS`` expected rows on an outcome
  that the rest of the table holds). Discrete likelihoods are bounded, so a small
  component that is not collapsed (a few rows with very high counts, say) is a genuine
  finding, not a singularity.

:func:`singular_components` answers for any fitted emdask mixture; ``fit`` warns with it and
:func:`emdask.select_components` marks such candidates and never chooses them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLOOR_FACTOR", "COLLAPSED_MASS", "singular_components", "describe_singular"]

#: A covariance eigenvalue at most this multiple of ``reg_covar`` is at the floor.
FLOOR_FACTOR = 2.0
#: An outcome (level, 0/1 value, count) a component expects on fewer rows than this has
#: collapsed to the smoothing floor.
COLLAPSED_MASS = 1e-3
#: With ``reg_covar=0``: an eigenvalue below this fraction of the largest is numerically 0.
_RELATIVE_FLOOR = 1e-12


def _covariance_floor(covariances, covariance_type, reg_covar, k):
    """Per component: is any direction of its covariance at the floor?"""
    cov = np.asarray(covariances, dtype=np.float64)
    if cov.size == 0:
        return np.zeros(k, dtype=bool)
    if covariance_type == "full":
        eig = np.linalg.eigvalsh(cov)  # (k, d), ascending
        low, high = eig[:, 0], eig[:, -1]
    elif covariance_type == "tied":
        eig = np.linalg.eigvalsh(cov)
        low, high = np.full(k, eig[0]), np.full(k, eig[-1])
    elif covariance_type == "diag":
        low, high = cov.min(axis=1), cov.max(axis=1)
    else:  # spherical
        low = high = cov.reshape(k)
    return (low <= FLOOR_FACTOR * reg_covar) | (low <= _RELATIVE_FLOOR * np.maximum(high, 0.0))


def _gaussian_parameters(d, covariance_type):
    """Free parameters of one component (its mean and covariance; the shared covariance of
    ``'tied'`` belongs to no component)."""
    return {"full": d + d * (d + 1) / 2, "tied": d, "diag": 2 * d, "spherical": d + 1}[
        covariance_type
    ] if d else 0


def _collapsed_two_sided(p, rows):
    """(k,) any probability with (almost) no expected rows on one of its two outcomes."""
    p = np.asarray(p, dtype=np.float64).reshape(rows.size, -1)
    if p.shape[1] == 0:
        return np.zeros(rows.size, dtype=bool)
    rare = np.minimum(p, 1.0 - p) * rows[:, None]
    return (rare < COLLAPSED_MASS).any(axis=1)


def _collapsed_levels(theta, n_levels, rows):
    """(k,) any level of a categorical column with (almost) no expected rows."""
    theta = np.asarray(theta, dtype=np.float64)
    out = np.zeros(rows.size, dtype=bool)
    for j, L in enumerate(n_levels):
        if L > 1:
            out |= (theta[:, j, :L] * rows[:, None] < COLLAPSED_MASS).any(axis=1)
    return out


def _collapsed_rates(rates, rows):
    rates = np.asarray(rates, dtype=np.float64).reshape(rows.size, -1)
    if rates.shape[1] == 0:
        return np.zeros(rows.size, dtype=bool)
    return (rates * rows[:, None] < COLLAPSED_MASS).any(axis=1)


def _n_levels(estimator, names=None):
    cats = estimator.categories_
    if names is not None:
        return [len(cats[c]) for c in names]
    return [len(levels) for levels in cats]


def singular_components(estimator, n_rows):
    """The singular components of a fitted mixture, with the reason for each.

    Parameters
    ----------
    estimator : fitted emdask mixture
    n_rows : float
        Rows with an observed cell in the data it was fitted on (effective rows of component
        ``k`` are ``weights_[k] * n_rows``).

    Returns
    -------
    dict of int to str
        Component index to a short reason (``'covariance at the reg_covar floor'``, ...);
        empty when no component is singular.
    """
    weights = np.asarray(estimator.weights_, dtype=np.float64)
    k = weights.size
    rows = weights * float(n_rows)
    floor = np.zeros(k, dtype=bool)
    collapsed = np.zeros(k, dtype=bool)
    gaussian_params = discrete_params = 0

    # what an estimator holds says what it models (no import of the estimator classes)
    means = getattr(estimator, "means_", None)
    if means is not None and np.asarray(means).size:
        d = np.asarray(means).shape[1]
        floor = _covariance_floor(
            estimator.covariances_, estimator.covariance_type, estimator.reg_covar, k
        )
        gaussian_params = _gaussian_parameters(d, estimator.covariance_type)
    two_sided = [
        np.asarray(getattr(estimator, name)).reshape(k, -1)
        for name in ("binary_probabilities_", "probabilities_")
        if hasattr(estimator, name) and np.asarray(getattr(estimator, name)).ndim < 3
    ]
    for p in two_sided:
        collapsed |= _collapsed_two_sided(p, rows)
        discrete_params += p.shape[1]
    if hasattr(estimator, "rates_"):
        rates = np.asarray(estimator.rates_).reshape(k, -1)
        collapsed |= _collapsed_rates(rates, rows)
        discrete_params += rates.shape[1]
    for name in ("category_probabilities_", "probabilities_"):
        theta = np.asarray(getattr(estimator, name, np.zeros((k, 0))))
        if theta.ndim == 3:
            families = getattr(estimator, "column_families_", None)
            names = None if families is None else [c for c, f in families.items()
                                                   if f == "categorical"]
            levels = _n_levels(estimator, names)
            collapsed |= _collapsed_levels(theta, levels, rows)
            discrete_params += sum(L - 1 for L in levels)

    total = gaussian_params + discrete_params
    few = rows < total
    out = {}
    for j in range(k):
        reasons = []
        if floor[j]:
            reasons.append("covariance at the reg_covar floor")
        if few[j] and gaussian_params:
            reasons.append(f"{rows[j]:.1f} rows for {total:g} parameters")
        elif few[j] and collapsed[j]:
            reasons.append(
                f"a probability or rate at the smoothing floor on {rows[j]:.1f} rows "
                f"for {total:g} parameters"
            )
        if reasons:
            out[j] = "; ".join(reasons)
    return out


def describe_singular(singular):
    """One phrase naming the singular components and why, for warnings and logs."""
    return ", ".join(f"component {j} ({why})" for j, why in sorted(singular.items()))
