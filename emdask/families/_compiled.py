"""Compiled per-row steps of the Gaussian E-step kernels (needs numba: the ``fast`` extra).

Each function does, in one pass over a chunk, what a sequence of numpy steps in
:mod:`emdask.families._kernels` does with several passes and temporaries; the numpy steps are
the reference the tests compare these with. The matrix products stay in BLAS.

Sums may be reassociated (vectorised): results agree with the numpy steps to rounding.
Importing this module raises ImportError when numba is not installed.
"""

from __future__ import annotations

import numpy as np

from ._codegen import prefer_wide_vectors

prefer_wide_vectors()  # before numba's first import

from numba import njit  # noqa: E402

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
    ``top``) into weighted responsibilities; and the weighted log-likelihood and row count.

    Each row's total lies in [1, k] (its largest term is exp(0) = 1), so without weights one
    log of a product of 32 totals replaces 32 logs."""
    k, nb = e.shape
    total = np.zeros(nb)
    for j in range(k):
        for i in range(nb):
            total[i] += e[j, i]
    scale = np.empty(nb)
    loglik = 0.0
    n_rows = 0.0
    if use_weights:
        for i in range(nb):
            wi = weights[i]
            scale[i] = wi / total[i]
            loglik += wi * (np.log(total[i]) + top[i])
            n_rows += wi
    else:
        for i in range(nb):
            scale[i] = 1.0 / total[i]
            loglik += top[i]
        for a in range(0, nb, 32):
            prod = 1.0
            for i in range(a, min(a + 32, nb)):
                prod *= total[i]
            loglik += np.log(prod)
        n_rows = float(nb)
    return scale, loglik, n_rows


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def complete_weigh(e, top, xr, means, weights, use_weights, c, nk):
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
        ``x_i - mu_j`` (their weighted sums come from :func:`lower_moments`).
    nk : ndarray (k,), added to

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
            for i in range(nb):
                c[j, l, i] = xr[l, i] - mu
    return loglik, n_rows


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def lower_moments(c, r, lower, s1):
    """``lower[j] += Σ_i r_ji c_j[:, i] c_j[:, i]ᵀ`` on and below the diagonal, by 4 x 4
    blocks held in registers, and ``s1[j] += Σ_i r_ji c_j[:, i]`` on the way.

    Parameters
    ----------
    c : ndarray (k, d, nb)
        Centred rows, transposed.
    r : ndarray (k, nb)
        Responsibilities (times row weights).
    lower : ndarray (k, d, d), added to
        Only the lower triangle is meaningful.
    s1 : ndarray (k, d), added to
    """
    k, d, nb = c.shape
    full = d - d % 4
    for j in range(k):
        for lb in range(0, full, 4):
            # the diagonal block, whose pass also sums the weighted rows
            mb = lb
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
            b0 = b1 = b2 = b3 = 0.0
            for i in range(nb):
                ri = r[j, i]
                c0 = c[j, lb, i]
                c1 = c[j, lb + 1, i]
                c2 = c[j, lb + 2, i]
                c3 = c[j, lb + 3, i]
                w0 = ri * c0
                w1 = ri * c1
                w2 = ri * c2
                w3 = ri * c3
                b0 += w0
                b1 += w1
                b2 += w2
                b3 += w3
                a00 += c0 * w0
                a10 += c1 * w0
                a11 += c1 * w1
                a20 += c2 * w0
                a21 += c2 * w1
                a22 += c2 * w2
                a30 += c3 * w0
                a31 += c3 * w1
                a32 += c3 * w2
                a33 += c3 * w3
            s1[j, lb] += b0
            s1[j, lb + 1] += b1
            s1[j, lb + 2] += b2
            s1[j, lb + 3] += b3
            lower[j, lb, mb] += a00
            lower[j, lb + 1, mb] += a10
            lower[j, lb + 1, mb + 1] += a11
            lower[j, lb + 2, mb] += a20
            lower[j, lb + 2, mb + 1] += a21
            lower[j, lb + 2, mb + 2] += a22
            lower[j, lb + 3, mb] += a30
            lower[j, lb + 3, mb + 1] += a31
            lower[j, lb + 3, mb + 2] += a32
            lower[j, lb + 3, mb + 3] += a33
            for mb in range(0, lb, 4):
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
        for l in range(full, d):
            acc = 0.0
            for i in range(nb):
                acc += r[j, i] * c[j, l, i]
            s1[j, l] += acc


@njit(cache=True, nogil=True)
def pattern_tables(P, cols, col_off, pat_m, inv_off, inv, corr):
    """:func:`some_pattern_tables` for every pattern."""
    return some_pattern_tables(P, cols, col_off, pat_m, inv_off, inv, corr,
                               np.ones(pat_m.size, dtype=np.bool_))


@njit(cache=True, nogil=True)
def some_pattern_tables(P, cols, col_off, pat_m, inv_off, inv, corr, compute):
    """``P_mm⁻¹`` and ``0.5 m log 2π - 0.5 log det P_mm`` for every pattern p with
    ``compute[p]`` and every component.

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
    k, d = P.shape[0], P.shape[1]
    log_2pi = np.log(2.0 * np.pi)
    size = 0
    for p in range(pat_m.size):
        size = max(size, pat_m[p])
    # Every step is the same for all k components: components along the last axis, so
    # that each step runs on all of them at once (vectorised; each component's arithmetic,
    # and so its result, is the same as one at a time).
    Pt = np.empty((d, d, k))
    for j in range(k):
        for a in range(d):
            for b in range(d):
                Pt[a, b, j] = P[j, a, b]
    # Factors of P_mm with the missing columns taken in descending order. Patterns come
    # ranked by count, then by their highest columns first, so a pattern's descending
    # column list usually starts like the previous one's: the leading rows of the Cholesky
    # factor, of its inverse and the partial log-determinants are kept and only the rows
    # after the shared prefix are computed.
    L = np.zeros((size, size, k))
    Li = np.zeros((size, size, k))
    rdiag = np.zeros((size, k))
    log_det_upto = np.zeros((size + 1, k))
    acc = np.empty(k)
    prev = np.full(size, -1)
    prev_m = 0
    c = np.empty(size, dtype=np.int64)
    for p in range(pat_m.size):
        if not compute[p]:
            continue
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
        for a in range(shared, m):
            ca = c[a]
            for b in range(a):
                cb = c[b]
                for j in range(k):
                    acc[j] = Pt[ca, cb, j]
                for t in range(b):
                    for j in range(k):
                        acc[j] -= L[a, t, j] * L[b, t, j]
                for j in range(k):
                    L[a, b, j] = acc[j] * rdiag[b, j]
            for j in range(k):
                acc[j] = Pt[ca, ca, j]
            for t in range(a):
                for j in range(k):
                    acc[j] -= L[a, t, j] * L[a, t, j]
            for j in range(k):
                if not acc[j] > 0.0:
                    return False
            for j in range(k):
                lsq = np.sqrt(acc[j])
                L[a, a, j] = lsq
                rdiag[a, j] = 1.0 / lsq
                log_det_upto[a + 1, j] = log_det_upto[a, j] + np.log(acc[j])
            # row a of L⁻¹ (forward substitution)
            for j in range(k):
                Li[a, a, j] = rdiag[a, j]
            for b in range(a):
                for j in range(k):
                    acc[j] = 0.0
                for t in range(b, a):
                    for j in range(k):
                        acc[j] += L[a, t, j] * Li[t, b, j]
                for j in range(k):
                    Li[a, b, j] = -acc[j] * rdiag[a, j]
        # P_mm⁻¹ = Liᵀ Li in descending order; stored in ascending column order
        mm = m * m
        for a in range(m):
            for b in range(a, m):
                for j in range(k):
                    acc[j] = 0.0
                for t in range(b, m):
                    for j in range(k):
                        acc[j] += Li[t, a, j] * Li[t, b, j]
                ra = m - 1 - a
                rb = m - 1 - b
                base = inv_off[p]
                for j in range(k):
                    inv[base + j * mm + ra * m + rb] = acc[j]
                    inv[base + j * mm + rb * m + ra] = acc[j]
        for j in range(k):
            corr[p, j] = 0.5 * m * log_2pi - 0.5 * log_det_upto[m, j]
    return True


