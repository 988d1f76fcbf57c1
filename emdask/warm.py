"""Compile the kernels once per installation, before any worker needs them.

The compiled kernels (numba) are compiled the first time a process calls them and kept in
numba's on-disk cache. Each kernel has one specialisation whatever the layout of the blocks it
receives, and it is compiled once per machine: a process that needs it while another one
compiles it waits and loads it from the cache (:func:`emdask.families._codegen.install_entries`).
A fit on an empty cache still spends the seconds of that compile in one worker, and a few
hundred MiB of compiler memory, enough to push a small worker past Dask's pause threshold
(80% of its memory limit). :func:`warm_kernels` compiles every kernel ahead of time, touching
every kind of block a fit hands it (row-major or column-major, writeable or read-only, with or
without row weights, complete rows, few or many missing cells) so that workers started
afterwards on the same installation only load them::

    python -m emdask.warm

``make install`` (and so ``make test`` and ``make demo``) and the container image run it.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

__all__ = ["warm_kernels"]


def _blocks(X):
    """The layouts a block reaches a kernel in: numpy's row-major blocks, pandas' and
    Parquet's column-major ones, and read-only views of both (arrays received from the
    network or memory-mapped)."""
    out = []
    for block in (np.ascontiguousarray(X), np.asfortranarray(X)):
        frozen = block.copy(order="K")
        frozen.setflags(write=False)
        out += [block, frozen]
    return out


def _touch(estimator, X, block=None):
    """Fit ``estimator`` briefly in this process, then run its E-step on every layout of
    ``block`` (the float block its family sees; ``X`` itself by default), with and without
    row weights."""
    import dask

    with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
        warnings.simplefilter("ignore")
        estimator.fit(X)
    family, params = estimator._make_family(), estimator._fitted_params()
    block = np.asarray(X if block is None else block, dtype=np.float64)
    weights = np.linspace(0.5, 1.5, block.shape[0])
    for layout in _blocks(block):
        for w in (None, weights):
            family.partial_stats(layout, params, w)


def warm_kernels(verbose: bool = False) -> bool:
    """Compile (or load from numba's cache) every compiled kernel for the blocks a fit
    hands it. Returns ``False`` when the compiled kernels are not in use (numba missing, or
    ``EMDASK_COMPILED=0``), ``True`` once they are ready."""
    from .families import _kernels

    compiled = _kernels._compiled_kernels()
    if compiled is None:
        return False
    from .estimators import GaussianMixture
    from .estimators.categorical import CategoricalMixture

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    n, d = 400, 5
    X = rng.normal(size=(n, d)) + np.repeat([[0.0], [4.0]], n // 2, axis=0)
    few = X.copy()  # a few missing cells: the whole-block path
    few[rng.random(n) < 0.2, 1] = np.nan
    many = X.copy()  # rows missing most of their cells: the pattern-sorted chunks
    lost = rng.random(n) < 0.5
    many[np.ix_(lost, [1, 2, 3])] = np.nan
    for covariance_type in ("full", "tied", "diag", "spherical"):
        for data in (X, few, many):
            _touch(GaussianMixture(2, covariance_type=covariance_type, max_iter=2,
                                   random_state=0), data)

    import pandas as pd

    codes = rng.integers(0, 3, size=(n, 3)).astype(np.float64)
    codes[rng.random(n) < 0.1, 0] = np.nan
    table = pd.DataFrame(codes, columns=["a", "b", "c"]).astype("Int64")
    for missing in ("marginalize", "expected"):
        _touch(CategoricalMixture(2, missing=missing, max_iter=2, random_state=0), table, codes)

    if verbose:
        print(f"emdask kernels ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return True


def compile_counts() -> dict[str, tuple[int, int]]:
    """``{kernel: (loaded from the cache, compiled here)}`` for this process, to check that
    a worker compiled nothing."""
    from numba.core.registry import CPUDispatcher

    from .families import _compiled, _compiled_discrete, _compiled_patterns, _compiled_products

    counts = {}
    for module in (_compiled_patterns, _compiled_products, _compiled, _compiled_discrete):
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
                stats = value.stats
                counts[f"{module.__name__}.{name}"] = (
                    sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    return counts


if __name__ == "__main__":
    warm_kernels(verbose=True)
