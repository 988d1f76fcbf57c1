"""Choosing the number of components: one shared search against ten separate fits.

A table of n x 12 (default 2,000,000 rows) drawn from a 6-component Gaussian mixture is
written as Parquet; both approaches read it back through dask with ``persist=False``, so
every pass over the data re-reads the Parquet files, as for a table larger than the
cluster's memory. Both run on the same local cluster of two single-threaded worker
processes, in the same run:

* shared:   ``emdask.select_components(GaussianMixture(), X, range(1, 11))``: all ten
            candidates start from one k-means|| run and iterate in the same passes;
* separate: ten ``GaussianMixture(k).fit(X)`` followed by ``.bic(X)`` (the criterion needs
            the log-likelihood at the final parameters: one more pass each).

Printed: passes over the data and seconds for each, the number of components each picks,
and the ratios. Target: the shared search reads the data at most as many times as the
longest single fit plus its initialisation passes, and is at least 3x faster.

Usage:  python benchmarks/selection.py [--rows 2000000] [--partitions 16] [--k-max 10]
"""

from __future__ import annotations

import os

# One BLAS thread per task: dask already runs one task per core (its workers set the same).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

D = 12
TRUE_K = 6


def mixture(n, rng):
    means = rng.normal(0, 1.5, (TRUE_K, D))
    weights = rng.dirichlet(np.full(TRUE_K, 4.0))
    counts = rng.multinomial(n, weights)
    parts = []
    for mean, m in zip(means, counts):
        A = rng.normal(size=(D, D)) / np.sqrt(D)
        parts.append(rng.multivariate_normal(mean, A @ A.T + 0.3 * np.eye(D), m))
    X = np.vstack(parts)
    return X[rng.permutation(n)]


def write_parquet(n, partitions, directory, seed=0):
    import dask.dataframe as dd
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(mixture(n, rng), columns=[f"x{j}" for j in range(D)])
    path = os.path.join(directory, "table.parquet")
    dd.from_pandas(frame, npartitions=partitions).to_parquet(path, write_index=False)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--k-max", type=int, default=10)
    parser.add_argument("--covariance-type", default="full")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    from emdask import ConvergenceWarning, GaussianMixture, select_components
    from emdask.engine.kmeans import kmeans_passes

    ks = range(1, args.k_max + 1)
    base = dict(covariance_type=args.covariance_type, random_state=0, persist=False)
    tmp = tempfile.mkdtemp(prefix="emdask-selection-")
    try:
        path = write_parquet(args.rows, args.partitions, tmp)
        with LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True,
            dashboard_address=None, host="127.0.0.1",
        ) as cluster, Client(cluster), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            X = dd.read_parquet(path)
            print(f"table: {args.rows:,} x {D} Parquet, {args.partitions} partitions, re-read "
                  f"every pass; {args.workers} single-threaded workers; "
                  f"covariance_type={args.covariance_type!r}; k in 1..{args.k_max}")

            start = time.perf_counter()
            result = select_components(GaussianMixture(**base), X, ks)
            shared_s = time.perf_counter() - start
            shared_passes = result.n_passes_

            start = time.perf_counter()
            separate, separate_passes, bics = [], 0, []
            for k in ks:
                gm = GaussianMixture(k, **base).fit(X)
                bics.append(gm.bic(X))  # one more pass
                separate.append(gm)
                separate_passes += gm.n_passes_ + 1
            separate_s = time.perf_counter() - start

        init = 1 + kmeans_passes(5, 2)  # summary + k-means|| and the initial assignment
        longest = max(gm.n_passes_ + 1 for gm in separate)
        sep_best = int(np.argmin(bics)) + 1
        print("iterations per k, shared:   ", list(result.table_["n_iter"]))
        print("iterations per k, separate: ", [gm.n_iter_ for gm in separate])
        print(f"shared search:  {shared_passes:4d} passes  {shared_s:8.1f} s  "
              f"BIC picks k={result.best_n_components_}")
        print(f"ten separate:   {separate_passes:4d} passes  {separate_s:8.1f} s  "
              f"BIC picks k={sep_best}")
        print(f"longest single fit (with its BIC pass): {longest} passes; its initialisation: "
              f"{init} passes; shared <= longest + initialisation: "
              f"{shared_passes <= longest + init}")
        print(f"passes ratio separate/shared: {separate_passes / shared_passes:.2f}x   "
              f"time ratio separate/shared: {separate_s / shared_s:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