@njit(cache=True, nogil=True)
def centre_rows(X, rows, means, xc):
    """``xc[j, :, i] = X[rows[i]] - mu_j`` with zeros in the missing cells (rows along the
    last axis of ``xc`` (k, d, nb)); see :func:`_centre_chunk`."""
    if rows.size:
        column_major = X.shape[1] > 1 and X.strides[0] == X.itemsize
        _centre_chunk(X, rows, means, np.empty((X.shape[1], rows.size)), xc, column_major)


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
def incomplete_weigh(e, top, pats, weights, use_weights, nk, resp_by_pattern):
    """Responsibilities of a chunk of pattern-sorted rows, their sums and their sums per
    pattern.

    Parameters
    ----------
    e : ndarray (k, nb)
        ``exp`` of :func:`incomplete_log_prob`'s ``q``; overwritten with the
        responsibilities (times row weights).
    top : ndarray (nb,)
    pats : ndarray (nb,)
    weights : ndarray (nb,), read when ``use_weights``
    nk : ndarray (k,), added to
    resp_by_pattern : ndarray (n_patterns, k), added to

    Returns
    -------
    loglik, n_rows : float
    """
    k, nb = e.shape
    scale, loglik, n_rows = _row_normalizers(e, top, weights, use_weights)
    for j in range(k):
        s = 0.0
        for i in range(nb):
            r = e[j, i] * scale[i]
            e[j, i] = r
            s += r
            resp_by_pattern[pats[i], j] += r
        nk[j] += s
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


# --------------------------------------------------------------------------------------
# exp in vectorisable steps
# --------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
#: Below this, exp(x) < 1e-307 is taken as 0 (only arguments <= 0 are used: log-densities
#: less the row's maximum, where such terms cannot change a sum that holds a 1).
_EXP_FLOOR = -708.0


