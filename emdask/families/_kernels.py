"""Fast E-step kernels of the Gaussian family: sufficient statistics as a few large matrix
products per row chunk.

The plain per-component kernel in :mod:`emdask.families.gaussian` is the reference these
kernels are tested against; both return the same statistics (counts, first and second moments
about the previous means, log-likelihood).

Full and tied covariance
------------------------
All components are handled by one matrix product per chunk. With a common shift ``c`` (the
weighted mean of the component means), ``x̃ = x - c`` and ``δ_j = mu_j - c``::

    [x̃, 1] @ [[U_1 ... U_k], [-δ_1 U_1 ... -δ_k U_k]]  ->  (x - mu_j) U_j for every j

and the second moments about each previous mean, with ``w_ij = r_ij (x̃_i - δ_j)``::

    [x̃, 1]ᵀ @ [w_1 ... w_k]  ->  Σ_i x̃_i w_ijᵀ and Σ_i w_ij
    s2_j = Σ_i x̃_i w_ijᵀ - δ_j s1_jᵀ     (s1_j = Σ_i w_ij)

Error bound. Only one factor of each product is taken about the common shift; the other is
centred on the component's own previous mean. A rounding error of ``x̃`` or ``δ_j`` is of
order ``eps (|x - mu_j| + |δ_j|)``, so the relative error of a component's Mahalanobis terms
and second moments grows like ``eps · |δ_j| / σ_j`` (σ_j the component's spread): linearly in
how far the component lies from the common shift in units of its own spread, never
quadratically as ``Σ x xᵀ - n mu muᵀ`` would. An offset shared by all components (a column
with mean 1e6) is removed exactly by the shift. Components 1e4 spreads apart keep about 12
significant digits (tests check this against the per-component kernel).

Missing cells under a full covariance
-------------------------------------
Rows are sorted by their missingness pattern once per block (the order depends on the data
alone and is kept while a persisted block is reused), so that the pattern's work (Cholesky
factor of ``P_mm``, its inverse and log-determinant, for every component) is done once per
pattern. Per row and component the remaining work is O(d² + d_m²): with ``x̃₀`` the centred
row with zeros in its missing cells,

    q_o = x̃₀ᵀ P x̃₀ - vᵀ P_mm⁻¹ v,   v = (P x̃₀)_m,   x_m - mu_m = -P_mm⁻¹ v

(the observed part's Mahalanobis distance and the conditional mean), where ``x̃₀ U`` and
``x̃₀ P`` come from matrix products over the chunk. The conditional covariance ``P_mm⁻¹``
enters the second moment once per pattern, weighted by the pattern's summed
responsibilities.

Compiled kernel
---------------
A whole block goes through one call of a C extension module built with the package
(:mod:`emdask.families._compiled`) instead of the numpy steps above: per chunk, rows centred
on each component's own previous mean ``x - mu_j`` (exactly, as in the reference; missing
cells zero) times ``U_j`` by register-blocked triangular products, the conditional terms of
rows with missing cells from per-pattern tables (one loop, specialised by the compiler for
each small missing count), log-densities less the row maximum, one vectorised ``exp``,
responsibilities and the second moments ``Σ_i r_ij (x_i - mu_j)(x_i - mu_j)ᵀ`` by a
register-blocked kernel over the lower triangle. No common shift is used there at all.
Where the module was not built (or with ``EMDASK_COMPILED=0``) the numpy steps above run;
the tests compare both with the per-component reference and with each other.

Diagonal and spherical covariance
---------------------------------
Product form: every component at once on a (rows, components, features) array, missing cells
left out of the product.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from functools import partial

import numpy as np

from .base import ILL_DEFINED, block_memo

__all__ = [
    "DenseKernel",
    "DiagonalKernel",
    "COMPLETE_CHUNK",
    "MISSING_CHUNK",
    "ILL_DEFINED",
    "PatternRows",
    "Totals",
    "row_selection",
    "batched_cholesky_inverse",
]

LOG_2PI = np.log(2.0 * np.pi)

#: Rows per chunk of complete rows (chosen by measurement for 16 features and 8 components:
#: 256 to 1024 rows are within a few percent, 2048 and more fall out of cache).
COMPLETE_CHUNK = 256
#: Rows per chunk of rows with missing cells.
MISSING_CHUNK = 256



# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _log_normalize_kb(q):
    """Responsibilities (k, rows), in place of ``q`` (k, rows) weighted log-probabilities,
    and the per-row log-normalizer (rows,). Components along the first axis keep the inner
    loops long."""
    top = q.max(axis=0)
    if not np.all(np.isfinite(top)):
        top = np.where(np.isfinite(top), top, 0.0)
    q -= top
    with np.errstate(under="ignore"):
        np.exp(q, out=q)
    total = q.sum(axis=0)
    with np.errstate(divide="ignore"):
        log_norm = np.log(total)
        scale = 1.0 / total
    log_norm += top
    q *= scale
    return q, log_norm


def batched_cholesky_inverse(A):
    """Inverse and log-determinant of symmetric positive definite matrices.

    A Cholesky factorisation and triangular inversion written entry by entry, each step
    vectorised over the whole batch (fast for many small matrices).

    Parameters
    ----------
    A : ndarray of shape (..., m, m)

    Returns
    -------
    inverse : ndarray of shape (..., m, m)
    log_det : ndarray of shape (...)

    Raises
    ------
    ValueError
        If a matrix is not positive definite.
    """
    m = A.shape[-1]
    batch = A.shape[:-2]
    a = np.moveaxis(A.reshape(-1, m, m), 0, -1)  # (m, m, B): the batch along the last axis
    L = np.zeros_like(a)
    for j in range(m):
        s = a[j, j] - np.einsum("kb,kb->b", L[j, :j], L[j, :j]) if j else a[j, j].copy()
        if not np.all(s > 0.0):
            raise ValueError(ILL_DEFINED)
        L[j, j] = np.sqrt(s)
        for i in range(j + 1, m):
            t = a[i, j] - np.einsum("kb,kb->b", L[i, :j], L[j, :j]) if j else a[i, j].copy()
            L[i, j] = t / L[j, j]
    Linv = np.zeros_like(a)  # lower triangular, rows by forward substitution
    for i in range(m):
        Linv[i, i] = 1.0 / L[i, i]
        for c in range(i):
            Linv[i, c] = -np.einsum("kb,kb->b", L[i, c:i], Linv[c:i, c]) * Linv[i, i]
    inverse = np.einsum("kib,kjb->ijb", Linv, Linv)  # Linvᵀ Linv
    log_det = 2.0 * np.log(np.diagonal(L, axis1=0, axis2=1)).sum(axis=-1)
    inverse = np.moveaxis(inverse, -1, 0).reshape(batch + (m, m))
    return inverse, log_det.reshape(batch)


class PatternRows:
    """Rows with missing cells (at least one observed), sorted by missingness pattern.

    Attributes
    ----------
    source : ndarray (n_source, d)
        The block the rows come from.
    rows : ndarray (n,)
        Positions of the rows in ``source``, in pattern order.
    weights : ndarray (n,) or None
    pattern_of_row, count_of_row, local_of_row : ndarray (n,)
        Each row's pattern rank, the pattern's missing count and its position among the
        patterns with that count.
    cols_by_count : dict of int to ndarray (n_patterns_m, m)
        Missing columns of the patterns with m missing cells, in rank order.
    """

    def __init__(self, source, rows, weights, pattern_of_row, count_of_row, local_of_row,
                 cols_by_count):
        self.source = source
        self.rows = rows
        self.weights = weights
        self.pattern_of_row = pattern_of_row
        self.count_of_row = count_of_row
        self.local_of_row = local_of_row
        self.cols_by_count = cols_by_count
        self._X = None

    @property
    def X(self):
        """The rows, in pattern order (a copy, made once)."""
        if self._X is None:
            self._X = self.source[self.rows]
        return self._X

    @property
    def miss(self):
        return np.isnan(self.X)


@dataclass(frozen=True)
class _Layout:
    complete: np.ndarray  # positions of complete rows
    incomplete: np.ndarray  # positions of informative incomplete rows, sorted by pattern
    pattern_of_row: np.ndarray
    count_of_row: np.ndarray
    local_of_row: np.ndarray
    cols_by_count: dict


#: Row layouts of the blocks seen last, by block identity: the sort by missingness pattern
#: depends on the data alone, and a persisted block is handed to every EM iteration. An entry
#: is used only while its block is alive and has the same missing cells, and goes with it.
_LAYOUTS = {}


def _forget(key, _ref):
    _LAYOUTS.pop(key, None)


def _layout(X, miss):
    key = id(X)
    packed = np.packbits(miss)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        ref, shape, saved, layout = hit
        if ref() is X and shape == miss.shape and np.array_equal(saved, packed):
            return layout
    n_miss = miss.sum(axis=1)
    incomplete = np.flatnonzero((n_miss > 0) & (n_miss < X.shape[1]))
    if incomplete.size:
        order, pattern_of_row, count_of_row, local_of_row, cols_by_count = _sort_by_pattern(
            miss[incomplete]
        )
    else:
        order = pattern_of_row = count_of_row = local_of_row = incomplete
        cols_by_count = {}
    layout = _Layout(
        np.flatnonzero(n_miss == 0), incomplete[order], pattern_of_row, count_of_row,
        local_of_row, cols_by_count,
    )
    try:
        ref = weakref.ref(X, partial(_forget, key))
    except TypeError:  # pragma: no cover - ndarrays take weak references
        return layout
    _LAYOUTS[key] = (ref, miss.shape, packed, layout)
    return layout


def row_selection(X, weights):
    """Rows that carry information, split into complete and incomplete ones.

    Returns ``(complete, complete_w, incomplete)``: the complete rows (``X`` itself when
    every row is complete and unweighted), their weights (or ``None``) and the incomplete
    rows as :class:`PatternRows` (or ``None``). Rows with every cell missing or with weight
    zero add nothing to the statistics and are left out.
    """
    miss = np.isnan(X)
    if not miss.any():
        if weights is None:
            return X, None, None
        keep = weights > 0
        return X[keep], weights[keep], None
    layout = _layout(X, miss)
    complete = layout.complete
    rows = layout.incomplete
    pattern_of_row, count_of_row, local_of_row = (
        layout.pattern_of_row, layout.count_of_row, layout.local_of_row
    )
    cw = iw = None
    if weights is not None:
        complete = complete[weights[complete] > 0]
        cw = weights[complete]
        keep = weights[rows] > 0
        rows = rows[keep]
        pattern_of_row, count_of_row, local_of_row = (
            pattern_of_row[keep], count_of_row[keep], local_of_row[keep]
        )
        iw = weights[rows]
    incomplete = None
    if rows.size:
        incomplete = PatternRows(
            X, rows, iw, pattern_of_row, count_of_row, local_of_row, layout.cols_by_count
        )
    return X[complete], cw, incomplete


def dense_block_stats(X, weights, means, mix_weights, chol, const, chunk=COMPLETE_CHUNK):
    """E-step statistics of a whole block under full or tied covariances in one compiled
    call (complete rows and rows with missing cells alike), or ``None`` when the compiled
    kernel is not in use (not built, or ``EMDASK_COMPILED=0``): the caller then runs the
    numpy steps of :class:`DenseKernel`.

    Every argument reaches the compiled kernel in one form: the block read-only, C-ordered
    float64 (a column-major block as its transpose, without a copy), the weights always an
    array, the parameters fresh C-ordered float64 arrays.

    Returns ``(n_rows, loglik, nk, s1, s2)`` with the moments about each component's mean.
    """
    compiled = _compiled_kernels()
    if compiled is None:
        return None
    k, d = means.shape
    nk, s1, lower = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] == 0:
        return 0.0, 0.0, nk, s1, lower
    chol = np.array(np.broadcast_to(chol, (k, d, d)), dtype=np.float64, order="C")
    precision = np.einsum("kij,klj->kil", chol, chol)
    model = compiled.Model(np.array(means, dtype=np.float64, order="C"), chol, precision,
                           np.array(const, dtype=np.float64, order="C"))
    block = _block(compiled, X, weights)
    patterns = _block_patterns(compiled, block, X, weights, k)
    n_in, n_pat = patterns.rows.size, patterns.pat_m.size
    if n_in == 0:
        return 0.0, 0.0, nk, s1, lower
    sizes = k + k * patterns.pat_m * patterns.pat_m
    cache = _pattern_cache(precision, d, compiled.TABLE_FEATURES)
    plan = None if cache is None else cache.plan(patterns.keys, sizes)
    work_size = compiled.work_size(k, d, patterns, chunk)
    if plan is None:
        work = _float_workspace(int(sizes.sum()) + work_size)
        off = np.cumsum(sizes) - sizes
        tables = compiled.Tables(work[: sizes.sum()], off, np.ones(n_pat, dtype=np.bool_))
        work = work[sizes.sum() :]
    else:
        tables = compiled.Tables(cache.store, *plan)
        work = _float_workspace(work_size)
    loglik, n_rows = compiled.dense_block_stats(
        block, model, patterns, tables, compiled.Moments(nk, s1, lower), int(chunk), work
    )
    if plan is not None:
        cache.commit(patterns.keys, *plan)
    return n_rows, loglik, nk, s1, _mirror_lower(lower)


def _read_only(a):
    view = a.view()
    view.flags.writeable = False
    return view


_NO_WEIGHTS = _read_only(np.empty(0))


def _block(compiled, X, weights):
    """The block as the compiled kernels take it (see :func:`dense_block_stats`)."""
    if X.flags.c_contiguous:
        data, column_major = X, False
    elif X.flags.f_contiguous:
        data, column_major = X.T, True
    else:
        data, column_major = np.ascontiguousarray(X), False
    if weights is None:
        w = _NO_WEIGHTS
    else:
        w = _read_only(np.ascontiguousarray(weights, dtype=np.float64))
    return compiled.Block(_read_only(data), column_major, w, weights is not None)


def _block_patterns(compiled, block, X, weights, k):
    """The :class:`~emdask.families._compiled.Patterns` of a block, kept in the block's
    memo (:data:`emdask.families.base.block_memo`) when its caller keeps one: finding them
    reads the whole block, a few percent of the E-step, and they do not change from pass to
    pass. Rows of weight zero are not informative, so patterns found under weights are not
    kept. A block whose rows all carry every cell is kept as that fact alone."""
    memo = block_memo.get() if weights is None else None
    key = ("gaussian-patterns", X.shape, k)
    kept = None if memo is None else memo.get(key)
    if kept is not None:
        return _complete_patterns(compiled, X.shape[0]) if kept == "complete" else kept
    d = X.shape[1]
    if d <= compiled.MAX_KEY_FEATURES:
        patterns = compiled.find_patterns(block, k, _int_workspace(X.shape[0], d, compiled))
    else:
        patterns = _numpy_patterns(compiled, X, weights)
    if memo is not None:
        if _are_complete(patterns, X.shape[0]):
            memo[key] = "complete"
        else:  # copies: the rows' arrays are views of this thread's scratch
            patterns = memo[key] = type(patterns)(*(np.array(a) for a in patterns))
    return patterns


def _are_complete(patterns, n):
    """Whether ``patterns`` say: every one of the ``n`` rows, in order, nothing missing."""
    return (patterns.pat_m.size == 1 and patterns.pat_m[0] == 0 and patterns.rows.size == n
            and (n == 0 or (patterns.rows[0] == 0 and patterns.rows[-1] == n - 1)))


def _complete_patterns(compiled, n):
    none = np.zeros(1, dtype=np.int64)
    return compiled.Patterns(np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                              none, none, np.zeros(0, dtype=np.int64), none)


def _numpy_patterns(compiled, X, weights):
    """:func:`emdask.families._compiled.find_patterns` for blocks too wide for
    one integer key per pattern: the rows sorted by pattern with numpy."""
    miss = np.isnan(X)
    keep = miss.sum(axis=1) < X.shape[1]
    if weights is not None:
        keep &= weights > 0
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        none = np.zeros(0, dtype=np.int64)
        return compiled.Patterns(none, none, none, none, none, none)
    order, pats = _sort_by_pattern(miss[rows])[:2]
    rows = rows[order]
    first = np.concatenate(([True], pats[1:] != pats[:-1]))
    masks = miss[rows[first]]  # (n_patterns, d) in rank order
    pat_m = masks.sum(axis=1).astype(np.int64)
    cols = np.nonzero(masks)[1].astype(np.int64)  # per pattern, ascending
    return compiled.Patterns(rows.astype(np.int64), pats.astype(np.int64), pat_m,
                             np.cumsum(pat_m) - pat_m, cols, np.zeros(pat_m.size, np.int64))


#: Scratch space of the whole-block kernel, one per thread, kept between blocks up to this
#: many bytes each (int and float): a Dask worker's allocator returns large blocks to the
#: system when they are freed, so fresh ones cost page faults at every block.
WORKSPACE_MAX_BYTES = 256 * 2**20
_WORKSPACE = threading.local()


def _int_workspace(n, d, compiled):
    """This thread's int64 scratch for finding the patterns of ``n`` rows of ``d`` columns
    (a table of 2^d entries up to ``TABLE_FEATURES`` columns)."""
    need = 5 * n + ((1 << d) if d <= compiled.TABLE_FEATURES else 1)
    iwork = getattr(_WORKSPACE, "iwork", None)
    if iwork is None or iwork.size < need:
        iwork = np.empty(need, dtype=np.int64)
        if iwork.nbytes <= WORKSPACE_MAX_BYTES:
            _WORKSPACE.iwork = iwork
    return iwork


def _float_workspace(need):
    """This thread's float64 scratch of at least ``need`` values."""
    fwork = getattr(_WORKSPACE, "fwork", None)
    if fwork is None or fwork.size < need:
        fwork = np.empty(need)
        if fwork.nbytes <= WORKSPACE_MAX_BYTES:
            _WORKSPACE.fwork = fwork
    return fwork


