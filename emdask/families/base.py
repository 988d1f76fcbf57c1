"""What every model family shares: additive sufficient statistics and numeric helpers.

A family is a small object holding hyper-parameters (number of components, covariance
type, smoothing, ...) with four pure-numpy methods::

    params = family.initialize(...)                    # frozen dataclass of arrays
    stats  = family.partial_stats(block, params)       # E-step on one block
    stats  = stats_a + stats_b                         # associative, commutative
    params = family.m_step(stats, params)              # closed form

Families never see Dask: a block is a 2-D float64 numpy array, NaN marking a missing cell.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

#: The error of a component whose covariance is not positive definite.
ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical "
    "covariance (for instance caused by singleton or collapsed samples). Try to decrease the "
    "number of components, increase reg_covar, or scale the input data."
)

__all__ = [
    "Stats",
    "logsumexp_rows",
    "normalize_log_rows",
    "ROW_CHUNK",
    "log_ratios",
    "from_log_ratios",
    "logits",
    "from_logits",
    "floored_log",
    "block_memo",
]

#: A dict in which a kernel may keep what it derives from the block it is given alone (its
#: missingness patterns, say), set by the caller for the length of a call when it holds
#: that block unchanged from pass to pass and keeps the dict with it; ``None`` (the default)
#: when nothing may be kept. Entries are the kernels' own, keyed by what they depend on.
block_memo: ContextVar = ContextVar("emdask_block_memo", default=None)

#: Rows handled at once inside a block: a few hundred kilobytes per component stay in cache.
ROW_CHUNK = 2048

#: ``log`` of the smallest positive normal float64 (about -708): the floor of a logarithm of
#: a probability or rate that may be exactly 0.
LOG_TINY = float(np.log(np.finfo(np.float64).tiny))


@dataclass
class Stats:
    """Additive E-step statistics of one block (or of several blocks, once added).

    Attributes
    ----------
    n_rows : float
        Number of rows that carried information (sum of row weights).
    loglik : float
        Sum over those rows of the observed-data log-likelihood.
    terms : dict of str to ndarray
        The family's own sufficient statistics, added element-wise.
    """

    n_rows: float = 0.0
    loglik: float = 0.0
    terms: dict = field(default_factory=dict)

    def __add__(self, other):
        if isinstance(other, int) and other == 0:  # lets ``sum()`` start from 0
            return self
        if not self.terms:
            terms = dict(other.terms)
        elif not other.terms:
            terms = dict(self.terms)
        else:
            if self.terms.keys() != other.terms.keys():
                raise ValueError("cannot add statistics of different model families")
            terms = {key: self.terms[key] + other.terms[key] for key in self.terms}
        return Stats(self.n_rows + other.n_rows, self.loglik + other.loglik, terms)

    __radd__ = __add__

    @property
    def mean_loglik(self) -> float:
        """Mean log-likelihood per informative row (the EM lower bound)."""
        return self.loglik / self.n_rows if self.n_rows > 0 else float("nan")


def logsumexp_rows(a):
    """``log(sum(exp(a), axis=1))`` computed about the row maximum.

    Parameters
    ----------
    a : ndarray of shape (n_rows, n_components)

    Returns
    -------
    ndarray of shape (n_rows,)
    """
    m = a.max(axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(under="ignore"):
        s = np.exp(a - m[:, None]).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log(s) + m


def normalize_log_rows(a):
    """Responsibilities and per-row log-normalizer from weighted log-probabilities.

    Returns
    -------
    resp : ndarray of shape (n_rows, n_components)
    log_norm : ndarray of shape (n_rows,)
    """
    log_norm = logsumexp_rows(a)
    with np.errstate(under="ignore"):
        resp = np.exp(a - log_norm[:, None])
    return resp, log_norm


# --------------------------------------------------------------------------------------
# Variates from uniform draws (multiple imputation)
#
# A block's kernel gets uniform [0, 1) draws made for each row (and cell) and turns them
# into variates by inversion, one uniform per variate: a row's draws then depend on its own
# uniforms only, not on the other rows of its block.
# --------------------------------------------------------------------------------------

#: half the spacing of 53-bit uniforms: ``u + _HALF`` is in (0, 1), symmetric about 1/2
_HALF = 2.0**-54


def draw_labels(resp, u):
    """One component per row, drawn from its responsibilities (shape (n, k)) by the
    uniforms ``u`` (shape (n,)): the first component whose cumulated responsibility
    exceeds ``u``."""
    return np.minimum((resp.cumsum(axis=1) < u[:, None]).sum(axis=1), resp.shape[1] - 1)


def standard_normal(u):
    """Standard normal variates from uniforms by the inverse normal CDF (each uniform moved
    to the middle of its spacing, so none is 0)."""
    from scipy.special import ndtri

    return ndtri(np.asarray(u, dtype=np.float64) + _HALF)


def poisson_from_uniforms(u, rate):
    """Poisson(``rate``) variates by inversion: the smallest ``k`` with ``P(X <= k) >= u``
    (``u`` moved to the middle of its spacing); ``u`` and ``rate`` broadcast."""
    from scipy.stats import poisson

    u, rate = np.broadcast_arrays(
        np.asarray(u, dtype=np.float64), np.asarray(rate, dtype=np.float64)
    )
    out = np.zeros(u.shape)
    live = rate > 0
    if live.any():
        out[live] = poisson.ppf(u[live] + _HALF, rate[live])
    return out


# --------------------------------------------------------------------------------------
# Unconstrained coordinates (for accelerated EM, :mod:`emdask.engine.squarem`)
#
# Every point of R^n maps back to a valid parameter: a probability vector through its
# centred log-ratios, a probability through its logit, a positive number through its log.
# Values of exactly 0 (or 1) map to about ±708, which maps back to 1e-308 (or 1.0).
# --------------------------------------------------------------------------------------


def floored_log(x):
    """``log(x)``, floored at ``LOG_TINY`` (no ``-inf`` for an exact 0)."""
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(x), LOG_TINY)


def log_ratios(p, axis=-1):
    """Centred log-ratios of probability vectors along ``axis`` (inverse: ``from_log_ratios``)."""
    logp = floored_log(p)
    return logp - logp.mean(axis=axis, keepdims=True)


def from_log_ratios(z, axis=-1):
    """Probability vectors (softmax along ``axis``) from log-ratios."""
    z = z - z.max(axis=axis, keepdims=True)
    with np.errstate(under="ignore"):
        e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def logits(p):
    """``log(p / (1 - p))`` with both logarithms floored (inverse: ``from_logits``)."""
    return floored_log(p) - floored_log(1.0 - p)


def from_logits(z):
    """Probabilities from logits."""
    with np.errstate(over="ignore", under="ignore"):
        return 1.0 / (1.0 + np.exp(-z))