@njit(cache=True, nogil=True, fastmath={"contract"})
def exp_nonpositive(q, bits):
    """``q = exp(q)`` in place for ``q <= 0`` (NaN-free), in steps the compiler vectorises.

    ``x = n ln 2 + r`` with ``|r| <= ln 2 / 2``; ``exp(r)`` by its Taylor polynomial of
    degree 13 (truncation below 1e-17 relative), ``2^n`` assembled from its exponent bits
    in ``bits`` (int64 scratch, at least ``q.size``). Agrees with ``numpy.exp`` to a few
    units in the last place; arguments below -708 give 0.
    """
    flat = q.reshape(-1)
    size = flat.size
    for t in range(size):
        x = flat[t]
        if x < _EXP_FLOOR:
            x = _EXP_FLOOR - 1.0
        n = np.floor(x * _LOG2E + 0.5)
        r = (x - n * _LN2_HI) - n * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        ni = np.int64(n)
        bits[t] = (ni + 1023) << 52 if ni >= -1022 else 0
        flat[t] = p
    scale = bits[:size].view(np.float64)
    for t in range(size):
        flat[t] *= scale[t]


# --------------------------------------------------------------------------------------
# A whole block at once (full and tied covariances)
# --------------------------------------------------------------------------------------

#: Widest row whose missingness pattern fits in one integer key.
MAX_KEY_FEATURES = 62
#: Up to this many features, patterns are found through a table indexed by the key;
#: wider rows sort their keys instead.
_TABLE_FEATURES = 16


@njit(cache=True, nogil=True)
def _informative_rows(X, weights, use_weights, rows, keys):
    """Rows that carry information (some cell observed, weight above zero), in order, and
    the missing cells of each as bits (bit l: column l), written into ``rows`` and
    ``keys`` (n,); returns them cut to the rows found."""
    n, d = X.shape
    at = 0
    if n > 0 and d > 1 and X.strides[0] == X.itemsize:
        # column-major: the bits a column at a time, contiguous and branch-free
        for i in range(n):
            keys[i] = 0
        for l in range(d):
            bit = np.int64(1) << l
            for i in range(n):
                x = X[i, l]
                keys[i] |= bit if x != x else 0
        every = (np.int64(1) << d) - 1
        for i in range(n):
            key = keys[i]
            if key == every or (use_weights and not weights[i] > 0.0):
                continue
            rows[at] = i
            keys[at] = key
            at += 1
        return rows[:at], keys[:at]
    for i in range(n):
        if use_weights and not weights[i] > 0.0:
            continue
        key = 0
        count = 0
        for l in range(d):
            x = X[i, l]
            if x != x:
                key |= 1 << l
                count += 1
        if count < d:
            rows[at] = i
            keys[at] = key
            at += 1
    return rows[:at], keys[:at]


@njit(cache=True, nogil=True)
def _patterns(keys, d, local, found, pats, table):
    """Missingness patterns of the rows with bit keys ``keys``. ``local``, ``found``,
    ``pats`` (n,) and ``table`` (2^d when ``d <= 16``) are scratch space.

    Patterns are ranked by missing count, then by key (highest missing column first, the
    order :func:`pattern_tables` shares work in); the complete pattern, if present, is
    rank 0.

    Returns
    -------
    pats : ndarray
        Each row's pattern rank.
    pat_m, col_off, cols : ndarray
        Per pattern: missing count, offset of its missing columns (ascending) in ``cols``.
    """
    n = keys.size
    local = local[:n]  # pattern id by first appearance
    n_pat = 0
    if d <= _TABLE_FEATURES:
        table = table[: 1 << d]
        table[:] = -1
        for a in range(n):
            key = keys[a]
            p = table[key]
            if p < 0:
                p = n_pat
                table[key] = p
                found[p] = key
                n_pat += 1
            local[a] = p
    else:
        order = np.argsort(keys, kind="mergesort")
        last = 0
        for b in range(n):
            a = order[b]
            key = keys[a]
            if b == 0 or key != last:
                found[n_pat] = key
                n_pat += 1
                last = key
            local[a] = n_pat - 1
    found = found[:n_pat]
    count = np.zeros(n_pat, dtype=np.int64)
    for p in range(n_pat):
        for l in range(d):
            if (found[p] >> l) & 1:
                count[p] += 1
    by_key = np.argsort(found, kind="mergesort")
    by_count = np.argsort(count[by_key], kind="mergesort")
    rank = np.empty(n_pat, dtype=np.int64)
    for r in range(n_pat):
        rank[by_key[by_count[r]]] = r
    pat_m = np.empty(n_pat, dtype=np.int64)
    for p in range(n_pat):
        pat_m[rank[p]] = count[p]
    col_off = np.empty(n_pat, dtype=np.int64)
    at = 0
    for r in range(n_pat):
        col_off[r] = at
        at += pat_m[r]
    cols = np.empty(at, dtype=np.int64)
    for p in range(n_pat):
        r = rank[p]
        c = col_off[r]
        for l in range(d):
            if (found[p] >> l) & 1:
                cols[c] = l
                c += 1
    pats = pats[:n]
    for a in range(n):
        pats[a] = rank[local[a]]
    return pats, pat_m, col_off, cols