class _PatternCache:
    """This thread's pattern tables (``P_mm⁻¹`` and log-determinant terms) under the
    precisions of the last block, in ``store`` at ``slot[key]`` for the patterns with
    ``slot_stamp[key] == stamp``: a pass computes each pattern's once per thread instead of
    once per block."""

    def __init__(self, size):
        self.precision = None
        self.stamp = 0
        self.slot = np.zeros(size, dtype=np.int64)
        self.slot_stamp = np.full(size, -1, dtype=np.int64)
        self.store = np.empty(0)
        self.used = 0
        self._pending = 0

    def use(self, precision):
        p = self.precision
        if p is None or p.shape != precision.shape or not np.array_equal(p, precision):
            self.precision = precision.copy()
            self.stamp += 1
            self.used = 0

    def plan(self, keys, sizes):
        """``(off, compute)`` of a block's patterns (keys, table sizes): where their tables
        are or go in ``store`` (grown as needed), and which are new; ``None`` when the new
        ones would not fit in :data:`WORKSPACE_MAX_BYTES` (the cache is emptied)."""
        hit = self.slot_stamp[keys] == self.stamp
        new = np.where(hit, 0, sizes)
        needed = self.used + int(new.sum())
        if needed > self.store.size:
            if needed * 8 > WORKSPACE_MAX_BYTES:
                self.precision, self.used = None, 0
                self.slot_stamp[:] = -1
                return None
            store = np.empty(max(needed, 2 * self.store.size))
            store[: self.used] = self.store[: self.used]
            self.store = store
        self._pending = needed
        return np.where(hit, self.slot[keys], self.used + np.cumsum(new) - new), ~hit

    def commit(self, keys, off, compute):
        """Keep the tables of a block's new patterns (once computed)."""
        fresh = keys[compute]
        self.slot[fresh] = off[compute]
        self.slot_stamp[fresh] = self.stamp
        self.used = self._pending


