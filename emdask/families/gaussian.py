"""Gaussian mixture family: E-step statistics per block, closed-form M-step.

Four covariance types, as in scikit-learn:

=========== ================================ ===========================
type        ``covariances`` shape            ``precisions_cholesky`` shape
=========== ================================ ===========================
full        (n_components, d, d)             (n_components, d, d)
tied        (d, d)                           (d, d)
diag        (n_components, d)                (n_components, d)
spherical   (n_components,)                  (n_components,)
=========== ================================ ===========================

Missing cells (NaN) are handled exactly. For a row with observed part ``o`` and missing part
``m``, and a component with precision ``P = Σ⁻¹``:

* the missing cells are filled with their conditional mean
  ``x_m = mu_m - P_mm⁻¹ P_mo (x_o - mu_o)``; the Mahalanobis distance of the filled row
  under the full precision equals the observed part's distance under ``Σ_oo``;
* ``log det Σ_oo = log det Σ + log det P_mm``;
* the conditional covariance ``P_mm⁻¹`` is what the M-step adds to the second moment.

Per row and component this costs O(d² + d_m³) (d_m the row's missing count), with no Python
loop over rows: rows are grouped by their number of missing cells and handled as batches.
Statistics are accumulated in float64 about the previous means (the shift), never as raw
``sum(x xᵀ) - n mu muᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from . import _kernels
from .base import (
    ROW_CHUNK,
    Stats,
    draw_labels,
    from_log_ratios,
    log_ratios,
    normalize_log_rows,
    standard_normal,
)

__all__ = [
    "COVARIANCE_TYPES",
    "GaussianFamily",
    "GaussianParams",
    "compute_precision_cholesky",
    "precisions_from_cholesky",
    "reference_partial_stats",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
LOG_2PI = np.log(2.0 * np.pi)
EPS = np.finfo(np.float64).eps

_ILL_DEFINED = _kernels.ILL_DEFINED


@dataclass(frozen=True)
class GaussianParams:
    """Parameters of a Gaussian mixture (shapes in the module docstring)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str

    @property
    def precisions(self):
        return precisions_from_cholesky(self.precisions_cholesky, self.covariance_type)


# --------------------------------------------------------------------------------------
# Covariance <-> precision Cholesky, one small function per covariance type
# --------------------------------------------------------------------------------------


def _cholesky_precision_dense(cov):
    try:
        chol = linalg.cholesky(cov, lower=True)
    except linalg.LinAlgError:
        raise ValueError(_ILL_DEFINED) from None
    return linalg.solve_triangular(chol, np.eye(cov.shape[0]), lower=True).T


def compute_precision_cholesky(covariances, covariance_type):
    """Upper-triangular ``U`` with ``precision = U Uᵀ``, from covariance matrices.

    Raises
    ------
    ValueError
        If a covariance is not positive definite; the message says to increase
        ``reg_covar`` or scale the data.
    """
    if covariance_type == "full":
        return np.stack([_cholesky_precision_dense(c) for c in covariances])
    if covariance_type == "tied":
        return _cholesky_precision_dense(covariances)
    if np.any(np.asarray(covariances) <= 0.0):
        raise ValueError(_ILL_DEFINED)
    return 1.0 / np.sqrt(covariances)


