"""Compiled per-chunk steps of the Gaussian E-step under full (or tied) covariances (needs
numba: the ``fast`` extra).

A chunk holds its rows along the last axis, so that every step runs along the rows
(vectorised): rows centred on each component's mean (:func:`centre_chunk`), times ``U_j``
(:func:`chunk_products`), the conditional terms of the rows with missing cells
(:func:`chunk_log_prob`, one loop specialised per missing count by the compiler),
``exp`` (:func:`exp_nonpositive`), responsibilities (:func:`chunk_weigh`) and the second
moments (:func:`lower_moments`). The numpy steps of :mod:`emdask.families._kernels` are the
reference the tests compare these with.

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


@njit(cache=True, nogil=True)
def centre_chunk(data, column_major, sel, means, xt, c):
    """``c[j, :, i] = X[sel[i]] - mu_j`` with zeros in the missing cells (``data``: the
    block ``X``, or ``Xᵀ`` when ``column_major``). Rows that follow each other in ``X``
    (the usual case: every row of the block carries information) are read without the
    index, in steps the compiler vectorises: a column-major ``X`` a column at a time
    straight into ``c``, a row-major one through its transpose ``xt``."""
    k, d, nb = c.shape
    s0 = sel[0]
    if sel[nb - 1] - s0 == nb - 1:  # rows s0 .. s0 + nb - 1
        if column_major:
            for j in range(k):
                for l in range(d):
                    mu = means[j, l]
                    for i in range(nb):
                        x = data[l, s0 + i]
                        c[j, l, i] = x - mu if x == x else 0.0
            return
        for i in range(nb):
            for l in range(d):
                xt[l, i] = data[s0 + i, l]
    elif column_major:
        for i in range(nb):
            r = sel[i]
            for l in range(d):
                xt[l, i] = data[l, r]
    else:
        for i in range(nb):
            r = sel[i]
            for l in range(d):
                xt[l, i] = data[r, l]
    for j in range(k):
        for l in range(d):
            mu = means[j, l]
            for i in range(nb):
                x = xt[l, i]
                c[j, l, i] = x - mu if x == x else 0.0


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
def chunk_products(chol, c, const, y, q):
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
def upper_times(chol, y, g):
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




# --------------------------------------------------------------------------------------
# Log-densities of a chunk, with the conditional terms of rows missing cells
# --------------------------------------------------------------------------------------

#: Missing counts for which the compiler specialises the conditional terms' loop (unrolled
#: over the missing cells); other counts run the same loop with the count read at run time.
SPECIALISED_COUNTS = (1, 2, 3, 4)


def _conditional_terms(M):
    """The conditional terms of a row missing ``m`` cells, from ``v`` (k, m) flat, the
    values ``(x̃₀ P_j)_m`` (:func:`_gather`); ``m`` fixed to ``M`` when compiled (the loops
    over the missing cells unrolled), or any count with ``M = 0``.

    For component j: the missing cells' conditional mean, centred on ``mu_j``,
    ``-P_mm⁻¹ v_j`` into ``c``, and ``v_jᵀ P_mm⁻¹ v_j / 2`` plus the pattern's correction
    added to ``q``. ``z``: scratch of at least ``m`` values.
    """

    @njit(inline="always", fastmath=_FASTMATH)
    def terms(i, m, co, base, cols, table, c, q, v, z):
        k = q.shape[0]
        n = M if M else m
        for j in range(k):
            at = base + k + j * n * n
            vj = j * n
            vz = 0.0
            for a in range(n):
                za = 0.0
                for b in range(n):
                    za += table[at + a * n + b] * v[vj + b]
                z[a] = za
                vz += v[vj + a] * za
            for a in range(n):
                c[j, cols[co + a], i] = -z[a]
            q[j, i] += 0.5 * vz + table[base + j]

    return terms


@njit(inline="always", fastmath=_FASTMATH)
def _gather(i, m, co, cols, whole, g, chol, y, v):
    """``v[j m + a] = (x̃₀ P_j)[cols[co + a]]`` for row i: from ``g`` when ``whole``, else
    from ``y`` and the row of ``U_j``."""
    k, d = y.shape[0], y.shape[1]
    for j in range(k):
        for a in range(m):
            ca = cols[co + a]
            if whole:
                v[j * m + a] = g[j, ca, i]
            else:
                va = 0.0
                for l in range(ca, d):
                    va += chol[j, ca, l] * y[j, l, i]
                v[j * m + a] = va


def _by_count(counts):
    """``terms(i, m, ...)``: :func:`_conditional_terms` specialised for each of ``counts``,
    and for any other count."""
    if not counts:
        return _conditional_terms(0)
    M = counts[0]
    fixed = _conditional_terms(M)
    others = _by_count(counts[1:])

    @njit(inline="always", fastmath=_FASTMATH)
    def terms(i, m, co, base, cols, table, c, q, v, z):
        if m == M:
            fixed(i, m, co, base, cols, table, c, q, v, z)
        else:
            others(i, m, co, base, cols, table, c, q, v, z)

    return terms


_terms_by_count = _by_count(SPECIALISED_COUNTS)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def chunk_log_prob(y, incomplete, pats, patterns, tables, chol, c, q, v, z, g_flat):
    """Observed-part weighted log-probabilities of a chunk (less each row's maximum) and,
    for rows with missing cells, the conditional means of those cells.

    On entry ``y`` and ``q`` are as :func:`chunk_products` leaves them: ``y`` (k, d, nb)
    is the row centred on ``mu_j`` with zeros in its missing cells (``x̃₀``), times
    ``U_j``. For a row with missing cells m, with ``v = (x̃₀ P_j)_m`` (from ``y`` and the
    rows m of ``U_j``), the conditional mean of the missing cells, centred on ``mu_j``, is
    ``-P_mm⁻¹ v`` (written into ``c`` (k, d, nb)) and the Mahalanobis term of the observed
    cells is ``|y|² - vᵀ P_mm⁻¹ v``. ``incomplete``: positions in the chunk of rows with
    missing cells; ``pats``: each row's pattern rank; ``v``, ``z``: scratch of at least
    k and 1 times the largest missing count.

    Returns
    -------
    top : ndarray (nb,)
        Each row's maximum (0 where it is not finite).
    """
    k, d, nb = y.shape
    pat_m, col_off, cols = patterns.pat_m, patterns.col_off, patterns.cols
    table, off = tables.table, tables.off
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
        upper_times(chol, y, g)
    for i in incomplete:
        p = pats[i]
        m, co = pat_m[p], col_off[p]
        _gather(i, m, co, cols, whole, g, chol, y, v)
        _terms_by_count(i, m, co, off[p], cols, table, c, q, v, z)
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


# --------------------------------------------------------------------------------------
# Responsibilities and moments
# --------------------------------------------------------------------------------------

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
def chunk_weigh(e, top, weights, weighted, rows, incomplete, pats, nk, resp_by_pattern):
    """Responsibilities of a chunk (``e``: exp of the log-probabilities less the row
    maximum, overwritten), their sums, and their sums per pattern for the rows with missing
    cells. Returns the chunk's weighted log-likelihood and row count."""
    k, nb = e.shape
    w = np.empty(nb if weighted else 0)
    for i in range(w.size):
        w[i] = weights[rows[i]]
    scale, loglik, n_rows = _row_normalizers(e, top, w, weighted)
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
