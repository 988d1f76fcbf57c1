"""Compiled per-row steps of the Gaussian E-step kernels (needs numba: the ``fast`` extra).

Each function does, in one pass over a chunk, what a sequence of numpy steps in
:mod:`emdask.families._kernels` does with several passes and temporaries; the numpy steps are
the reference the tests compare these with. The matrix products stay in BLAS.

Sums may be reassociated (vectorised): results agree with the numpy steps to rounding.
Importing this module raises ImportError when numba is not installed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Reassociation and fused multiply-add only; no assumption about NaN, infinities or
#: approximate exp/log.
_FASTMATH = {"reassoc", "contract", "nsz"}


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def complete_rows(y, xa, delta, const, weights, use_weights, w, nk):
    """Responsibilities and weighted centred rows of a chunk of complete rows.

    Parameters
    ----------
    y : ndarray (k, d, nb)
        ``(x - mu_j) U_j`` for every component, rows along the last axis.
    xa : ndarray (d + 1, nb)
        ``x - c`` (and a row of ones), rows along the last axis.
    delta : ndarray (k, d)
        ``mu_j - c``.
    const : ndarray (k,)
    weights : ndarray (nb,)
        Row weights, read when ``use_weights``.
    w : ndarray (k, d, nb), output
        ``r_ij (x_i - mu_j)``.
    nk : ndarray (k,), added to
        Summed responsibilities.

    Returns
    -------
    loglik, n_rows : float
    """
    k, d, nb = y.shape
    q = np.zeros((k, nb))
    for j in range(k):
        for l in range(d):
            for i in range(nb):
                v = y[j, l, i]
                q[j, i] += v * v
    loglik = 0.0
    n_rows = 0.0
    for i in range(nb):
        top = -np.inf
        for j in range(k):
            qj = const[j] - 0.5 * q[j, i]
            q[j, i] = qj
            if qj > top:
                top = qj
        if top == -np.inf:
            top = 0.0
        total = 0.0
        for j in range(k):
            e = np.exp(q[j, i] - top)
            q[j, i] = e
            total += e
        wi = weights[i] if use_weights else 1.0
        loglik += wi * (np.log(total) + top)
        n_rows += wi
        scale = wi / total
        for j in range(k):
            q[j, i] *= scale
    for j in range(k):
        s = 0.0
        for i in range(nb):
            s += q[j, i]
        nk[j] += s
        for l in range(d):
            dl = delta[j, l]
            for i in range(nb):
                w[j, l, i] = q[j, i] * (xa[l, i] - dl)
    return loglik, n_rows


@njit(cache=True, nogil=True)
def pattern_tables(P, cols, col_off, pat_m, inv_off, inv, corr):
    """``P_mm⁻¹`` and ``0.5 m log 2π - 0.5 log det P_mm`` for every pattern and component.

    Parameters
    ----------
    P : ndarray (k, d, d)
        Precisions.
    cols, col_off, pat_m, inv_off
        Flat pattern tables (see :func:`incomplete_rows`).
    inv : ndarray, output
        ``P_mm⁻¹`` of pattern p and component j at ``inv_off[p] + j m²``, row-major.
    corr : ndarray (n_patterns, k), output

    Returns
    -------
    bool
        False if some ``P_mm`` is not positive definite.
    """
    k = P.shape[0]
    log_2pi = np.log(2.0 * np.pi)
    size = 0
    for p in range(pat_m.size):
        size = max(size, pat_m[p])
    L = np.zeros((size, size))
    Li = np.zeros((size, size))
    for p in range(pat_m.size):
        m = pat_m[p]
        co = col_off[p]
        for j in range(k):
            log_det = 0.0
            prod = 1.0
            for a in range(m):
                for b in range(a + 1):
                    s = P[j, cols[co + a], cols[co + b]]
                    for c in range(b):
                        s -= L[a, c] * L[b, c]
                    if a == b:
                        if not s > 0.0:
                            return False
                        L[a, a] = np.sqrt(s)
                        prod *= s
                        if prod > 1e150 or prod < 1e-150:
                            log_det += np.log(prod)
                            prod = 1.0
                    else:
                        L[a, b] = s / L[b, b]
            for a in range(m):
                Li[a, a] = 1.0 / L[a, a]
                for c in range(a):
                    s = 0.0
                    for t in range(c, a):
                        s += L[a, t] * Li[t, c]
                    Li[a, c] = -s * Li[a, a]
            base = inv_off[p] + j * m * m
            for a in range(m):
                for b in range(m):
                    s = 0.0
                    for t in range(max(a, b), m):
                        s += Li[t, a] * Li[t, b]
                    inv[base + a * m + b] = s
            log_det += np.log(prod)
            corr[p, j] = 0.5 * m * log_2pi - 0.5 * log_det
    return True


@njit(cache=True, nogil=True)
def centre_rows(X, means, xc):
    """``xc[j, i, :d] = x_i - mu_j`` with zeros in the missing cells."""
    nb, d = X.shape
    k = means.shape[0]
    for j in range(k):
        for i in range(nb):
            for l in range(d):
                x = X[i, l]
                xc[j, i, l] = 0.0 if np.isnan(x) else x - means[j, l]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def incomplete_rows(
    yg, const, pats, pat_m, col_off, inv_off, cols, inv, corr,
    weights, use_weights, xc, w, nk, resp_by_pattern,
):
    """Observed-part log-densities, responsibilities, conditional-mean filled rows and their
    weighted copies for a chunk of rows sorted by missingness pattern.

    Parameters
    ----------
    yg : ndarray (k, nb, 2 d)
        ``[x̃₀ U_j | x̃₀ P_j]`` (x̃₀: the row centred on ``mu_j`` with zeros in its missing
        cells).
    const : ndarray (k,)
    pats : ndarray (nb,)
        Each row's pattern rank; the pattern tables are indexed by it.
    pat_m, col_off, inv_off, cols, inv, corr
        Flat pattern tables: missing count, offset of the pattern's missing columns in
        ``cols`` and of its ``P_mm⁻¹`` (k, m, m) in ``inv``, and log-density corrections
        (n_patterns, k).
    weights : ndarray (nb,), read when ``use_weights``
    xc : ndarray (k, nb, d + 1), updated
        ``x̃₀`` on input; the missing cells get their conditional mean (centred).
    w : ndarray (k, nb, d), output
        ``r_ij`` times the filled centred row.
    nk : ndarray (k,), added to
    resp_by_pattern : ndarray (n_patterns, k), added to

    Returns
    -------
    loglik, n_rows : float
    """
    k, nb, d2 = yg.shape
    d = d2 // 2
    q = np.empty(k)
    z = np.empty((k, d))
    t = np.empty(d)
    loglik = 0.0
    n_rows = 0.0
    for i in range(nb):
        p = pats[i]
        m = pat_m[p]
        co = col_off[p]
        io = inv_off[p]
        top = -np.inf
        for j in range(k):
            s = 0.0
            for l in range(d):
                v = yg[j, i, l]
                s += v * v
            mat = io + j * m * m
            vz = 0.0
            for a in range(m):
                z[j, a] = yg[j, i, d + cols[co + a]]
            for a in range(m):
                za = 0.0
                for c in range(m):
                    za += inv[mat + a * m + c] * z[j, c]
                vz += z[j, a] * za
                t[a] = za
            for a in range(m):
                z[j, a] = t[a]
            qj = const[j] - 0.5 * s + 0.5 * vz + corr[p, j]
            q[j] = qj
            if qj > top:
                top = qj
        if top == -np.inf:
            top = 0.0
        total = 0.0
        for j in range(k):
            e = np.exp(q[j] - top)
            q[j] = e
            total += e
        wi = weights[i] if use_weights else 1.0
        loglik += wi * (np.log(total) + top)
        n_rows += wi
        scale = wi / total
        for j in range(k):
            r = q[j] * scale
            nk[j] += r
            resp_by_pattern[p, j] += r
            for a in range(m):
                xc[j, i, cols[co + a]] = -z[j, a]
            for l in range(d):
                w[j, i, l] = r * xc[j, i, l]
    return loglik, n_rows


@njit(cache=True, nogil=True)
def add_conditional_covariance(s2, resp_by_pattern, pat_m, col_off, inv_off, cols, inv):
    """``s2_j[m, m] += Σ_patterns R_pj P_mm⁻¹`` (R: the pattern's summed responsibilities)."""
    k = s2.shape[0]
    for p in range(pat_m.size):
        m = pat_m[p]
        co = col_off[p]
        for j in range(k):
            r = resp_by_pattern[p, j]
            base = inv_off[p] + j * m * m
            for a in range(m):
                ca = cols[co + a]
                for b in range(m):
                    s2[j, ca, cols[co + b]] += r * inv[base + a * m + b]