def precisions_from_cholesky(precisions_cholesky, covariance_type):
    """Precision matrices (or vectors) from their Cholesky factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", precisions_cholesky, precisions_cholesky)
    if covariance_type == "tied":
        return precisions_cholesky @ precisions_cholesky.T
    return precisions_cholesky**2


def covariances_from_precisions(precisions, covariance_type):
    """Covariances from precisions (used when a user gives ``precisions_init``)."""
    if covariance_type == "full":
        return np.stack([linalg.inv(p) for p in precisions])
    if covariance_type == "tied":
        return linalg.inv(precisions)
    return 1.0 / precisions


def _m_step_full(nk, delta, s2, reg_covar):
    cov = s2 / nk[:, None, None] - delta[:, :, None] * delta[:, None, :]
    idx = np.arange(cov.shape[1])
    cov[:, idx, idx] += reg_covar
    return cov


def _m_step_tied(nk, delta, s2, reg_covar):
    cov = (s2.sum(axis=0) - np.einsum("k,ki,kj->ij", nk, delta, delta)) / nk.sum()
    cov.flat[:: cov.shape[0] + 1] += reg_covar
    return cov


def _m_step_diag(nk, delta, s2, reg_covar):
    return s2 / nk[:, None] - delta**2 + reg_covar


def _m_step_spherical(nk, delta, s2, reg_covar):
    return _m_step_diag(nk, delta, s2, reg_covar).mean(axis=1)


_M_STEP = {
    "full": _m_step_full,
    "tied": _m_step_tied,
    "diag": _m_step_diag,
    "spherical": _m_step_spherical,
}

_N_COV_PARAMETERS = {
    "full": lambda k, d: k * d * (d + 1) / 2.0,
    "tied": lambda k, d: d * (d + 1) / 2.0,
    "diag": lambda k, d: k * d,
    "spherical": lambda k, d: k,
}


# --------------------------------------------------------------------------------------
# Covariances <-> unconstrained coordinates (for accelerated EM), one pair per type:
# a Cholesky factor with its diagonal as logarithms (full, tied), log-variances (diag,
# spherical). Any vector maps back to positive-definite covariances.
# --------------------------------------------------------------------------------------


def _free_dense(cov):
    d = cov.shape[-1]
    L = np.linalg.cholesky(cov)
    idx = np.arange(d)
    L[..., idx, idx] = np.log(L[..., idx, idx])
    rows, cols = np.tril_indices(d)
    return L[..., rows, cols].ravel()


def _dense_from_free(z, shape):
    d = shape[-1]
    rows, cols = np.tril_indices(d)
    L = np.zeros((int(np.prod(shape[:-2], dtype=int)), d, d))
    L[:, rows, cols] = z.reshape(L.shape[0], -1)
    idx = np.arange(d)
    L[:, idx, idx] = np.exp(L[:, idx, idx])
    return (L @ np.swapaxes(L, 1, 2)).reshape(shape)


def _free_positive(cov):
    return np.log(cov).ravel()


def _positive_from_free(z, shape):
    return np.exp(z).reshape(shape)


#: covariance type -> (to unconstrained, from unconstrained given the covariances' shape)
_FREE_COVARIANCE = {
    "full": (_free_dense, _dense_from_free),
    "tied": (_free_dense, _dense_from_free),
    "diag": (_free_positive, _positive_from_free),
    "spherical": (_free_positive, _positive_from_free),
}


def gaussian_to_unconstrained(params):
    """Means and covariances of ``params`` as one flat vector (weights excluded)."""
    to_free, _ = _FREE_COVARIANCE[params.covariance_type]
    return np.concatenate([params.means.ravel(), to_free(params.covariances)])


def gaussian_from_unconstrained(z, like, weights):
    """:class:`GaussianParams` shaped as ``like`` from ``gaussian_to_unconstrained``'s vector.

    Raises
    ------
    ValueError
        If a covariance is numerically singular (the caller rejects the point).
    """
    _, from_free = _FREE_COVARIANCE[like.covariance_type]
    n_means = like.means.size
    means = z[:n_means].reshape(like.means.shape)
    cov = from_free(z[n_means:], like.covariances.shape)
    prec_chol = compute_precision_cholesky(cov, like.covariance_type)
    return GaussianParams(weights, means, cov, prec_chol, like.covariance_type)


# --------------------------------------------------------------------------------------
# Kernels on one row chunk
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """Per-call arrays derived once from the parameters."""

    dense: bool
    means: np.ndarray  # (k, d)
    factor: np.ndarray  # dense: U (k, d, d); diagonal: p (k, d)
    precision: np.ndarray | None  # dense: P (k, d, d)
    const: np.ndarray  # (k,) log w + log det U - d/2 log 2π


def _prepare(params: GaussianParams) -> _Prepared:
    k, d = params.means.shape
    ctype = params.covariance_type
    pc = params.precisions_cholesky
    if ctype in ("full", "tied"):
        U = pc if ctype == "full" else np.broadcast_to(pc, (k, d, d))
        log_det = np.log(np.diagonal(U, axis1=1, axis2=2)).sum(axis=1)
        P = np.einsum("kij,klj->kil", U, U)
        factor, dense = U, True
    else:
        p = pc if ctype == "diag" else np.repeat(pc[:, None], d, axis=1)
        log_det = np.log(p).sum(axis=1)
        factor, P, dense = p, None, False
    with np.errstate(divide="ignore"):
        log_w = np.log(params.weights)
    const = log_w + log_det - 0.5 * d * LOG_2PI
    return _Prepared(dense, params.means, factor, P, const)


def _missing_groups(miss):
    """Incomplete rows grouped by their number of missing cells.

    Returns a list of ``(rows, cols)``: ``rows`` (n_g,) row positions, ``cols`` (n_g, m)
    the missing columns of each row, ascending.
    """
    incomplete = np.flatnonzero(miss.any(axis=1))
    if incomplete.size == 0:
        return []
    counts = miss[incomplete].sum(axis=1)
    groups = []
    for m in np.unique(counts):
        rows = incomplete[counts == m]
        cols = np.nonzero(miss[rows])[1].reshape(rows.size, m)
        groups.append((rows, cols))
    return groups


@dataclass
class _Component:
    """One component's view of a chunk: filled-and-centred rows and their log-density."""

    centred: np.ndarray  # (b, d): x - mu with missing cells at their conditional mean
    log_prob: np.ndarray  # (b,) log w + log N(x_o)
    cond: list  # per missing group: (rows, cols, L) with P_mm = L Lᵀ (dense) or None


