"""Random numbers tied to a row's position in the table, not to its partition.

A row's draws depend only on the seed, a stream number and the row's global position, so
sampling, k-means|| seeding and bootstrap weights give the same result however the table is
partitioned and whichever worker runs a block. The generator is SplitMix64 used as a
counter-based hash (fast, vectorized, statistically sound for this purpose).
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_uniforms", "row_poisson1"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _stream_key(seed, stream):
    s = np.array([int(seed) % 2**64, int(stream) % 2**64], dtype=np.uint64)
    return _mix(_mix(s[0:1] + _GOLDEN) ^ (s[1:2] * _GOLDEN))[0]


def row_uniforms(seed, stream, start, n):
    """Uniform [0, 1) draws for rows ``start, ..., start + n - 1``.

    Parameters
    ----------
    seed, stream : int
        The draw depends on both; use one stream per purpose.
    start : int
        Global position of the block's first row.
    n : int
    """
    with np.errstate(over="ignore"):
        counters = np.arange(start, start + n, dtype=np.uint64)
        z = _mix((counters + np.uint64(1)) * _GOLDEN + _stream_key(seed, stream))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def row_poisson1(seed, stream, start, n):
    """Poisson(1) draws (bootstrap weights) for rows ``start, ..., start + n - 1``, by
    inversion of the uniform draw."""
    u = row_uniforms(seed, stream, start, n)
    k = np.arange(20)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 20)))])
    cdf = np.cumsum(np.exp(-1.0 - log_fact))
    return np.searchsorted(cdf, u, side="right").astype(np.float64).clip(max=k[-1])