def _pattern_cache(precision, d, table_features):
    """This thread's :class:`_PatternCache` under ``precision``, or ``None`` above
    ``table_features`` columns (too many possible patterns for a table by key)."""
    if d > table_features:
        return None
    cache = getattr(_WORKSPACE, "patterns", None)
    if cache is None:
        cache = _WORKSPACE.patterns = _PatternCache(1 << table_features)
    cache.use(precision)
    return cache


@dataclass
class Totals:
    n_rows: float = 0.0
    loglik: float = 0.0


def _weigh(resp, log_norm, row_w, totals):
    """Add a chunk's rows to the totals; weight its responsibilities (k, rows) in place."""
    if row_w is None:
        totals.n_rows += log_norm.size
        totals.loglik += log_norm.sum()
    else:
        totals.n_rows += row_w.sum()
        totals.loglik += row_w @ log_norm
        resp *= row_w


# --------------------------------------------------------------------------------------
# Full and tied covariance
# --------------------------------------------------------------------------------------


class DenseKernel:
    """E-step statistics under full (or tied) covariances, for every component at once.

    Parameters
    ----------
    means : ndarray of shape (k, d)
    weights : ndarray of shape (k,)
    chol : ndarray of shape (k, d, d)
        Upper-triangular ``U_j`` with precision ``P_j = U_j U_jᵀ``.
    const : ndarray of shape (k,)
        ``log w_j + log det U_j - d/2 log 2π``.
    """

    def __init__(self, means, weights, chol, const):
        k, d = means.shape
        self.k, self.d = k, d
        self.means = means
        self.chol = np.ascontiguousarray(np.broadcast_to(chol, (k, d, d)))
        self.const = const
        self.shift = weights @ means if np.all(np.isfinite(weights)) else means.mean(axis=0)
        self.delta = means - self.shift
        # [x̃, 1] @ stacked -> (x - mu_j) U_j for every j
        stacked = np.empty((d + 1, k * d))
        for j in range(k):
            stacked[:d, j * d : (j + 1) * d] = self.chol[j]
            stacked[d, j * d : (j + 1) * d] = -self.delta[j] @ self.chol[j]
        self.stacked = stacked
        self._precision = None
        self._missing_stacked = None

    # -- complete rows --------------------------------------------------------------------

    def complete_stats(self, X, row_w, s1, s2, totals, chunk=COMPLETE_CHUNK):
        """Add the statistics of complete rows ``X`` (n, d) to ``s1`` (k, d) and ``s2``
        (k, d, d), about the previous means.

        Chunks are held transposed (features × rows), so that every elementwise step runs
        along the rows. Returns the summed responsibilities (k,).
        """
        k, d = self.k, self.d
        nk = np.zeros(k)
        if X.shape[0] == 0:
            return nk
        kd = k * d
        n = X.shape[0]
        b = min(chunk, n)
        acc = np.zeros((d + 1, kd))
        xa_buf = np.empty((d + 1, b))
        xa_buf[d] = 1.0
        y_buf = np.empty((kd, b))
        q_buf = np.empty((k, b))
        w_buf = np.empty((k, d, b))
        stacked_t = np.ascontiguousarray(self.stacked.T)
        delta = self.delta[:, :, None]
        for start in range(0, n, b):
            stop = min(start + b, n)
            nb = stop - start
            xa = xa_buf[:, :nb]
            np.subtract(X[start:stop].T, self.shift[:, None], out=xa[:d])
            y = np.matmul(stacked_t, xa, out=y_buf[:, :nb]).reshape(k, d, nb)
            q = np.einsum("jlb,jlb->jb", y, y, out=q_buf[:, :nb])
            q *= -0.5
            q += self.const[:, None]
            resp, log_norm = _log_normalize_kb(q)
            _weigh(resp, log_norm, None if row_w is None else row_w[start:stop], totals)
            nk += resp.sum(axis=1)
            w = np.subtract(xa[None, :d], delta, out=w_buf[:, :, :nb])
            w *= resp[:, None, :]
            acc += xa @ w.reshape(kd, nb).T
        # from [x̃, 1]ᵀ [w_1 ... w_k]: s1_j = Σ w_j, s2_j = Σ x̃ w_jᵀ - δ_j s1_jᵀ
        t1 = acc[d].reshape(k, d)
        t2 = acc[:d].reshape(d, k, d).transpose(1, 0, 2)
        s1 += t1
        s2 += t2 - self.delta[:, :, None] * t1[:, None, :]
        return nk

    # -- rows with missing cells -------------------------------------------------------------

    @property
    def precision(self):
        if self._precision is None:
            self._precision = np.einsum("kij,klj->kil", self.chol, self.chol)
        return self._precision

    @property
    def missing_stacked(self):
        """``[x̃₀, o] @ this`` gives ``x̃₀ U_j`` and ``x̃₀ P_j`` for every j (x̃₀: the row
        centred on ``mu_j`` with zeros in its missing cells, o: its observed mask)."""
        if self._missing_stacked is None:
            k, d = self.k, self.d
            P = self.precision
            big = np.empty((2 * d, 2 * k * d))
            for j in range(k):
                cu = slice(j * d, (j + 1) * d)
                cp = slice((k + j) * d, (k + j + 1) * d)
                big[:d, cu] = self.chol[j]
                big[d:, cu] = -self.delta[j][:, None] * self.chol[j]
                big[:d, cp] = P[j]
                big[d:, cp] = -self.delta[j][:, None] * P[j]
            self._missing_stacked = big
        return self._missing_stacked

    def _pattern_tables(self, cols_by_count):
        """Per pattern and component: ``P_mm⁻¹`` and the log-density correction."""
        P = self.precision
        tables = {}
        for m, cols in cols_by_count.items():
            Pmm = P[:, cols[:, :, None], cols[:, None, :]]  # (k, n_pat, m, m)
            Pmm = np.ascontiguousarray(Pmm.transpose(1, 0, 2, 3))
            inv, log_det = batched_cholesky_inverse(Pmm)
            corr = 0.5 * m * LOG_2PI - 0.5 * log_det  # (n_pat, k)
            tables[m] = (cols, inv, corr)
        return tables

    def incomplete_stats(self, rows, s1, s2, totals, chunk=MISSING_CHUNK):
        """Add the statistics of rows with missing cells (:class:`PatternRows`) to ``s1``
        (k, d) and ``s2`` (k, d, d) about the previous means.

        Returns the summed responsibilities (k,).
        """
        k, d = self.k, self.d
        row_w = rows.weights
        pattern_of_row, count_of_row, local_of_row = (
            rows.pattern_of_row, rows.count_of_row, rows.local_of_row
        )
        cols_by_count = rows.cols_by_count
        n = rows.rows.size
        nk = np.zeros(k)
        if n == 0:
            return nk
        resp_by_pattern = np.zeros((sum(c.shape[0] for c in cols_by_count.values()), k))
        X, miss = rows.X, rows.miss
        tables = self._pattern_tables(cols_by_count)
        big = self.missing_stacked
        b = min(chunk, n)
        xa_buf = np.empty((b, 2 * d))
        yg_buf = np.empty((b, 2 * k * d))
        q_buf = np.empty((k, b))
        xc_buf = np.empty((k, b, d))
        w_buf = np.empty((k, b, d))
        for start in range(0, n, b):
            stop = min(start + b, n)
            nb = stop - start
            mb = miss[start:stop]
            xa = xa_buf[:nb]
            xt = xa[:, :d]
            np.subtract(X[start:stop], self.shift, out=xt)
            xc = xc_buf[:, :nb]
            w = w_buf[:, :nb]
            np.subtract(xt[None], self.delta[:, None, :], out=xc)  # NaN in missing cells
            np.copyto(xt, 0.0, where=mb)
            np.logical_not(mb, out=xa[:, d:], casting="unsafe")
            yg = np.matmul(xa, big, out=yg_buf[:nb])
            self._incomplete_rows_numpy(
                yg, xc, w, q_buf[:, :nb], tables, count_of_row[start:stop],
                local_of_row[start:stop], pattern_of_row[start:stop],
                None if row_w is None else row_w[start:stop], nk, resp_by_pattern, totals,
            )
            s1 += w.sum(axis=1)
            s2 += np.matmul(xc.transpose(0, 2, 1), w)
        self._add_conditional_covariance(tables, resp_by_pattern, s2)
        return nk

    def _add_conditional_covariance(self, tables, resp_by_pattern, s2):
        """``s2_j[m, m] += Σ_patterns R_pj P_mm⁻¹`` (R: the pattern's summed
        responsibilities)."""
        k, d = self.k, self.d
        flat_size = k * d * d
        extra = np.zeros(flat_size)
        first = 0
        for m, (cols, inv, _) in tables.items():
            R = resp_by_pattern[first : first + cols.shape[0]]  # (n_pat, k)
            first += cols.shape[0]
            flat = (
                np.arange(k)[None, :, None, None] * d * d
                + cols[:, None, :, None] * d
                + cols[:, None, None, :]
            )
            flat = np.broadcast_to(flat, inv.shape)
            extra += np.bincount(
                flat.ravel(), weights=(inv * R[:, :, None, None]).ravel(), minlength=flat_size
            )
        s2 += extra.reshape(k, d, d)

    def _incomplete_rows_numpy(
        self, yg, xc, w, q, tables, counts, locals_, pats, weights, nk, resp_by_pattern, totals
    ):
        """Log-densities, responsibilities, filled rows ``xc`` (k, nb, d) and weighted rows
        ``w`` of one chunk of pattern-sorted rows, from ``yg = [x̃₀ U | x̃₀ P]``."""
        k, d = self.k, self.d
        nb = yg.shape[0]
        y = yg[:, : k * d].reshape(nb, k, d)
        g = yg[:, k * d :].reshape(nb, k, d)
        np.einsum("ijk,ijk->ji", y, y, out=q)
        q *= -0.5
        q += self.const[:, None]
        qt = q.T
        xct = xc.transpose(1, 0, 2)  # (nb, k, d) view
        bounds = np.flatnonzero(np.diff(counts)) + 1
        edges = np.concatenate(([0], bounds, [nb]))
        for a, e in zip(edges[:-1], edges[1:]):
            m = int(counts[a])
            cols, inv, corr = tables[m]
            li = locals_[a:e]
            idx = np.broadcast_to(cols[li][:, None, :], (e - a, k, m))
            v = np.take_along_axis(g[a:e], idx, axis=2)  # (n_r, k, m): P_mo (x_o - mu_o)
            z = np.matmul(inv[li], v[..., None])[..., 0]  # P_mm⁻¹ v
            qt[a:e] += 0.5 * np.einsum("rkm,rkm->rk", v, z)
            qt[a:e] += corr[li]
            np.put_along_axis(xct[a:e], idx, -z, axis=2)
        resp, log_norm = _log_normalize_kb(q)
        _weigh(resp, log_norm, weights, totals)
        nk += resp.sum(axis=1)
        np.multiply(xc, resp[:, :, None], out=w)
        # summed responsibilities per pattern (rows of a pattern are contiguous)
        runs = np.concatenate(([0], np.flatnonzero(np.diff(pats)) + 1))
        resp_by_pattern[pats[runs]] += np.add.reduceat(resp, runs, axis=1).T