def _dense_component(Xb, miss, groups, j, prep):
    Xc = Xb - prep.means[j]
    correction = None
    cond = []
    if groups:
        P = prep.precision[j]
        Xc[miss] = 0.0
        correction = np.zeros(Xb.shape[0])
        for rows, cols in groups:
            m = cols.shape[1]
            v = np.take_along_axis(Xc[rows] @ P, cols, axis=1)  # P_mo (x_o - mu_o)
            Pmm = P[cols[:, :, None], cols[:, None, :]]
            try:
                L = np.linalg.cholesky(Pmm)
            except np.linalg.LinAlgError:
                raise ValueError(_ILL_DEFINED) from None
            z = np.linalg.solve(Pmm, v[:, :, None])[:, :, 0]
            Xc[rows[:, None], cols] = -z
            log_det_mm = 2.0 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
            correction[rows] = 0.5 * m * LOG_2PI - 0.5 * log_det_mm
            cond.append((rows, cols, L))
    Y = Xc @ prep.factor[j]
    log_prob = prep.const[j] - 0.5 * np.einsum("ij,ij->i", Y, Y)
    if correction is not None:
        log_prob += correction
    return _Component(Xc, log_prob, cond)


def _diagonal_component(Xb, miss, groups, j, prep):
    Xc = Xb - prep.means[j]
    p = prep.factor[j]
    if groups:
        Xc[miss] = 0.0
    Y = Xc * p
    log_prob = prep.const[j] - 0.5 * np.einsum("ij,ij->i", Y, Y)
    if groups:
        log_prob += miss @ (0.5 * LOG_2PI - np.log(p))
    return _Component(Xc, log_prob, [])


def _components(Xb, prep):
    miss = np.isnan(Xb)
    groups = _missing_groups(miss) if miss.any() else []
    kernel = _dense_component if prep.dense else _diagonal_component
    comps = [kernel(Xb, miss, groups, j, prep) for j in range(prep.means.shape[0])]
    log_prob = np.column_stack([c.log_prob for c in comps])
    return comps, log_prob, miss


def _chunks(n):
    for start in range(0, n, ROW_CHUNK):
        yield slice(start, min(start + ROW_CHUNK, n))


# --------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------


