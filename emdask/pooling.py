"""Combining analyses of multiply-imputed data sets by Rubin's rules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PooledEstimate", "pool"]


@dataclass(frozen=True)
class PooledEstimate:
    """Rubin's rules applied to ``m`` per-imputation estimates (element-wise for arrays).

    Attributes
    ----------
    estimate : pooled point estimate, the mean of the ``m`` estimates
    within : mean of the ``m`` variances (within-imputation variance ``Ū``)
    between : sample variance of the estimates (between-imputation variance ``B``)
    total : ``Ū + (1 + 1/m) B``
    dof : degrees of freedom of the t reference distribution (Rubin, 1987; with the
        Barnard–Rubin small-sample adjustment when ``dof_complete`` was given)
    riv : relative increase in variance due to missingness, ``(1 + 1/m) B / Ū``
    fmi : fraction of missing information
    n_imputations : m
    """

    estimate: np.ndarray
    within: np.ndarray
    between: np.ndarray
    total: np.ndarray
    dof: np.ndarray
    riv: np.ndarray
    fmi: np.ndarray
    n_imputations: int

    @property
    def std_error(self):
        return np.sqrt(self.total)

    def confidence_interval(self, level=0.95):
        """``(low, high)`` of the ``level`` t-interval around the pooled estimate."""
        if not 0 < level < 1:
            raise ValueError(f"level={level} must be between 0 and 1")
        half = stats.t.ppf(0.5 + level / 2, self.dof) * self.std_error
        return self.estimate - half, self.estimate + half


def pool(estimates, variances, dof_complete=None):
    """Pool per-imputation estimates and their variances by Rubin's rules.

    Parameters
    ----------
    estimates : array-like of shape (m,) or (m, p)
        The estimate of each of the ``m`` completed data sets (a scalar or ``p`` of them).
    variances : array-like of the same shape
        Their squared standard errors.
    dof_complete : float, optional
        Degrees of freedom of the complete-data analysis (e.g. ``n - 1`` for a mean);
        enables the Barnard–Rubin small-sample adjustment.

    Returns
    -------
    PooledEstimate
    """
    q = np.asarray(estimates, dtype=np.float64)
    u = np.asarray(variances, dtype=np.float64)
    if q.shape != u.shape:
        raise ValueError(f"estimates {q.shape} and variances {u.shape} must have the same shape")
    m = q.shape[0] if q.ndim else 0
    if m < 2:
        raise ValueError(f"pooling needs at least 2 imputations, got {m}")
    if np.any(u < 0) or not np.all(np.isfinite(u)):
        raise ValueError("variances must be finite and non-negative")
    qbar = q.mean(axis=0)
    ubar = u.mean(axis=0)
    b = q.var(axis=0, ddof=1)
    total = ubar + (1 + 1 / m) * b
    with np.errstate(divide="ignore", invalid="ignore"):
        riv = (1 + 1 / m) * b / ubar
        lam = np.where(total > 0, (1 + 1 / m) * b / total, 0.0)
        dof = np.where(lam > 0, (m - 1) / lam**2, np.inf)
        if dof_complete is not None:
            nu_com = float(dof_complete)
            nu_obs = (nu_com + 1) / (nu_com + 3) * nu_com * (1 - lam)
            dof = 1 / (1 / dof + 1 / nu_obs)
        fmi = (riv + 2 / (dof + 3)) / (riv + 1)
    values = [qbar, ubar, b, total, dof, riv, fmi]
    if qbar.ndim == 0:
        values = [float(v) for v in values]
    return PooledEstimate(*values, m)
