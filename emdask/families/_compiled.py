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
def complete_log_prob(y, v, const, q):
    """Weighted log-probabilities of a chunk of complete rows, less each row's maximum.

    Parameters
    ----------
    y : ndarray (k, d, nb)
        ``(x - c) U_j`` for every component, rows along the last axis.
    v : ndarray (k, d)
        ``(mu_j - c) U_j``.
    const : ndarray (k,)
    q : ndarray (k, nb), output
        ``log w_j + log N(x | j)`` less the row's maximum over j (exponentiated by the
        caller, vectorised, before :func:`complete_weigh`).

    Returns
    -------
    top : ndarray (nb,)
        Each row's maximum.
    """
    k, d, nb = y.shape
    for j in range(k):
        for i in range(nb):
            q[j, i] = 0.0
        for l in range(d):
            vl = v[j, l]
            for i in range(nb):
                t = y[j, l, i] - vl
                q[j, i] += t * t
    top = np.full(nb, -np.inf)
    for j in range(k):
        cj = const[j]
        for i in range(nb):
            t = cj - 0.5 * q[j, i]
            q[j, i] = t
            top[i] = max(top[i], t)
    for i in range(nb):
        if top[i] == -np.inf:
            top[i] = 0.0
    for j in range(k):
        for i in range(nb):
            q[j, i] -= top[i]
    return top


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _row_normalizers(e, top, weights, use_weights):
    """Per row: the factor turning ``e`` (exp of log-probabilities less the row maximum
    ``top``) into weighted responsibilities; and the weighted log-likelihood and row count."""
    k, nb = e.shape
    loglik = 0.0
    n_rows = 0.0
    scale = np.empty(nb)
    for i in range(nb):
        total = 0.0
        for j in range(k):
            total += e[j, i]
        wi = weights[i] if use_weights else 1.0
        loglik += wi * (np.log(total) + top[i])
        n_rows += wi
        scale[i] = wi / total
    return scale, loglik, n_rows


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def complete_weigh(e, top, xr, means, weights, use_weights, c, nk, s1):
    """Responsibilities and centred rows of a chunk of complete rows.

    Parameters
    ----------
    e : ndarray (k, nb)
        ``exp`` of :func:`complete_log_prob`'s ``q``; overwritten with the responsibilities.
    top : ndarray (nb,)
    xr : ndarray (d, nb)
        The rows, transposed.
    means : ndarray (k, d)
    weights : ndarray (nb,), read when ``use_weights``
    c : ndarray (k, d, nb), output
        ``x_i - mu_j``.
    nk : ndarray (k,), added to
    s1 : ndarray (k, d), added to
        ``Σ_i r_ij (x_i - mu_j)``.

    Returns
    -------
    loglik, n_rows : float
    """
    k, nb = e.shape
    d = xr.shape[0]
    scale, loglik, n_rows = _row_normalizers(e, top, weights, use_weights)
    for j in range(k):
        s = 0.0
        for i in range(nb):
            r = e[j, i] * scale[i]
            e[j, i] = r
            s += r
        nk[j] += s
        for l in range(d):
            mu = means[j, l]
            acc = 0.0
            for i in range(nb):
                t = xr[l, i] - mu
                c[j, l, i] = t
                acc += e[j, i] * t
            s1[j, l] += acc
    return loglik, n_rows


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def lower_moments(c, r, lower):
    """``lower[j] += Σ_i r_ji c_j[:, i] c_j[:, i]ᵀ`` on and below the diagonal, by 4 x 4
    blocks held in registers.

    Parameters
    ----------
    c : ndarray (k, d, nb)
        Centred rows, transposed.
    r : ndarray (k, nb)
        Responsibilities (times row weights).
    lower : ndarray (k, d, d), added to
        Only the lower triangle is meaningful (diagonal blocks are written whole).
    """
    k, d, nb = c.shape
    full = d - d % 4
    for j in range(k):
        for lb in range(0, full, 4):
            for mb in range(0, lb + 1, 4):
                a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
                a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
                for i in range(nb):
                    ri = r[j, i]
                    c0 = c[j, lb, i]
                    c1 = c[j, lb + 1, i]
                    c2 = c[j, lb + 2, i]
                    c3 = c[j, lb + 3, i]
                    w0 = ri * c[j, mb, i]
                    w1 = ri * c[j, mb + 1, i]
                    w2 = ri * c[j, mb + 2, i]
                    w3 = ri * c[j, mb + 3, i]
                    a00 += c0 * w0
                    a01 += c0 * w1
                    a02 += c0 * w2
                    a03 += c0 * w3
                    a10 += c1 * w0
                    a11 += c1 * w1
                    a12 += c1 * w2
                    a13 += c1 * w3
                    a20 += c2 * w0
                    a21 += c2 * w1
                    a22 += c2 * w2
                    a23 += c2 * w3
                    a30 += c3 * w0
                    a31 += c3 * w1
                    a32 += c3 * w2
                    a33 += c3 * w3
                lower[j, lb, mb] += a00
                lower[j, lb, mb + 1] += a01
                lower[j, lb, mb + 2] += a02
                lower[j, lb, mb + 3] += a03
                lower[j, lb + 1, mb] += a10
                lower[j, lb + 1, mb + 1] += a11
                lower[j, lb + 1, mb + 2] += a12
                lower[j, lb + 1, mb + 3] += a13
                lower[j, lb + 2, mb] += a20
                lower[j, lb + 2, mb + 1] += a21
                lower[j, lb + 2, mb + 2] += a22
                lower[j, lb + 2, mb + 3] += a23
                lower[j, lb + 3, mb] += a30
                lower[j, lb + 3, mb + 1] += a31
                lower[j, lb + 3, mb + 2] += a32
                lower[j, lb + 3, mb + 3] += a33
        # rows past the last full block of four
        for l in range(full, d):
            for m in range(l + 1):
                acc = 0.0
                for i in range(nb):
                    acc += r[j, i] * c[j, l, i] * c[j, m, i]
                lower[j, l, m] += acc


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
    # Factors of P_mm with the missing columns taken in descending order. Patterns come
    # ranked by count, then by their highest columns first, so a pattern's descending
    # column list usually starts like the previous one's: the leading rows of the Cholesky
    # factor, of its inverse and the partial log-determinants are kept and only the rows
    # after the shared prefix are computed.
    L = np.zeros((k, size, size))
    Li = np.zeros((k, size, size))
    rdiag = np.zeros((k, size))
    log_det_upto = np.zeros((k, size + 1))
    prev = np.full(size, -1)
    prev_m = 0
    c = np.empty(size, dtype=np.int64)
    for p in range(pat_m.size):
        m = pat_m[p]
        for a in range(m):
            c[a] = cols[col_off[p] + m - 1 - a]
        shared = 0
        if m == prev_m:
            while shared < m and c[shared] == prev[shared]:
                shared += 1
        for a in range(m):
            prev[a] = c[a]
        prev_m = m
        for j in range(k):
            for a in range(shared, m):
                ca = c[a]
                for b in range(a):
                    acc = P[j, ca, c[b]]
                    for t in range(b):
                        acc -= L[j, a, t] * L[j, b, t]
                    L[j, a, b] = acc * rdiag[j, b]
                acc = P[j, ca, ca]
                for t in range(a):
                    acc -= L[j, a, t] * L[j, a, t]
                if not acc > 0.0:
                    return False
                lsq = np.sqrt(acc)
                L[j, a, a] = lsq
                rdiag[j, a] = 1.0 / lsq
                log_det_upto[j, a + 1] = log_det_upto[j, a] + np.log(acc)
                # row a of L⁻¹ (forward substitution)
                Li[j, a, a] = rdiag[j, a]
                for b in range(a):
                    acc = 0.0
                    for t in range(b, a):
                        acc += L[j, a, t] * Li[j, t, b]
                    Li[j, a, b] = -acc * rdiag[j, a]
            # P_mm⁻¹ = Liᵀ Li in descending order; stored in ascending column order
            base = inv_off[p] + j * m * m
            for a in range(m):
                for b in range(a, m):
                    acc = 0.0
                    for t in range(b, m):
                        acc += Li[j, t, a] * Li[j, t, b]
                    ra = m - 1 - a
                    rb = m - 1 - b
                    inv[base + ra * m + rb] = acc
                    inv[base + rb * m + ra] = acc
            corr[p, j] = 0.5 * m * log_2pi - 0.5 * log_det_upto[j, m]
    return True