class GaussianFamily:
    """Gaussian mixture with ``n_components`` components of one covariance type.

    Parameters
    ----------
    n_components : int
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
        Added to the diagonal of every covariance in the M-step.
    """

    name = "gaussian"

    def __init__(self, n_components, covariance_type="full", reg_covar=1e-6):
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type={covariance_type!r} is not one of {COVARIANCE_TYPES}"
            )
        self.n_components = int(n_components)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)

    def __repr__(self):
        return (
            f"GaussianFamily(n_components={self.n_components}, "
            f"covariance_type={self.covariance_type!r}, reg_covar={self.reg_covar})"
        )

    # -- parameters ---------------------------------------------------------------------

    def make_params(self, weights, means, covariances):
        """Parameters from weights, means and covariances (checked positive definite)."""
        weights = np.asarray(weights, dtype=np.float64)
        means = np.asarray(means, dtype=np.float64)
        covariances = np.asarray(covariances, dtype=np.float64)
        prec_chol = compute_precision_cholesky(covariances, self.covariance_type)
        return GaussianParams(weights, means, covariances, prec_chol, self.covariance_type)

    def n_parameters(self, n_features):
        """Number of free parameters (for BIC/AIC)."""
        k, d = self.n_components, n_features
        return int(_N_COV_PARAMETERS[self.covariance_type](k, d) + k * d + k - 1)

    # -- E-step ---------------------------------------------------------------------------

    def partial_stats(self, X, params, weights=None):
        """E-step statistics of one block.

        Every component is handled at once by a few matrix products per row chunk (see
        :mod:`emdask.families._kernels`); :func:`reference_partial_stats` computes the same
        statistics component by component.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features), float64, NaN for a missing cell
        params : GaussianParams
        weights : ndarray of shape (n_rows,), optional
            Row weights (bootstrap replicates); ``None`` means one per row.

        Returns
        -------
        Stats
            ``terms``: ``nk`` (k,), ``s1`` (k, d) and ``s2`` (k, d, d) or (k, d), the
            responsibility-weighted counts, first and second moments about ``params.means``.
            A row with every cell missing carries no information and is left out.
        """
        k, d = params.means.shape
        prep = _prepare(params)
        totals = _kernels.Totals()
        if prep.dense:
            block = _kernels.dense_block_stats(X, weights, params.means, params.weights,
                                               prep.factor, prep.const)
            if block is not None:
                n_rows, loglik, nk, s1, s2 = block
                return Stats(n_rows, loglik, {"nk": nk, "s1": s1, "s2": s2})
        complete, complete_w, incomplete = _kernels.row_selection(X, weights)
        if prep.dense:
            kernel = _kernels.DenseKernel(params.means, params.weights, prep.factor, prep.const)
            s1 = np.zeros((k, d))
            s2 = np.zeros((k, d, d))
            nk = kernel.complete_stats(complete, complete_w, s1, s2, totals)
            if incomplete is not None:
                nk += kernel.incomplete_stats(incomplete, s1, s2, totals)
            s2 = 0.5 * (s2 + s2.transpose(0, 2, 1))
        else:
            kernel = _kernels.DiagonalKernel(params.means, prep.factor, prep.const)
            s1 = np.zeros((k, d))
            s2 = np.zeros((k, d))
            nk = kernel.stats(complete, None, complete_w, s1, s2, totals)
            if incomplete is not None:
                nk += kernel.stats(
                    incomplete.X, incomplete.miss, incomplete.weights, s1, s2, totals
                )
        return Stats(totals.n_rows, totals.loglik, {"nk": nk, "s1": s1, "s2": s2})

    # -- M-step ---------------------------------------------------------------------------

    def m_step(self, stats, params):
        """New parameters from statistics accumulated about ``params.means``."""
        return self.params_from_stats(stats, params.means)

    def params_from_stats(self, stats, shift):
        """Closed-form M-step from statistics accumulated about ``shift`` (k, d)."""
        t = stats.terms
        nk = t["nk"] + 10 * EPS
        delta = t["s1"] / nk[:, None]
        means = shift + delta
        cov = _M_STEP[self.covariance_type](nk, delta, t["s2"], self.reg_covar)
        return self.make_params(nk / nk.sum(), means, cov)

    # -- unconstrained coordinates (accelerated EM) -----------------------------------------

    def to_unconstrained(self, params):
        """Flat vector of log-ratio weights, means and covariance Cholesky factors (log
        diagonals); every vector maps back to valid parameters."""
        return np.concatenate([log_ratios(params.weights), gaussian_to_unconstrained(params)])

    def from_unconstrained(self, z, like):
        """Parameters from ``to_unconstrained``'s vector (shapes taken from ``like``)."""
        k = like.weights.size
        return gaussian_from_unconstrained(z[k:], like, from_log_ratios(z[:k]))

    # -- initialisation ---------------------------------------------------------------------

    def assignment_stats(self, X, centers, labels):
        """Statistics of a hard assignment of rows to ``centers`` (for initialisation).

        Missing cells take the value of their row's centre, so they add nothing.
        """
        k, d = centers.shape
        dense = self.covariance_type in ("full", "tied")
        nk = np.bincount(labels, minlength=k).astype(np.float64)
        s1 = np.zeros((k, d))
        s2 = np.zeros((k, d, d)) if dense else np.zeros((k, d))
        for j in range(k):
            Xc = X[labels == j] - centers[j]
            Xc[np.isnan(Xc)] = 0.0
            s1[j] = Xc.sum(axis=0)
            s2[j] = Xc.T @ Xc if dense else (Xc * Xc).sum(axis=0)
        return Stats(float(X.shape[0]), 0.0, {"nk": nk, "s1": s1, "s2": s2})

    def responsibility_stats(self, X, resp, shift):
        """Statistics of given soft responsibilities about ``shift`` (for initialisation)."""
        k, d = shift.shape
        dense = self.covariance_type in ("full", "tied")
        s1 = np.zeros((k, d))
        s2 = np.zeros((k, d, d)) if dense else np.zeros((k, d))
        for j in range(k):
            Xc = X - shift[j]
            Xc[np.isnan(Xc)] = 0.0
            r = resp[:, j]
            s1[j] = r @ Xc
            s2[j] = (Xc * r[:, None]).T @ Xc if dense else r @ (Xc * Xc)
        return Stats(float(X.shape[0]), 0.0, {"nk": resp.sum(axis=0), "s1": s1, "s2": s2})

    # -- per-row quantities -------------------------------------------------------------------

    def weighted_log_prob(self, X, params):
        """``log w_k + log p(x_o | k)`` for every row and component, shape (n_rows, k)."""
        prep = _prepare(params)
        out = np.empty((X.shape[0], params.means.shape[0]))
        for sl in _chunks(X.shape[0]):
            out[sl] = _components(X[sl], prep)[1]
        return out

    def impute(self, X, params):
        """Rows with their missing cells at the conditional expectation given the observed
        cells (responsibility-weighted over components); observed cells are returned as they
        are, bit for bit."""
        prep = _prepare(params)
        out = np.array(X, dtype=np.float64, copy=True)
        for sl in _chunks(X.shape[0]):
            Xb = out[sl]
            miss = np.isnan(Xb)
            if not miss.any():
                continue
            comps, log_prob, miss = _components(Xb, prep)
            resp, _ = normalize_log_rows(log_prob)
            fill = sum(resp[:, j, None] * (c.centred + prep.means[j]) for j, c in enumerate(comps))
            Xb[miss] = fill[miss]
        return out

    def sample_missing(self, X, params, uniforms):
        """Rows with their missing cells drawn from the conditional distribution.

        Each row draws a component from its posterior given the observed cells, then the
        missing cells from that component's conditional normal.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
        params : GaussianParams
        uniforms : callable
            ``uniforms(rows)`` gives the uniform [0, 1) draws of the block rows ``rows`` (a
            slice), shape ``(n, 1 + n_features)``: column 0 picks the component, column
            ``1 + j`` gives cell ``j`` its standard normal variate (inverse normal CDF). A
            row's draws then depend on its own uniforms only.
        """
        prep = _prepare(params)
        out = np.array(X, dtype=np.float64, copy=True)
        k, d = params.means.shape
        for sl in _chunks(X.shape[0]):
            Xb = out[sl]
            if not np.isnan(Xb).any():
                continue
            comps, log_prob, miss = _components(Xb, prep)
            resp, _ = normalize_log_rows(log_prob)
            u = uniforms(sl)
            label = draw_labels(resp, u[:, 0])
            noise = standard_normal(u[:, 1:])
            draw = np.empty_like(Xb)
            for j, comp in enumerate(comps):
                sel = label == j
                if not sel.any():
                    continue
                value = comp.centred + prep.means[j]
                if prep.dense:
                    for rows, cols, L in comp.cond:
                        # x_m ~ N(mean, P_mm⁻¹) with P_mm = L Lᵀ:  x_m = mean + L⁻ᵀ ε
                        eps = noise[rows[:, None], cols]
                        step = np.linalg.solve(np.swapaxes(L, 1, 2), eps[:, :, None])[:, :, 0]
                        value[rows[:, None], cols] += step
                else:
                    value += noise / prep.factor[j]
                draw[sel] = value[sel]
            Xb[miss] = draw[miss]
        return out

    def sample(self, params, n_samples, rng):
        """Draw ``n_samples`` rows; returns ``(X, labels)``."""
        k, d = params.means.shape
        counts = rng.multinomial(n_samples, params.weights)
        ctype = self.covariance_type
        X, y = [], []
        for j, (mean, n_j) in enumerate(zip(params.means, counts)):
            if ctype == "full":
                L = np.linalg.cholesky(params.covariances[j])
            elif ctype == "tied":
                L = np.linalg.cholesky(params.covariances)
            elif ctype == "diag":
                L = np.diag(np.sqrt(params.covariances[j]))
            else:
                L = np.sqrt(params.covariances[j]) * np.eye(d)
            X.append(mean + rng.standard_normal((n_j, d)) @ L.T)
            y.append(np.full(n_j, j, dtype=np.int64))
        return np.vstack(X), np.concatenate(y)


