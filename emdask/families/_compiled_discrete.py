"""Compiled E-step of categorical columns (needs numba: the ``fast`` extra).

One call per block does what :class:`emdask.families.discrete.CategoricalPart` does with a
one-hot indicator matrix and two matrix products per chunk: each cell's code picks its row of
the log-probability table, and the row's responsibilities are added to the same rows of the
counts. No indicator matrix is built, so the kernel reads each cell once instead of streaming
an (rows × slots) matrix through memory twice. The numpy steps are the reference the tests
compare this with. Importing this module raises ImportError when numba is not installed.
"""

from __future__ import annotations

import numpy as np

from ._codegen import prefer_wide_vectors

prefer_wide_vectors()  # before numba's first import

from numba import njit  # noqa: E402

from ._compiled_products import _FASTMATH, exp_nonpositive  # noqa: E402

_CHUNK = 256


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def categorical_block_stats(X, cols, offsets, n_levels, table, log_w, weights, use_weights,
                            expected, counts, nk):
    """E-step statistics of a block of categorical columns.

    Parameters
    ----------
    X : ndarray (n, n_features)
        Level codes ``0 .. n_levels - 1`` as floats in the columns ``cols``, NaN for a
        missing cell.
    cols, offsets, n_levels : ndarray (d,)
        The columns, the first slot of each in ``table`` and its number of levels (slot
        ``offsets + n_levels`` is the column's "missing" slot, log-probability 0).
    table : ndarray (n_slots, k)
        Log-probabilities of every level under every component.
    log_w : ndarray (k,)
    weights : ndarray (n,), read when ``use_weights``
    expected : bool
        Rows with no observed cell still add their responsibilities (``missing='expected'``).
    counts : ndarray (n_slots, k), added to
        Responsibility mass of every slot.
    nk : ndarray (k,), added to

    Returns
    -------
    loglik, n_rows : float
        Over the rows with an observed cell (weighted).
    bad_row : int
        -1, or the first row holding a cell that is not one of its column's codes (the
        statistics are then incomplete and must be discarded).
    """
    n = X.shape[0]
    d = cols.size
    k = table.shape[1]
    slots = np.empty((_CHUNK, d), dtype=np.int64)
    lp = np.empty((_CHUNK, k))
    top = np.empty(_CHUNK)
    informative = np.empty(_CHUNK, dtype=np.bool_)
    bits = np.empty(k * _CHUNK, dtype=np.int64)
    r = np.empty(k)
    loglik = 0.0
    n_rows = 0.0
    for start in range(0, n, _CHUNK):
        nb = min(_CHUNK, n - start)
        for i in range(nb):
            seen = False
            for c in range(d):
                x = X[start + i, cols[c]]
                if x == x:
                    code = np.int64(x) if abs(x) < 2.0**62 else -1
                    if code < 0 or code >= n_levels[c] or code != x:
                        return loglik, n_rows, start + i
                    slots[i, c] = offsets[c] + code
                    seen = True
                else:
                    slots[i, c] = offsets[c] + n_levels[c]
            informative[i] = seen
            t = -np.inf
            for j in range(k):
                acc = log_w[j]
                for c in range(d):
                    acc += table[slots[i, c], j]
                lp[i, j] = acc
                t = max(t, acc)
            t = t if t > -np.inf else 0.0
            top[i] = t
            for j in range(k):
                lp[i, j] -= t
        e = lp[:nb]
        exp_nonpositive(e, bits)
        for i in range(nb):
            total = 0.0
            for j in range(k):
                total += e[i, j]
            w = weights[start + i] if use_weights else 1.0
            rw = w if informative[i] else 0.0
            if rw > 0.0:
                loglik += rw * (np.log(total) + top[i])
                n_rows += rw
            scale = (w if expected else rw) / total
            if scale == 0.0:
                continue
            for j in range(k):
                r[j] = e[i, j] * scale
                nk[j] += r[j]
            for c in range(d):
                s = slots[i, c]
                for j in range(k):
                    counts[s, j] += r[j]
    return loglik, n_rows, -1