@njit(inline="always")
def _upper_block4(chol, j, r0, c0):
    """``U_j[r0 : r0 + 4, c0 : c0 + 4]`` (``r0 <= c0``) row by row, zero below the
    diagonal of ``U_j``."""
    below = r0 == c0  # the diagonal block: its lower triangle is not U's
    return (
        chol[j, r0, c0], chol[j, r0, c0 + 1], chol[j, r0, c0 + 2], chol[j, r0, c0 + 3],
        0.0 if below else chol[j, r0 + 1, c0], chol[j, r0 + 1, c0 + 1],
        chol[j, r0 + 1, c0 + 2], chol[j, r0 + 1, c0 + 3],
        0.0 if below else chol[j, r0 + 2, c0], 0.0 if below else chol[j, r0 + 2, c0 + 1],
        chol[j, r0 + 2, c0 + 2], chol[j, r0 + 2, c0 + 3],
        0.0 if below else chol[j, r0 + 3, c0], 0.0 if below else chol[j, r0 + 3, c0 + 1],
        0.0 if below else chol[j, r0 + 3, c0 + 2], chol[j, r0 + 3, c0 + 3],
    )


@njit(inline="always")
def _transpose4(w):
    return (w[0], w[4], w[8], w[12], w[1], w[5], w[9], w[13],
            w[2], w[6], w[10], w[14], w[3], w[7], w[11], w[15])


@njit(inline="always")
def _add_products4(src, dst, j, s0, d0, w, nb):
    """``dst[j, d0 + o] += Σ_i w[4 i + o] src[j, s0 + i]`` for o, i in 0..3, along the rows:
    four outputs from four inputs per pass (8 loads and 4 stores per 16 multiply-adds
    instead of 2 loads and a store per multiply-add)."""
    w00, w01, w02, w03, w10, w11, w12, w13, w20, w21, w22, w23, w30, w31, w32, w33 = w
    for i in range(nb):
        x0 = src[j, s0, i]
        x1 = src[j, s0 + 1, i]
        x2 = src[j, s0 + 2, i]
        x3 = src[j, s0 + 3, i]
        dst[j, d0, i] += w00 * x0 + w10 * x1 + w20 * x2 + w30 * x3
        dst[j, d0 + 1, i] += w01 * x0 + w11 * x1 + w21 * x2 + w31 * x3
        dst[j, d0 + 2, i] += w02 * x0 + w12 * x1 + w22 * x2 + w32 * x3
        dst[j, d0 + 3, i] += w03 * x0 + w13 * x1 + w23 * x2 + w33 * x3