def _add_conditional_covariance(s2, r, cols, L):
    """``s2[m, m] += Σ_rows r · P_mm⁻¹`` for rows sharing a missing count."""
    d = s2.shape[0]
    m = cols.shape[1]
    Linv = np.linalg.solve(L, np.broadcast_to(np.eye(m), L.shape))
    cov = np.einsum("nji,njk->nik", Linv, Linv)  # P_mm⁻¹ = L⁻ᵀ L⁻¹
    flat = cols[:, :, None] * d + cols[:, None, :]
    s2 += np.bincount(
        flat.ravel(), weights=(cov * r[:, None, None]).ravel(), minlength=d * d
    ).reshape(d, d)


def reference_partial_stats(family, X, params, weights=None):
    """:meth:`GaussianFamily.partial_stats` computed component by component, row chunk by
    row chunk, with missing cells handled per group of rows sharing their missing count.

    The plain reference the fast kernels are tested against; same arguments and result.
    """
    k, d = params.means.shape
    dense = family.covariance_type in ("full", "tied")
    nk = np.zeros(k)
    s1 = np.zeros((k, d))
    s2 = np.zeros((k, d, d)) if dense else np.zeros((k, d))
    n_rows = 0.0
    loglik = 0.0
    prep = _prepare(params)
    for sl in _chunks(X.shape[0]):
        comps, log_prob, miss = _components(X[sl], prep)
        resp, log_norm = normalize_log_rows(log_prob)
        any_missing = miss.any()
        row_w = ~miss.all(axis=1) if any_missing else None
        if weights is not None:
            row_w = weights[sl] if row_w is None else weights[sl] * row_w
        if row_w is None:
            n_rows += log_norm.size
            loglik += log_norm.sum()
        else:
            n_rows += row_w.sum()
            loglik += row_w @ np.where(row_w > 0, log_norm, 0.0)
            resp *= row_w[:, None]
        nk += resp.sum(axis=0)
        for j, comp in enumerate(comps):
            r = resp[:, j]
            Xc = comp.centred
            s1[j] += r @ Xc
            if dense:
                s2[j] += (Xc * r[:, None]).T @ Xc
                for rows, cols, L in comp.cond:
                    _add_conditional_covariance(s2[j], r[rows], cols, L)
            else:
                s2[j] += r @ (Xc * Xc)
                if any_missing:
                    s2[j] += (r @ miss) / prep.factor[j] ** 2
    return Stats(n_rows, loglik, {"nk": nk, "s1": s1, "s2": s2})
