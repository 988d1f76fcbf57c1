"""The compiled Gaussian E-step under full (or tied) covariances: one call per block, in the
C extension module ``emdask.families._cgaussian`` built with the package
(``emdask/families/_csrc/gaussian.c``).

:func:`find_patterns` finds a block's missingness patterns, then :func:`dense_block_stats`
runs the steps of the kernel over the chunks of the block: rows centred on each component's
mean, triangular products, the conditional terms of rows missing cells, responsibilities and
moments. Their arguments are small named groups of arrays (see
:func:`emdask.families._kernels.dense_block_stats` for their types), read by the C module by
attribute. The numpy steps of :class:`emdask.families._kernels.DenseKernel` are the reference
the tests compare them with. Importing this module raises ImportError when the C module was
not built.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from ._cgaussian import dense_block_stats as _dense_block_stats
from ._cgaussian import exp_nonpositive as _exp_nonpositive
from ._cgaussian import find_patterns as _find_patterns
from ._cgaussian import work_size as _work_size
from .base import ILL_DEFINED

#: Widest row whose missingness pattern fits in one integer key (wider blocks find their
#: patterns with numpy, :func:`emdask.families._kernels._numpy_patterns`).
MAX_KEY_FEATURES = 62
#: Up to this many features, patterns are found through a table indexed by the key;
#: wider rows sort their keys instead.
TABLE_FEATURES = 16
#: Rows are taken in pattern order when their patterns' tables exceed this many bytes.
SORT_TABLE_BYTES = 1 << 20

#: A block: ``data`` the rows (n, d), or their transpose (d, n) when ``column_major``
#: (C-ordered float64, NaN for a missing cell); row ``weights`` (n,), read when
#: ``weighted`` (else of length 0).
Block = namedtuple("Block", ["data", "column_major", "weights", "weighted"])

#: The components (all float64, C-ordered): ``means`` (k, d); ``chol`` (k, d, d) the
#: upper-triangular ``U_j`` with precision ``P_j = U_j U_jᵀ``; ``precision`` (k, d, d);
#: ``const`` (k,) ``log w_j + log det U_j - d/2 log 2π``.
Model = namedtuple("Model", ["means", "chol", "precision", "const"])

#: The informative rows of a block and their missingness patterns (all int64 arrays).
#: ``rows``, ``pats``: each row's position in the block and its pattern rank; per pattern,
#: ``pat_m`` its missing count, ``col_off`` the offset of its missing columns (ascending)
#: in ``cols``, ``keys`` its missing columns as bits (bit l: column l; zero above
#: :data:`MAX_KEY_FEATURES` columns). Patterns are ranked by missing count, then by key, so
#: the complete pattern, if present, is rank 0.
Patterns = namedtuple("Patterns", ["rows", "pats", "pat_m", "col_off", "cols", "keys"])

#: Per pattern p and component j, the correction ``0.5 m log 2π - 0.5 log det P_mm`` at
#: ``table[off[p] + j]`` followed by the k inverses ``P_mm⁻¹`` (row-major) from
#: ``table[off[p] + k]``; only the patterns with ``compute[p]`` (bool) are computed, the
#: others are in ``table`` already.
Tables = namedtuple("Tables", ["table", "off", "compute"])

#: Statistics added to: ``nk`` (k,) summed responsibilities, ``s1`` (k, d) first moments
#: and ``lower`` (k, d, d) the lower triangles of the second moments about each
#: component's mean.
Moments = namedtuple("Moments", ["nk", "s1", "lower"])


def find_patterns(block, k, iwork):
    """The informative rows of a :class:`Block` (some cell observed, weight above zero) and
    their missingness patterns.

    Parameters
    ----------
    block : Block
        At most :data:`MAX_KEY_FEATURES` columns.
    k : int
        Number of components: when the patterns' tables (k of each) outgrow the core's
        cache (:data:`SORT_TABLE_BYTES`), the rows are taken in pattern order.
    iwork : ndarray (int64), at least ``5 n + 2^d`` long (``5 n + 1`` above
        :data:`TABLE_FEATURES` columns)
        Scratch space; the returned arrays of row length are views of it.

    Returns
    -------
    Patterns
    """
    n_in, rows_at, pats_at, n_pat, small = _find_patterns(block, k, iwork)
    small = np.frombuffer(small, dtype=np.int64)
    return Patterns(iwork[rows_at : rows_at + n_in], iwork[pats_at : pats_at + n_in],
                    small[:n_pat], small[n_pat : 2 * n_pat], small[3 * n_pat :],
                    small[2 * n_pat : 3 * n_pat])


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
        The rows to take and their missingness patterns.
    tables : Tables
        Where each pattern's tables are; those with ``compute`` are computed here.
    moments : Moments, added to
    chunk : int
        Rows per chunk.
    work : ndarray (float64)
        Scratch space kept by the caller between blocks (fresh allocations cost page
        faults at every block in Dask workers, whose allocator hands large blocks back to
        the system), at least :func:`work_size` long.

    Returns
    -------
    loglik, n_rows : float

    Raises
    ------
    ValueError
        If the precision of the missing cells of some pattern is not positive definite
        (nothing is added then).
    """
    result = _dense_block_stats(block, model, patterns, tables, moments, chunk, work)
    if result is None:
        raise ValueError(ILL_DEFINED)
    return result


def work_size(k, d, patterns, chunk):
    """Length of the float64 scratch space :func:`dense_block_stats` needs for ``k``
    components of ``d`` features, a block's :class:`Patterns` (at least one row) and chunks
    of ``chunk`` rows."""
    max_m = int(patterns.pat_m.max()) if patterns.pat_m.size else 0
    return _work_size(k, d, patterns.pat_m.size, max_m, min(chunk, patterns.rows.size))


def exp_nonpositive(q):
    """``q = exp(q)`` in place for a C-ordered float64 array of values ``<= 0`` (NaN-free),
    in steps the compiler vectorises; agrees with ``numpy.exp`` to a few units in the last
    place, arguments below -708 give 0."""
    _exp_nonpositive(q)