@njit(inline="always")
def _set_products4(src, dst, j, s0, d0, w, nb):
    """:func:`_add_products4` into outputs not yet written (no load of them, no zeroing
    pass before)."""
    w00, w01, w02, w03, w10, w11, w12, w13, w20, w21, w22, w23, w30, w31, w32, w33 = w
    for i in range(nb):
        x0 = src[j, s0, i]
        x1 = src[j, s0 + 1, i]
        x2 = src[j, s0 + 2, i]
        x3 = src[j, s0 + 3, i]
        dst[j, d0, i] = w00 * x0 + w10 * x1 + w20 * x2 + w30 * x3
        dst[j, d0 + 1, i] = w01 * x0 + w11 * x1 + w21 * x2 + w31 * x3
        dst[j, d0 + 2, i] = w02 * x0 + w12 * x1 + w22 * x2 + w32 * x3
        dst[j, d0 + 3, i] = w03 * x0 + w13 * x1 + w23 * x2 + w33 * x3


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _chunk_products(chol, c, const, y, q):
    """``y[j] = c_j U_j`` and ``q[j] = const_j - |y[j]|² / 2`` for a chunk of rows centred
    on each component's mean, ``c`` (k, d, nb) with zeros in missing cells; ``U_j`` upper
    triangular (only its upper triangle is read), rows along the last axis."""
    k, d, nb = y.shape
    full = d - d % 4
    for j in range(k):
        for i in range(nb):
            q[j, i] = 0.0
        for lb in range(0, full, 4):
            # U is upper triangular: u[m, l] = 0 for m > l; the first block sets the outputs
            _set_products4(c, y, j, 0, lb, _upper_block4(chol, j, 0, lb), nb)
            for mb in range(4, lb + 4, 4):
                _add_products4(c, y, j, mb, lb, _upper_block4(chol, j, mb, lb), nb)
            for i in range(nb):
                t0 = y[j, lb, i]
                t1 = y[j, lb + 1, i]
                t2 = y[j, lb + 2, i]
                t3 = y[j, lb + 3, i]
                q[j, i] += t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
        # outputs past the last full block of four
        for l in range(full, d):
            for i in range(nb):
                y[j, l, i] = 0.0
            for m in range(l + 1):
                u = chol[j, m, l]
                for i in range(nb):
                    y[j, l, i] += u * c[j, m, i]
            for i in range(nb):
                t = y[j, l, i]
                q[j, i] += t * t
        cj = const[j]
        for i in range(nb):
            q[j, i] = cj - 0.5 * q[j, i]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _upper_times(chol, y, g):
    """``g[j] += U_j y[j]`` (``U_j`` upper triangular, rows along the last axis), four
    outputs from four inputs per pass over the rows."""
    k, d, nb = y.shape
    full = d - d % 4
    for j in range(k):
        for ab in range(0, full, 4):
            for lb in range(ab, full, 4):  # u[a, l] = 0 for l < a
                block = _transpose4(_upper_block4(chol, j, ab, lb))
                _add_products4(y, g, j, lb, ab, block, nb)
            # inputs past the last full block of four
            for l in range(full, d):
                for a in range(ab, ab + 4):
                    u = chol[j, a, l]
                    for i in range(nb):
                        g[j, a, i] += u * y[j, l, i]
        # outputs past the last full block of four
        for a in range(full, d):
            for l in range(a, d):
                u = chol[j, a, l]
                for i in range(nb):
                    g[j, a, i] += u * y[j, l, i]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _chunk_log_prob(y, const, incomplete, pats, pat_m, col_off, cols, inv_off, inv, corr,
                    chol, c, q, v, z, g_flat):
    """Observed-part weighted log-probabilities of a chunk (less each row's maximum) and,
    for rows with missing cells, the conditional means of those cells.

    On entry ``y`` and ``q`` are as :func:`_chunk_products` leaves them: ``y`` (k, d, nb)
    is the row centred on ``mu_j`` with zeros in its missing cells (``x̃₀``), times
    ``U_j``. For a row with missing cells m, with ``v = (x̃₀ P_j)_m`` (from ``y`` and the
    rows m of ``U_j``), the conditional mean of the missing cells, centred on ``mu_j``, is
    ``-P_mm⁻¹ v`` (written into ``c`` (k, d, nb)) and the Mahalanobis term of the observed
    cells is ``|y|² - vᵀ P_mm⁻¹ v``. ``incomplete``: positions in the chunk of rows with
    missing cells.
    """
    k, d, nb = y.shape
    # v row by row costs Σ (d - column) per missing cell; for many such cells the whole
    # chunk's y U_jᵀ at once (vectorised along the rows) is cheaper
    work = 0
    for i in incomplete:
        p = pats[i]
        for a in range(pat_m[p]):
            work += d - cols[col_off[p] + a]
    whole = 8 * work > nb * d * (d + 1) // 2
    # g: products from a flat buffer of the block's (allocating per chunk is slow in Dask
    # workers, whose allocator returns large blocks to the system at once)
    g = g_flat[: k * d * nb].reshape((k, d, nb))
    if whole:
        g[:] = 0.0
        _upper_times(chol, y, g)
    for i in incomplete:
        p = pats[i]
        m = pat_m[p]
        co = col_off[p]
        if m == 1:  # most rows that miss any cell: every component in one straight loop
            ca = cols[co]
            off = inv_off[p]
            for j in range(k):
                if whole:
                    v0 = g[j, ca, i]
                else:
                    v0 = 0.0
                    for l in range(ca, d):
                        v0 += chol[j, ca, l] * y[j, l, i]
                z0 = inv[off + j] * v0
                c[j, ca, i] = -z0
                q[j, i] += 0.5 * v0 * z0 + corr[p, j]
            continue
        if m == 2 and whole:
            ca, cb = cols[co], cols[co + 1]
            off = inv_off[p]
            for j in range(k):
                v0 = g[j, ca, i]
                v1 = g[j, cb, i]
                base = off + 4 * j
                z0 = inv[base] * v0 + inv[base + 1] * v1
                z1 = inv[base + 2] * v0 + inv[base + 3] * v1
                c[j, ca, i] = -z0
                c[j, cb, i] = -z1
                q[j, i] += 0.5 * (v0 * z0 + v1 * z1) + corr[p, j]
            continue
        if m == 3 and whole:
            ca, cb, cc = cols[co], cols[co + 1], cols[co + 2]
            off = inv_off[p]
            for j in range(k):
                v0 = g[j, ca, i]
                v1 = g[j, cb, i]
                v2 = g[j, cc, i]
                base = off + 9 * j
                z0 = inv[base] * v0 + inv[base + 1] * v1 + inv[base + 2] * v2
                z1 = inv[base + 3] * v0 + inv[base + 4] * v1 + inv[base + 5] * v2
                z2 = inv[base + 6] * v0 + inv[base + 7] * v1 + inv[base + 8] * v2
                c[j, ca, i] = -z0
                c[j, cb, i] = -z1
                c[j, cc, i] = -z2
                q[j, i] += 0.5 * (v0 * z0 + v1 * z1 + v2 * z2) + corr[p, j]
            continue
        if m == 4 and whole:
            ca, cb, cc, cd = cols[co], cols[co + 1], cols[co + 2], cols[co + 3]
            off = inv_off[p]
            for j in range(k):
                v0 = g[j, ca, i]
                v1 = g[j, cb, i]
                v2 = g[j, cc, i]
                v3 = g[j, cd, i]
                base = off + 16 * j
                z0 = (inv[base] * v0 + inv[base + 1] * v1 + inv[base + 2] * v2
                      + inv[base + 3] * v3)
                z1 = (inv[base + 4] * v0 + inv[base + 5] * v1 + inv[base + 6] * v2
                      + inv[base + 7] * v3)
                z2 = (inv[base + 8] * v0 + inv[base + 9] * v1 + inv[base + 10] * v2
                      + inv[base + 11] * v3)
                z3 = (inv[base + 12] * v0 + inv[base + 13] * v1 + inv[base + 14] * v2
                      + inv[base + 15] * v3)
                c[j, ca, i] = -z0
                c[j, cb, i] = -z1
                c[j, cc, i] = -z2
                c[j, cd, i] = -z3
                q[j, i] += 0.5 * (v0 * z0 + v1 * z1 + v2 * z2 + v3 * z3) + corr[p, j]
            continue
        for j in range(k):
            for a in range(m):
                ca = cols[co + a]
                if whole:
                    v[a] = g[j, ca, i]
                else:
                    acc = 0.0
                    for l in range(ca, d):
                        acc += chol[j, ca, l] * y[j, l, i]
                    v[a] = acc
            base = inv_off[p] + j * m * m
            # two to four missing cells: written out, so that the products are independent
            # of each other instead of a chain of loops
            if m == 2:
                v0, v1 = v[0], v[1]
                z0 = inv[base] * v0 + inv[base + 1] * v1
                z1 = inv[base + 2] * v0 + inv[base + 3] * v1
                c[j, cols[co], i] = -z0
                c[j, cols[co + 1], i] = -z1
                q[j, i] += 0.5 * (v0 * z0 + v1 * z1) + corr[p, j]
                continue
            if m == 3:
                v0, v1, v2 = v[0], v[1], v[2]
                z0 = inv[base] * v0 + inv[base + 1] * v1 + inv[base + 2] * v2
                z1 = inv[base + 3] * v0 + inv[base + 4] * v1 + inv[base + 5] * v2
                z2 = inv[base + 6] * v0 + inv[base + 7] * v1 + inv[base + 8] * v2
                c[j, cols[co], i] = -z0
                c[j, cols[co + 1], i] = -z1
                c[j, cols[co + 2], i] = -z2
                q[j, i] += 0.5 * (v0 * z0 + v1 * z1 + v2 * z2) + corr[p, j]
                continue
            if m == 4:
                v0, v1, v2, v3 = v[0], v[1], v[2], v[3]
                z0 = (inv[base] * v0 + inv[base + 1] * v1 + inv[base + 2] * v2
                      + inv[base + 3] * v3)
                z1 = (inv[base + 4] * v0 + inv[base + 5] * v1 + inv[base + 6] * v2
                      + inv[base + 7] * v3)
                z2 = (inv[base + 8] * v0 + inv[base + 9] * v1 + inv[base + 10] * v2
                      + inv[base + 11] * v3)
                z3 = (inv[base + 12] * v0 + inv[base + 13] * v1 + inv[base + 14] * v2
                      + inv[base + 15] * v3)
                c[j, cols[co], i] = -z0
                c[j, cols[co + 1], i] = -z1
                c[j, cols[co + 2], i] = -z2
                c[j, cols[co + 3], i] = -z3
                q[j, i] += 0.5 * (v0 * z0 + v1 * z1 + v2 * z2 + v3 * z3) + corr[p, j]
                continue
            vz = 0.0
            for a in range(m):
                za = 0.0
                for b in range(m):
                    za += inv[base + a * m + b] * v[b]
                z[a] = za
                vz += v[a] * za
            for a in range(m):
                c[j, cols[co + a], i] = -z[a]
            q[j, i] += 0.5 * vz + corr[p, j]
    top = np.full(nb, -np.inf)
    for j in range(k):
        for i in range(nb):
            top[i] = max(top[i], q[j, i])
    for i in range(nb):
        if top[i] == -np.inf:
            top[i] = 0.0
    for j in range(k):
        for i in range(nb):
            q[j, i] -= top[i]
    return top


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _chunk_weigh(e, top, weights, use_weights, rows, incomplete, pats, nk, resp_by_pattern):
    """Responsibilities of a chunk (``e``: exp of the log-probabilities less the row
    maximum, overwritten), their sums, and their sums per pattern for the rows with missing
    cells."""
    k, nb = e.shape
    w = np.empty(nb if use_weights else 0)
    for i in range(w.size):
        w[i] = weights[rows[i]]
    scale, loglik, n_rows = _row_normalizers(e, top, w, use_weights)
    for j in range(k):
        s = 0.0
        for i in range(nb):
            r = e[j, i] * scale[i]
            e[j, i] = r
            s += r
        nk[j] += s
    for i in incomplete:
        p = pats[i]
        for j in range(k):
            resp_by_pattern[p, j] += e[j, i]
    return loglik, n_rows


