"""The compiled Gaussian E-step under full (or tied) covariances: one call per block (needs
numba: the ``fast`` extra).

:func:`find_patterns` finds a block's missingness patterns
(:mod:`emdask.families._compiled_patterns`), then :func:`dense_block_stats` runs the steps
of :mod:`emdask.families._compiled_products` over the chunks of the block. Their arguments
are small named groups of arrays, each with one type (a read-only C-ordered float64 block,
weights always an array, ...: see :func:`emdask.families._kernels.dense_block_stats`), so
that each is compiled once. The numpy steps of :class:`emdask.families._kernels.DenseKernel`
are the reference the tests compare them with. Importing this module raises ImportError when numba is not installed.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from ._codegen import prefer_wide_vectors

prefer_wide_vectors()  # before numba's first import

from numba import njit  # noqa: E402

from ._compiled_patterns import (  # noqa: E402, F401
    MAX_KEY_FEATURES,
    SORT_TABLE_BYTES,
    TABLE_FEATURES,
    Patterns,
    Tables,
    add_conditional_covariance,
    block_patterns,
    pattern_tables,
)
from ._compiled_products import (  # noqa: E402, F401
    _FASTMATH,
    centre_chunk,
    chunk_log_prob,
    chunk_products,
    chunk_weigh,
    exp_nonpositive,
    lower_moments,
)

#: A block: ``data`` the rows (n, d), or their transpose (d, n) when ``column_major``
#: (read-only, C-ordered, float64, NaN for a missing cell); row ``weights`` (n,), read
#: when ``weighted`` (else of length 0).
Block = namedtuple("Block", ["data", "column_major", "weights", "weighted"])

#: The components (all float64, C-ordered): ``means`` (k, d); ``chol`` (k, d, d) the
#: upper-triangular ``U_j`` with precision ``P_j = U_j U_jᵀ``; ``precision`` (k, d, d);
#: ``const`` (k,) ``log w_j + log det U_j - d/2 log 2π``.
Model = namedtuple("Model", ["means", "chol", "precision", "const"])

#: Statistics added to: ``nk`` (k,) summed responsibilities, ``s1`` (k, d) first moments
#: and ``lower`` (k, d, d) the lower triangles of the second moments about each
#: component's mean.
Moments = namedtuple("Moments", ["nk", "s1", "lower"])


@njit(cache=True, nogil=True)
def find_patterns(block, k, iwork):
    """The informative rows of a :class:`Block` (some cell observed, weight above zero) and
    their missingness patterns, for ``k`` components (see
    :func:`emdask.families._compiled_patterns.block_patterns`; ``iwork``: int64 scratch of
    at least ``5 n + 2^d`` values, ``5 n + 1`` above ``TABLE_FEATURES`` columns).

    Returns
    -------
    Patterns
    """
    return block_patterns(block.data, block.column_major, block.weights, block.weighted, k,
                          iwork)


@njit(cache=True, nogil=True)
def dense_block_stats(block, model, patterns, tables, moments, chunk, work):
    """E-step statistics of a block's informative rows under full (or tied) covariances.

    Complete rows and rows with missing cells go through the same chunks, in the order of
    ``patterns.rows``: rows centred on each component's mean (missing cells zero) times
    ``U_j``, by triangular products vectorised along the rows; the observed-part
    log-densities with per-pattern corrections; responsibilities; missing cells at their
    conditional mean; the moments.

    Parameters
    ----------
    block : Block
    model : Model
    patterns : Patterns
        The rows to take (at least one) and their missingness patterns.
    tables : Tables
        Where each pattern's tables are; those with ``compute`` are computed here.
    moments : Moments, added to
    chunk : int
        Rows per chunk.
    work : ndarray (float64)
        Scratch space kept by the caller between blocks (fresh allocations cost page
        faults at every block in Dask workers, whose allocator hands large blocks back to
        the system), at least ``n_patterns k + k d min(chunk, rows)`` long.

    Returns
    -------
    loglik, n_rows : float

    Raises
    ------
    ValueError
        If the precision of the missing cells of some pattern is not positive definite
        (nothing is added then).
    """
    data, column_major, weights, weighted = block
    means, chol, precision, const = model
    nk, s1, lower = moments
    rows, pats, pat_m = patterns.rows, patterns.pats, patterns.pat_m
    k, d = means.shape
    n_in = rows.size
    n_pat = pat_m.size
    pattern_tables(precision, patterns, tables)
    max_m = 1
    for p in range(n_pat):
        max_m = max(max_m, pat_m[p])
    b = min(chunk, n_in)
    resp_by_pattern = work[: n_pat * k].reshape((n_pat, k))
    resp_by_pattern[:] = 0.0
    g_flat = work[n_pat * k : n_pat * k + k * d * b]
    v = np.zeros(k * max_m)
    z = np.zeros(max_m)
    q_full = np.empty((k, b))
    c_full = np.empty((k, d, b))
    y_full = np.empty((k, d, b))
    bits = np.empty(k * b, dtype=np.int64)
    inc = np.empty(b, dtype=np.int64)
    xt = np.empty((d, b))
    loglik = 0.0
    n_rows = 0.0
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
        incomplete = inc[:n_inc]
        centre_chunk(data, column_major, sel, means, xt, c)
        chunk_products(chol, c, const, y, q)
        top = chunk_log_prob(y, incomplete, pc, patterns, tables, chol, c, q, v, z, g_flat)
        exp_nonpositive(q, bits)
        ll, nr = chunk_weigh(q, top, weights, weighted, sel, incomplete, pc, nk,
                             resp_by_pattern)
        loglik += ll
        n_rows += nr
        lower_moments(c, q, lower, s1)
    add_conditional_covariance(lower, resp_by_pattern, patterns, tables)
    return loglik, n_rows