def _mirror_lower(lower):
    """Symmetric matrices from their lower triangles (entries above the diagonal are
    ignored)."""
    return np.tril(lower) + np.swapaxes(np.tril(lower, -1), -1, -2)


def _sort_by_pattern(miss):
    """Rows ordered by (number of missing cells, pattern).

    Returns
    -------
    order : ndarray (n,)
        Row permutation.
    pattern_of_row, count_of_row, local_of_row : ndarray (n,)
        For the sorted rows: the pattern's rank (patterns ranked by count, then pattern),
        the pattern's missing count and its position among the patterns with that count.
    cols_by_count : dict of int to ndarray (n_patterns_m, m)
        Missing columns of each pattern (in rank order), ascending.
    """
    n, d = miss.shape
    count = miss.sum(axis=1)
    if d <= 56:
        packed = np.packbits(miss, axis=1, bitorder="little")
        wide = np.zeros((n, 8), dtype=np.uint8)
        wide[:, : packed.shape[1]] = packed
        key = wide.view("<u8").ravel().astype(np.int64) | (count.astype(np.int64) << d)
        order = np.argsort(key, kind="stable")
        key = key[order]
        first = np.concatenate(([True], key[1:] != key[:-1]))
    else:
        packed = np.packbits(miss, axis=1)
        raw = np.ascontiguousarray(np.column_stack([count.astype(np.uint8), packed]))
        key = raw.view(np.dtype((np.void, raw.shape[1]))).ravel()
        order = np.argsort(key, kind="stable")
        key = key[order]
        first = np.concatenate(([True], key[1:] != key[:-1]))
    pattern_of_row = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    count_sorted = count[order]
    pat_count = count_sorted[starts]
    masks = miss[order[starts]]
    cols_by_count = {}
    local = np.empty(starts.size, dtype=np.intp)
    for m in np.unique(pat_count):
        pats = np.flatnonzero(pat_count == m)  # contiguous ranks
        cols_by_count[int(m)] = np.nonzero(masks[pats])[1].reshape(pats.size, int(m))
        local[pats] = np.arange(pats.size)
    return order, pattern_of_row, count_sorted, local[pattern_of_row], cols_by_count