@njit(cache=True, nogil=True)
def _centre_chunk(X, sel, means, xt, c, column_major):
    """``c[j, :, i] = X[sel[i]] - mu_j`` with zeros in the missing cells. Rows that follow
    each other in ``X`` (the usual case: every row of the block carries information) are
    read without the index, in steps the compiler vectorises: a column-major ``X`` a
    column at a time straight into ``c``, a row-major one through its transpose ``xt``."""
    k, d, nb = c.shape
    s0 = sel[0]
    if sel[nb - 1] - s0 == nb - 1:  # rows s0 .. s0 + nb - 1
        if column_major:
            for j in range(k):
                for l in range(d):
                    mu = means[j, l]
                    for i in range(nb):
                        x = X[s0 + i, l]
                        c[j, l, i] = x - mu if x == x else 0.0
            return
        for i in range(nb):
            for l in range(d):
                xt[l, i] = X[s0 + i, l]
    else:
        for i in range(nb):
            r = sel[i]
            for l in range(d):
                xt[l, i] = X[r, l]
    for j in range(k):
        for l in range(d):
            mu = means[j, l]
            for i in range(nb):
                x = xt[l, i]
                c[j, l, i] = x - mu if x == x else 0.0


#: Rows are taken in pattern order when their patterns' tables exceed this many bytes.
_SORT_TABLE_BYTES = 1 << 20