@njit(cache=True, nogil=True)
def centre_rows(X, rows, means, xc):
    """``xc[j, :, i] = X[rows[i]] - mu_j`` with zeros in the missing cells (rows along the
    last axis of ``xc`` (k, d, nb))."""
    d = X.shape[1]
    k = means.shape[0]
    nb = rows.size
    xt = np.empty((d, nb))
    for i in range(nb):
        r = rows[i]
        for l in range(d):
            xt[l, i] = X[r, l]
    for j in range(k):
        for l in range(d):
            mu = means[j, l]
            for i in range(nb):
                x = xt[l, i]
                xc[j, l, i] = 0.0 if np.isnan(x) else x - mu


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def incomplete_log_prob(yg, const, pats, pat_m, col_off, inv_off, cols, inv, corr, xc, q):
    """Observed-part weighted log-probabilities of a chunk of rows sorted by missingness
    pattern (less each row's maximum), and the conditional means of the missing cells.

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
    xc : ndarray (k, d, nb), updated
        ``x̃₀`` (rows along the last axis) on input; the missing cells get their conditional
        mean (centred), ``-P_mm⁻¹ (x̃₀ P)_m``.
    q : ndarray (k, nb), output
        ``log w_j + log N(x_o | j)`` less the row's maximum over j.

    Returns
    -------
    top : ndarray (nb,)
        Each row's maximum.
    """
    k, nb, d2 = yg.shape
    d = d2 // 2
    v = np.empty(d)
    z = np.empty(d)
    top = np.full(nb, -np.inf)
    for i in range(nb):
        p = pats[i]
        m = pat_m[p]
        co = col_off[p]
        for j in range(k):
            s = 0.0
            for l in range(d):
                t = yg[j, i, l]
                s += t * t
            for a in range(m):
                v[a] = yg[j, i, d + cols[co + a]]
            mat = inv_off[p] + j * m * m
            vz = 0.0
            for a in range(m):
                za = 0.0
                for c in range(m):
                    za += inv[mat + a * m + c] * v[c]
                z[a] = za
                vz += v[a] * za
            for a in range(m):
                xc[j, cols[co + a], i] = -z[a]
            qj = const[j] - 0.5 * s + 0.5 * vz + corr[p, j]
            q[j, i] = qj
            top[i] = max(top[i], qj)
    for i in range(nb):
        if top[i] == -np.inf:
            top[i] = 0.0
    for j in range(k):
        for i in range(nb):
            q[j, i] -= top[i]
    return top


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def incomplete_weigh(e, top, pats, weights, use_weights, xc, nk, s1, resp_by_pattern):
    """Responsibilities of a chunk of pattern-sorted rows and their first moments.

    Parameters
    ----------
    e : ndarray (k, nb)
        ``exp`` of :func:`incomplete_log_prob`'s ``q``; overwritten with the
        responsibilities (times row weights).
    top : ndarray (nb,)
    pats : ndarray (nb,)
    weights : ndarray (nb,), read when ``use_weights``
    xc : ndarray (k, d, nb)
        The filled centred rows, rows along the last axis.
    nk : ndarray (k,), added to
    s1 : ndarray (k, d), added to
    resp_by_pattern : ndarray (n_patterns, k), added to

    Returns
    -------
    loglik, n_rows : float
    """
    k, nb = e.shape
    d = xc.shape[1]
    scale, loglik, n_rows = _row_normalizers(e, top, weights, use_weights)
    for j in range(k):
        s = 0.0
        for i in range(nb):
            r = e[j, i] * scale[i]
            e[j, i] = r
            s += r
            resp_by_pattern[pats[i], j] += r
        nk[j] += s
        for l in range(d):
            acc = 0.0
            for i in range(nb):
                acc += e[j, i] * xc[j, l, i]
            s1[j, l] += acc
    return loglik, n_rows


@njit(cache=True, nogil=True)
def add_conditional_covariance(lower, resp_by_pattern, pat_m, col_off, inv_off, cols, inv):
    """``lower_j[m, m] += Σ_patterns R_pj P_mm⁻¹`` on and below the diagonal (R: the
    pattern's summed responsibilities; columns ascending, so entry (a, b ≤ a) of ``P_mm⁻¹``
    falls on or below the diagonal)."""
    k = lower.shape[0]
    for p in range(pat_m.size):
        m = pat_m[p]
        co = col_off[p]
        for j in range(k):
            r = resp_by_pattern[p, j]
            base = inv_off[p] + j * m * m
            for a in range(m):
                ca = cols[co + a]
                for b in range(a + 1):
                    lower[j, ca, cols[co + b]] += r * inv[base + a * m + b]