# --------------------------------------------------------------------------------------
# Diagonal and spherical covariance
# --------------------------------------------------------------------------------------


class DiagonalKernel:
    """E-step statistics under diagonal (or spherical) covariances, all components at once.

    Parameters
    ----------
    means : ndarray of shape (k, d)
    factor : ndarray of shape (k, d)
        Square roots of the precisions.
    const : ndarray of shape (k,)
    """

    def __init__(self, means, factor, const):
        self.means = means
        self.factor = factor
        self.const = const
        self.k, self.d = means.shape
        self.miss_corr = 0.5 * LOG_2PI - np.log(factor)  # (k, d)

    def stats(self, X, miss, row_w, s1, s2, totals, chunk=COMPLETE_CHUNK):
        k, d = self.k, self.d
        n = X.shape[0]
        nk = np.zeros(k)
        if n == 0:
            return nk
        b = min(chunk, n)
        xc_buf = np.empty((b, k, d))
        y_buf = np.empty((b, k, d))
        for start in range(0, n, b):
            stop = min(start + b, n)
            nb = stop - start
            xc = np.subtract(X[start:stop, None, :], self.means, out=xc_buf[:nb])
            mb = None if miss is None else miss[start:stop]
            if mb is not None:
                np.copyto(xc, 0.0, where=mb[:, None, :])
            y = np.multiply(xc, self.factor, out=y_buf[:nb])
            q = np.einsum("ijk,ijk->ji", y, y)
            q *= -0.5
            q += self.const[:, None]
            if mb is not None:
                q += self.miss_corr @ mb.T
            resp, log_norm = _log_normalize_kb(q)
            _weigh(resp, log_norm, None if row_w is None else row_w[start:stop], totals)
            nk += resp.sum(axis=1)
            w = np.multiply(xc, resp.T[:, :, None], out=y_buf[:nb])
            s1 += w.sum(axis=0)
            s2 += np.einsum("ijk,ijk->jk", w, xc)
            if mb is not None:
                s2 += (resp @ mb) / self.factor**2
        return nk


# --------------------------------------------------------------------------------------
# The compiled kernel (a C extension module built with the package)
# --------------------------------------------------------------------------------------

#: Whether to use the compiled kernel (the numpy steps above are the reference it is tested
#: against). ``EMDASK_COMPILED=0`` in the environment turns it off.
use_compiled = os.environ.get("EMDASK_COMPILED", "1") != "0"
_LOADED = {}


def _load(name):
    """The compiled module ``name`` (built with the package), or ``None`` when it was not
    built; imported once."""
    if name not in _LOADED:
        try:
            if name == "gaussian":
                from . import _compiled as module
            else:
                from . import _cdiscrete as module
        except ImportError:
            module = None
        _LOADED[name] = module
    return _LOADED[name]


def compiled_available():
    """Whether the compiled kernel's C module was built in this installation."""
    return _load("gaussian") is not None


def _compiled_kernels():
    return _load("gaussian") if use_compiled else None


def compiled_discrete():
    """The compiled categorical kernel (:mod:`emdask.families._cdiscrete`, built with the
    package), or ``None`` (turned off with ``EMDASK_COMPILED=0``, or not built)."""
    return _load("categorical") if use_compiled else None