@njit(cache=True, nogil=True)
def _rows_by_pattern(rows, pats, n_pat, rows_out, pats_out):
    """``rows`` and their patterns ``pats`` reordered by pattern (stable), into the
    scratch ``rows_out``, ``pats_out``."""
    start = np.zeros(n_pat + 1, dtype=np.int64)
    for a in range(rows.size):
        start[pats[a] + 1] += 1
    for p in range(n_pat):
        start[p + 1] += start[p]
    for a in range(rows.size):
        p = pats[a]
        at = start[p]
        rows_out[at] = rows[a]
        pats_out[at] = p
        start[p] = at + 1
    return rows_out, pats_out


@njit(cache=True, nogil=True)
def _pattern_key(cols, off, m):
    key = 0
    for a in range(m):
        key |= 1 << cols[off + a]
    return key


@njit(cache=True, nogil=True)
def dense_block_stats(X, weights, use_weights, means, chol, P, const, chunk, max_missing,
                      nk, s1, lower, iwork, fwork, stamp, slot, slot_stamp, store, used):
    """E-step statistics of a whole block under full (or tied) covariances, in one call.

    Complete rows and rows with missing cells go through the same chunks, in block order:
    rows centred on each component's mean (missing cells zero) times ``U_j``, by
    triangular products vectorised along the rows; the observed-part log-densities with
    per-pattern corrections; responsibilities; missing cells at their conditional mean;
    the moments. Rows with every cell missing or with weight zero are left out.

    Parameters
    ----------
    X : ndarray (n, d), NaN for a missing cell; ``d <= MAX_KEY_FEATURES``
    weights : ndarray (n,), read when ``use_weights``
    means : ndarray (k, d)
    chol : ndarray (k, d, d)
        Upper-triangular ``U_j`` with precision ``P_j = U_j U_jᵀ``.
    P : ndarray (k, d, d)
    const : ndarray (k,)
        ``log w_j + log det U_j - d/2 log 2π``.
    chunk : int
        Rows per chunk.
    max_missing : float
        Largest mean number of missing cells per incomplete row this path takes on.
    nk, s1, lower : ndarray (k,), (k, d), (k, d, d), added to
        Summed responsibilities, first moments and the lower triangles of the second
        moments about each component's mean.
    iwork, fwork : ndarray, int64 and float64
        Scratch space kept by the caller between blocks (fresh allocations of this size
        cost page faults at every block in Dask workers, whose allocator hands large
        blocks back to the system): used when at least ``5 n + 2^d`` (``5 n + 1`` above
        16 columns) and the returned ``needed`` long, else allocated here.

    stamp, slot, slot_stamp, store, used
        This thread's cache of pattern tables: ``stamp`` the version of ``P`` (-1: no
        cache), ``slot`` and ``slot_stamp`` (2^d) where each pattern's tables are in
        ``store`` and for which version, ``used`` the length of ``store`` in use.

    Returns
    -------
    loglik, n_rows : float
    status : int
        0: done; 1: the precision of the missing cells of some pattern is not positive
        definite; 2: declined, the incomplete rows miss more than ``max_missing`` cells
        on average; 3: ``store`` is shorter than ``needed``: grow it and call again.
        Nothing is added unless 0.
    needed : int
        Length of ``fwork`` this block used (or would have); with status 3, of ``store``.
    used : int
        Length of ``store`` in use afterwards.
    """
    d = X.shape[1]
    k = chol.shape[0]
    n = X.shape[0]
    table_size = (1 << d) if d <= _TABLE_FEATURES else 1
    if iwork.size < 5 * n + table_size:
        iwork = np.empty(5 * n + table_size, dtype=np.int64)
    rows, keys = _informative_rows(X, weights, use_weights, iwork[:n], iwork[n : 2 * n])
    n_in = rows.size
    loglik = 0.0
    n_rows = 0.0
    if n_in == 0:
        return loglik, n_rows, 0, 0, used
    pats, pat_m, col_off, cols = _patterns(
        keys, d, iwork[2 * n : 3 * n], iwork[3 * n : 4 * n], iwork[4 * n : 5 * n],
        iwork[5 * n :],
    )
    n_pat = pat_m.size
    n_missing = 0
    n_incomplete = 0
    for a in range(n_in):
        m = pat_m[pats[a]]
        n_missing += m
        n_incomplete += m > 0
    if n_missing > max_missing * n_incomplete:
        return loglik, n_rows, 2, 0, used
    # Rows look their pattern's tables up one at a time; when those tables outgrow the
    # core's cache, rows taken in pattern order (a counting sort, stable) read each table
    # once per run of rows instead of once per row, from memory.
    table_bytes = 0
    for p in range(n_pat):
        table_bytes += 8 * k * (pat_m[p] * pat_m[p] + 1)
    if table_bytes > _SORT_TABLE_BYTES:
        rows, pats = _rows_by_pattern(rows, pats, n_pat, iwork[n : n + n_in],
                                      iwork[2 * n : 2 * n + n_in])
    inv_off = np.empty(n_pat, dtype=np.int64)
    compute = np.ones(n_pat, dtype=np.bool_)
    max_m = 1
    for p in range(n_pat):
        max_m = max(max_m, pat_m[p])
    # Pattern tables depend on the precisions only: with ``stamp >= 0`` (the caller's
    # version of ``P``), those of patterns met in earlier blocks of this thread under the
    # same precisions are taken from ``store`` (at ``slot[key]`` when ``slot_stamp[key]``
    # is ``stamp``: k corrections, then the k inverses), the others computed and added.
    caching = stamp >= 0 and d <= _TABLE_FEATURES
    size = 0
    if caching:
        for p in range(n_pat):
            key = _pattern_key(cols, col_off[p], pat_m[p])
            if slot_stamp[key] == stamp:
                compute[p] = False
                inv_off[p] = slot[key] + k
            else:
                inv_off[p] = used + size + k
                size += k + k * pat_m[p] * pat_m[p]
        if used + size > store.size:
            return loglik, n_rows, 3, used + size, used  # the caller grows the store
        inv = store
    else:
        for p in range(n_pat):
            inv_off[p] = size
            size += k * pat_m[p] * pat_m[p]
    b = min(chunk, n_in)
    local = 0 if caching else size
    needed = local + 2 * n_pat * k + k * d * b
    if fwork.size < needed:
        fwork = np.empty(needed)
    if not caching:
        inv = fwork[:size]
    corr = fwork[local : local + n_pat * k].reshape((n_pat, k))
    if not some_pattern_tables(P, cols, col_off, pat_m, inv_off, inv, corr, compute):
        return loglik, n_rows, 1, needed, used
    if caching:
        for p in range(n_pat):
            off = inv_off[p] - k
            if compute[p]:
                key = _pattern_key(cols, col_off[p], pat_m[p])
                for j in range(k):
                    store[off + j] = corr[p, j]
                slot[key] = off
                slot_stamp[key] = stamp
            else:
                for j in range(k):
                    corr[p, j] = store[off + j]
        used += size
    resp_by_pattern = fwork[local + n_pat * k : local + 2 * n_pat * k].reshape((n_pat, k))
    resp_by_pattern[:] = 0.0
    g_flat = fwork[local + 2 * n_pat * k : needed]
    v = np.empty(max_m)
    z = np.empty(max_m)
    q_full = np.empty((k, b))
    c_full = np.empty((k, d, b))
    y_full = np.empty((k, d, b))
    bits = np.empty(k * b, dtype=np.int64)
    inc = np.empty(b, dtype=np.int64)
    xt = np.empty((d, b))
    column_major = d > 1 and X.strides[0] == X.itemsize
    for start in range(0, n_in, b):
        nb = min(b, n_in - start)
        if nb == b:
            q, c, y = q_full, c_full, y_full
        else:
            q, c, y = np.empty((k, nb)), np.empty((k, d, nb)), np.empty((k, d, nb))
        sel = rows[start : start + nb]
        pc = pats[start : start + nb]
        n_inc = 0
        for i in range(nb):
            if pat_m[pc[i]] > 0:
                inc[n_inc] = i
                n_inc += 1
        _centre_chunk(X, sel, means, xt, c, column_major)
        _chunk_products(chol, c, const, y, q)
        incomplete = inc[:n_inc]
        top = _chunk_log_prob(y, const, incomplete, pc, pat_m, col_off, cols, inv_off, inv,
                              corr, chol, c, q, v, z, g_flat)
        exp_nonpositive(q, bits)
        ll, nr = _chunk_weigh(q, top, weights, use_weights, sel, incomplete, pc, nk,
                              resp_by_pattern)
        loglik += ll
        n_rows += nr
        lower_moments(c, q, lower, s1)
    add_conditional_covariance(lower, resp_by_pattern, pat_m, col_off, inv_off, cols, inv)
    return loglik, n_rows, 0, needed, used
