"""Random numbers tied to a row's position in the table, not to its partition.

Every random draw of emdask comes from a **named stream** of :data:`STREAMS`. A draw made for
a row depends only on the seed, the stream (and, for an indexed stream, its index: the
k-means|| round, the imputation number), the row's global position and, for rows that need
several draws, the slot (a component, a cell). So sampling, k-means|| seeding, random
starts, bootstrap weights and multiple imputations give the same result however the table is
partitioned and whichever worker runs a block. The generator is SplitMix64 used as a
counter-based hash (fast, vectorized, statistically sound for this purpose).

Draws made once on the client from numbers that do not depend on the partitioning (the
seeding of k-means++ on a sample, the replicate seeds) use a numpy ``Generator`` seeded by
``(seed, stream number)``: :func:`stream_rng`.

=====================  ====================================================================
stream                 draws
=====================  ====================================================================
``sample``             a uniform key per row: the uniform row sample (k-means|| first
                       centre, ``'random_from_data'``, ``'k-means++'`` and discrete starts)
``kmeans_round``       a uniform key per row and k-means|| round (index: the round)
``bootstrap``          a Poisson(1) weight per row (bootstrap replicates)
``init_random``        k uniforms per row: the random responsibilities of ``init='random'``
``imputation``         per row, a uniform for its component and one per cell (index: the
                       imputation number): the draws of ``sample_imputations``
``kmeans_recluster``   client: weighted k-means++ on the k-means|| candidates
``kmeans_plusplus``    client: k-means++ on the sample (Gaussian ``'k-means++'``)
``table_init``         client: starts of the discrete and mixed-type mixtures
``bootstrap_seeds``    client: the seeds of the bootstrap replicates of ``sample_imputations``
=====================  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

__all__ = [
    "STREAMS",
    "Stream",
    "row_uniforms",
    "row_poisson1",
    "row_draws",
    "stream_rng",
    "stream_seeds",
]


@dataclass(frozen=True)
class Stream:
    """A named source of random numbers owning the stream numbers
    ``number, ..., number + count - 1`` (one per index)."""

    name: str
    number: int
    count: int = 1

    def number_of(self, index=0):
        index = int(index)
        if not 0 <= index < self.count:
            raise ValueError(
                f"index {index} of random stream {self.name!r} must be in [0, {self.count})"
            )
        return self.number + index


def _registry(*streams):
    spans = sorted((s.number, s.number + s.count, s.name) for s in streams)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise RuntimeError(f"random streams {a!r} and {b!r} share stream numbers")
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise RuntimeError(f"a random stream is named twice: {names}")
    return MappingProxyType({s.name: s for s in streams})


#: Every random stream of emdask, by name. The numbers are part of the results: changing one
#: changes every model drawn from it.
STREAMS = _registry(
    Stream("sample", 0),
    Stream("kmeans_round", 1, count=1024),
    Stream("bootstrap_seeds", 0x1A7E),
    Stream("table_init", 0x5EED),
    Stream("kmeans_plusplus", 0x9A55),
    Stream("bootstrap", 0xB007),
    Stream("init_random", 0xA11CE),
    Stream("kmeans_recluster", 0xC0FFEE),
    Stream("imputation", 2**32, count=2**32),
)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _stream_key(seed, number):
    s = np.array([int(seed) % 2**64, int(number) % 2**64], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(_mix(s[0:1] + _GOLDEN) ^ (s[1:2] * _GOLDEN))[0]


def _number(name, index):
    try:
        stream = STREAMS[name]
    except KeyError:
        raise ValueError(f"no random stream named {name!r}; streams: {list(STREAMS)}") from None
    return stream.number_of(index)


def _uniforms_at(key, counters):
    with np.errstate(over="ignore"):
        z = _mix((counters + np.uint64(1)) * _GOLDEN + key)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def row_uniforms(seed, name, start, n, *, width=None, index=0):
    """Uniform [0, 1) draws for rows ``start, ..., start + n - 1`` of the table.

    Parameters
    ----------
    seed : int
    name : str
        The stream (a key of :data:`STREAMS`); one per purpose.
    start : int
        Global position of the block's first row.
    n : int
    width : int, optional
        Draws per row: the result has shape ``(n, width)``, draw ``s`` of row ``r`` at the
        counter ``r * width + s``. Default: one per row, shape ``(n,)``.
    index : int
        The sub-stream of an indexed stream (k-means|| round, imputation number).
    """
    key = _stream_key(seed, _number(name, index))
    w = 1 if width is None else int(width)
    counters = np.arange(int(start) * w, (int(start) + int(n)) * w, dtype=np.uint64)
    u = _uniforms_at(key, counters)
    return u if width is None else u.reshape(int(n), w)


def row_draws(seed, name, start, width, *, index=0):
    """``uniforms(rows)``: the ``(len(rows), width)`` uniforms of block rows ``rows`` (a
    slice or positions within a block whose first row is at global position ``start``),
    equal to the matching rows of ``row_uniforms(seed, name, start, n, width=width)``.

    Lets a block kernel draw only for the rows it needs, in any order."""
    key = _stream_key(seed, _number(name, index))
    w = int(width)
    slots = np.arange(w, dtype=np.uint64)

    def uniforms(rows):
        if isinstance(rows, slice):
            rows = np.arange(rows.start or 0, rows.stop, rows.step or 1)
        glob = np.asarray(rows, dtype=np.uint64) + np.uint64(int(start))
        with np.errstate(over="ignore"):
            counters = glob[:, None] * np.uint64(w) + slots[None, :]
        return _uniforms_at(key, counters)

    return uniforms


def row_poisson1(seed, name, start, n, *, index=0):
    """Poisson(1) draws (bootstrap weights) for rows ``start, ..., start + n - 1``, by
    inversion of the uniform draw."""
    u = row_uniforms(seed, name, start, n, index=index)
    k = np.arange(20)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 20)))])
    cdf = np.cumsum(np.exp(-1.0 - log_fact))
    return np.searchsorted(cdf, u, side="right").astype(np.float64).clip(max=k[-1])


def stream_rng(seed, name, *more):
    """A numpy ``Generator`` for draws made on the client, seeded by ``(seed, stream number,
    *more)``."""
    return np.random.default_rng([int(seed), _number(name, 0), *(int(m) for m in more)])


def stream_seeds(seed, name, n):
    """``n`` integer seeds derived on the client from ``(seed, stream number)``."""
    entropy = [int(seed), _number(name, 0)]
    return [int(s) for s in np.random.SeedSequence(entropy).generate_state(n, np.uint64)]
