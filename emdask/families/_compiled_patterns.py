"""Compiled missingness patterns of a block (needs numba: the ``fast`` extra).

A block's informative rows (some cell observed, weight above zero) and their missingness
patterns, as flat tables indexed by pattern rank (:class:`Patterns`); per pattern and
component, ``P_mm⁻¹`` and the log-density correction (:func:`pattern_tables`); and the
conditional covariances the M-step adds to the second moments
(:func:`add_conditional_covariance`). Importing this module raises ImportError when numba is
not installed.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from ._codegen import prefer_wide_vectors

prefer_wide_vectors()  # before numba's first import

from numba import njit  # noqa: E402

from .base import ILL_DEFINED  # noqa: E402

#: Widest row whose missingness pattern fits in one integer key (wider blocks find their
#: patterns with numpy, :func:`emdask.families._kernels.numpy_patterns`).
MAX_KEY_FEATURES = 62
#: Up to this many features, patterns are found through a table indexed by the key;
#: wider rows sort their keys instead.
TABLE_FEATURES = 16
#: Rows are taken in pattern order when their patterns' tables exceed this many bytes.
SORT_TABLE_BYTES = 1 << 20

#: The informative rows of a block and their missingness patterns (all int64 arrays).
#: ``rows``, ``pats``: each row's position in the block and its pattern rank; per pattern,
#: ``pat_m`` its missing count, ``col_off`` the offset of its missing columns (ascending)
#: in ``cols``, ``keys`` its missing columns as bits (bit l: column l; zero above
#: :data:`MAX_KEY_FEATURES` columns). Patterns are ranked by missing count, then by key, so
#: the complete pattern, if present, is rank 0.
Patterns = namedtuple("Patterns", ["rows", "pats", "pat_m", "col_off", "cols", "keys"])

#: Per pattern p and component j, the correction ``0.5 m log 2π - 0.5 log det P_mm`` at
#: ``table[off[p] + j]`` followed by the k inverses ``P_mm⁻¹`` (row-major) from
#: ``table[off[p] + k]``; only the patterns with ``compute[p]`` are computed, the others
#: are in ``table`` already.
Tables = namedtuple("Tables", ["table", "off", "compute"])


@njit(cache=True, nogil=True)
def block_patterns(data, column_major, weights, weighted, k, iwork):
    """The informative rows of a block and their missingness patterns.

    Parameters
    ----------
    data : ndarray (n, d), or (d, n) when ``column_major``
        The block, NaN for a missing cell; ``d <= MAX_KEY_FEATURES``.
    weights : ndarray (n,), read when ``weighted``
    k : int
        Number of components: when the patterns' tables (k of each) outgrow the core's
        cache, the rows are taken in pattern order.
    iwork : ndarray (int64), at least ``5 n + 2^d`` long (``5 n + 1`` above
        :data:`TABLE_FEATURES` columns)
        Scratch space; the returned arrays of row length are views of it.

    Returns
    -------
    Patterns
    """
    if column_major:
        d, n = data.shape
    else:
        n, d = data.shape
    rows, keys = _informative_rows(data, column_major, weights, weighted,
                                   iwork[:n], iwork[n : 2 * n])
    pats, pat_m, col_off, cols, pat_keys = _patterns(
        keys, d, iwork[2 * n : 3 * n], iwork[3 * n : 4 * n], iwork[4 * n : 5 * n],
        iwork[5 * n :],
    )
    # Rows look their pattern's tables up one at a time; when those tables outgrow the
    # core's cache, rows taken in pattern order (a counting sort, stable) read each table
    # once per run of rows instead of once per row, from memory.
    table_bytes = 0
    for p in range(pat_m.size):
        table_bytes += 8 * k * (pat_m[p] * pat_m[p] + 1)
    if table_bytes > SORT_TABLE_BYTES:
        n_in = rows.size
        rows, pats = _rows_by_pattern(rows, pats, pat_m.size, iwork[n : n + n_in],
                                      iwork[2 * n : 2 * n + n_in])
    return Patterns(rows, pats, pat_m, col_off, cols, pat_keys)


@njit(cache=True, nogil=True)
def _informative_rows(data, column_major, weights, weighted, rows, keys):
    """Rows that carry information (some cell observed, weight above zero), in order, and
    the missing cells of each as bits, written into ``rows`` and ``keys`` (n,); returns them
    cut to the rows found."""
    at = 0
    if column_major:
        # the bits a column at a time, contiguous and branch-free
        d, n = data.shape
        for i in range(n):
            keys[i] = 0
        for l in range(d):
            bit = np.int64(1) << l
            for i in range(n):
                x = data[l, i]
                keys[i] |= bit if x != x else 0
        every = (np.int64(1) << d) - 1
        for i in range(n):
            key = keys[i]
            if key == every or (weighted and not weights[i] > 0.0):
                continue
            rows[at] = i
            keys[at] = key
            at += 1
        return rows[:at], keys[:at]
    n, d = data.shape
    for i in range(n):
        if weighted and not weights[i] > 0.0:
            continue
        key = 0
        count = 0
        for l in range(d):
            x = data[i, l]
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
    ``pats`` (n,) and ``table`` (2^d when ``d <= TABLE_FEATURES``) are scratch space.

    Returns each row's pattern rank, and per pattern its missing count, the offset of its
    missing columns in the flat columns, the flat columns and its key (see
    :class:`Patterns`).
    """
    n = keys.size
    local = local[:n]  # pattern id by first appearance
    n_pat = 0
    if d <= TABLE_FEATURES:
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
    pat_keys = np.empty(n_pat, dtype=np.int64)
    for p in range(n_pat):
        pat_m[rank[p]] = count[p]
        pat_keys[rank[p]] = found[p]
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
    return pats, pat_m, col_off, cols, pat_keys


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
def pattern_tables(P, patterns, tables):
    """``P_mm⁻¹`` and ``0.5 m log 2π - 0.5 log det P_mm`` of every pattern p with
    ``tables.compute[p]`` and every component, into ``tables.table`` (see :class:`Tables`).

    Parameters
    ----------
    P : ndarray (k, d, d)
        Precisions.

    Raises
    ------
    ValueError
        If some ``P_mm`` is not positive definite.
    """
    pat_m, col_off, cols = patterns.pat_m, patterns.col_off, patterns.cols
    table, off, compute = tables.table, tables.off, tables.compute
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
                    raise ValueError(ILL_DEFINED)
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
        base = off[p] + k
        for a in range(m):
            for b in range(a, m):
                for j in range(k):
                    acc[j] = 0.0
                for t in range(b, m):
                    for j in range(k):
                        acc[j] += Li[t, a, j] * Li[t, b, j]
                ra = m - 1 - a
                rb = m - 1 - b
                for j in range(k):
                    table[base + j * mm + ra * m + rb] = acc[j]
                    table[base + j * mm + rb * m + ra] = acc[j]
        for j in range(k):
            table[off[p] + j] = 0.5 * m * log_2pi - 0.5 * log_det_upto[m, j]


@njit(cache=True, nogil=True)
def add_conditional_covariance(lower, resp_by_pattern, patterns, tables):
    """``lower_j[m, m] += Σ_patterns R_pj P_mm⁻¹`` on and below the diagonal (R: the
    pattern's summed responsibilities; columns ascending, so entry (a, b ≤ a) of ``P_mm⁻¹``
    falls on or below the diagonal)."""
    pat_m, col_off, cols = patterns.pat_m, patterns.col_off, patterns.cols
    table, off = tables.table, tables.off
    k = lower.shape[0]
    for p in range(pat_m.size):
        m = pat_m[p]
        co = col_off[p]
        for j in range(k):
            r = resp_by_pattern[p, j]
            base = off[p] + k + j * m * m
            for a in range(m):
                ca = cols[co + a]
                for b in range(a + 1):
                    lower[j, ca, cols[co + b]] += r * table[base + a * m + b]
