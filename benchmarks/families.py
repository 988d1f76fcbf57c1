"""Speed of the discrete and mixed-type families: a local cluster against one process.

Two tables, generated partition by partition on the workers (the client never holds them):

* a survey: 5,000,000 rows x 10 categorical columns (pandas ``category``, 5 levels, drawn from
  6 latent classes), fitted with ``CategoricalMixture(n_components=6)``;
* a customer table: 2,000,000 rows of spend and tenure (Gaussian), orders and returns (counts),
  region and channel (categorical), member and newsletter (binary), about 3% of cells missing,
  fitted with ``MixedMixture(n_components=4)``.

Each is fitted on a ``LocalCluster`` of two single-threaded worker processes. Between two
cluster iterations (the cluster idle), the same iteration is timed in this process: the
family's ``partial_stats`` and ``m_step`` over the whole table in memory, one BLAS thread,
with the same kernels as the workers (compiled, unless EMDASK_COMPILED=0) — the scaling
ratio — and again with the pure-numpy steps. Interleaving puts them all under the same load
from whatever else runs on the machine. Reported: EM iterations as rows per second (median over the iterations)
and the ratio cluster / single process, all measured in the same run.

The wall-clock ratio is what the machine gave; on a machine shared with other work it
measures the load as much as the code. The CPU-time ratio resists the load: the reference's CPU
seconds per iteration over the cluster's critical path, the busiest worker's CPU seconds plus
those of this process (client and scheduler) during the iteration. It counts the cluster's
background work (heartbeats and monitors, about 2% of a core per process) over the whole,
load-stretched iteration, so on a busy machine it errs low. The one-time passes of a fit (level
scan, conversion and summary, starting sample) are printed apart.

Usage:  python benchmarks/families.py [--rows 1.0] [--iters 5]
        (--rows scales both tables: 0.2 gives 1,000,000 and 400,000 rows)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import pandas as pd

from emdask.families import _kernels

SURVEY_ROWS = 5_000_000
CUSTOMER_ROWS = 2_000_000
ROWS_PER_PARTITION = 250_000
LEVELS = list("abcde")
REGIONS = ["north", "south", "east", "west", "centre", "islands"]
CHANNELS = ["web", "store", "app"]


# --------------------------------------------------------------------------------------
# Data, one partition at a time
# --------------------------------------------------------------------------------------


def survey_partition(i, rows, seed=0):
    """One partition of the survey: 10 answers with 5 levels from 6 latent classes."""
    classes = np.random.default_rng(seed).dirichlet(np.full(5, 0.5), size=(6, 10))
    cdf = np.cumsum(classes, axis=2)
    rng = np.random.default_rng([seed, i])
    z = rng.integers(0, 6, rows)
    u = rng.random((rows, 10, 1))
    codes = np.minimum((u > cdf[z]).sum(axis=2), 4)
    return pd.DataFrame(
        {f"q{j}": pd.Categorical.from_codes(codes[:, j], categories=LEVELS) for j in range(10)}
    )


def customer_partition(i, rows, seed=0):
    """One partition of the customer table: four segments, mixed column types."""
    rng = np.random.default_rng([seed, 1, i])
    z = rng.integers(0, 4, rows)
    spend = rng.normal(np.array([2.0, 3.5, 5.0, 3.0])[z], 0.6)
    tenure = rng.normal(np.array([1.0, 4.0, 8.0, 2.0])[z], 1.5)
    orders = rng.poisson(np.array([1.0, 3.0, 9.0, 2.0])[z])
    returns = rng.poisson(np.array([0.1, 0.4, 1.0, 1.5])[z])
    region = rng.choice(6, rows, p=[0.3, 0.25, 0.15, 0.15, 0.1, 0.05])
    channel = np.where(rng.random(rows) < np.array([0.7, 0.4, 0.2, 0.5])[z], 0, rng.integers(1, 3, rows))
    member = rng.random(rows) < np.array([0.1, 0.4, 0.9, 0.3])[z]
    newsletter = rng.random(rows) < np.array([0.2, 0.5, 0.6, 0.1])[z]
    lost = rng.random((rows, 4)) < 0.03
    df = pd.DataFrame(
        {
            "spend": np.where(lost[:, 0], np.nan, spend),
            "tenure": np.where(lost[:, 1], np.nan, tenure),
            "orders": pd.array(orders, dtype="Int64"),
            "returns": returns,
            "region": pd.Categorical.from_codes(np.where(lost[:, 2], -1, region), categories=REGIONS),
            "channel": pd.Categorical.from_codes(channel, categories=CHANNELS),
            "member": pd.array(member, dtype="boolean"),
            "newsletter": newsletter,
        }
    )
    df.loc[lost[:, 3], "orders"] = pd.NA
    return df


def partition_sizes(n):
    parts = max(2, -(-n // ROWS_PER_PARTITION))
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def lazy_table(make, n):
    import dask.dataframe as dd

    sizes = partition_sizes(n)
    return dd.from_map(make, range(len(sizes)), sizes, meta=make(0, 1).iloc[:0])


def local_table(make, n):
    sizes = partition_sizes(n)
    return [make(i, rows) for i, rows in enumerate(sizes)]


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _cpu(process):
    t = process.cpu_times()
    return t.user + t.system


class Interleaved:
    """Fit callback: after each cluster iteration, time the same iteration on the reference
    path in this process (the cluster is idle meanwhile), so that both see the same load
    from anything else running on the machine.

    It also records CPU seconds: of each worker process and of this process (which hosts the
    scheduler) during every cluster iteration after the first, and of the reference
    computation. They give the load-free estimate printed next to the wall-clock ratio.
    """

    def __init__(self, estimator, make, n, worker_pids):
        import psutil

        self.estimator, self.make, self.n = estimator, make, n
        self.workers = [psutil.Process(pid) for pid in worker_pids]
        self.me = psutil.Process()
        self.cluster, self.single = [], []
        self.cluster_cpu, self.single_cpu = [], []
        self.numpy = []  # the pure-numpy steps (no compiled kernels), same process
        self.X = None
        self.mark = None

    def _snapshot(self):
        return [_cpu(w) for w in self.workers], _cpu(self.me)

    def __call__(self, info):
        from threadpoolctl import threadpool_limits

        now = self._snapshot()
        self.cluster.append(info.seconds)
        if self.mark is not None:
            workers = [b - a for a, b in zip(self.mark[0], now[0])]
            self.cluster_cpu.append(max(workers) + (now[1] - self.mark[1]))
        est = self.estimator
        if self.X is None:  # the reference's copy of the table, encoded as the fit encodes it
            encoder = est._encoder()
            self.X = np.vstack([encoder.transform_block(p) for p in local_table(self.make, self.n)])
        family = est._make_family()
        with threadpool_limits(1):
            start, cpu = time.perf_counter(), time.process_time()
            family.m_step(family.partial_stats(self.X, info.params), info.params)
            self.single.append(time.perf_counter() - start)
            self.single_cpu.append(time.process_time() - cpu)
            compiled, _kernels.use_compiled = _kernels.use_compiled, False
            try:
                start = time.perf_counter()
                family.m_step(family.partial_stats(self.X, info.params), info.params)
                self.numpy.append(time.perf_counter() - start)
            finally:
                _kernels.use_compiled = compiled
        self.mark = self._snapshot()


def report(name, shape, estimator, make, n, iters):
    """Fit on a LocalCluster of two single-threaded worker processes, timing the reference
    path between its iterations; print one line."""
    import os

    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        timer = Interleaved(estimator, make, n, client.run(os.getpid).values())
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator.fit(lazy_table(make, n), callbacks=[timer])
        total = time.perf_counter() - start
    one_time = total - sum(timer.cluster) - sum(timer.single) - sum(timer.numpy)
    numpy_rate = n / statistics.median(timer.numpy)
    cluster_rate = n / statistics.median(timer.cluster)
    single_rate = n / statistics.median(timer.single)
    cpu_ratio = statistics.median(timer.single_cpu) / statistics.median(timer.cluster_cpu)
    print(
        f"{name:<12} {n:>11,} rows {shape:<27} cluster {cluster_rate / 1e6:5.2f}M rows/s   "
        f"single process {single_rate / 1e6:5.2f}M rows/s   ratio {cluster_rate / single_rate:4.2f}x"
        f" wall, {cpu_ratio:4.2f}x CPU-time   (median of {iters} iterations; one-time passes "
        f"{one_time:5.1f}s incl. building the reference copy)",
        flush=True,
    )
    print(
        f"{'':<12} pure-numpy steps in one process {numpy_rate / 1e6:5.2f}M rows/s: cluster "
        f"{cluster_rate / numpy_rate:4.2f}x that, the same kernels in one process "
        f"{single_rate / numpy_rate:4.2f}x",
        flush=True,
    )
    return cluster_rate / single_rate, cpu_ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, default=1.0,
                        help="scale of both tables (1.0: 5,000,000 and 2,000,000 rows)")
    parser.add_argument("--iters", type=int, default=5, help="EM iterations timed")
    args = parser.parse_args(argv)

    from emdask import CategoricalMixture, MixedMixture

    print(
        "# EM iterations: LocalCluster (2 workers x 1 thread) vs one process running the same "
        f"kernels ({'compiled' if _kernels._compiled_kernels() else 'numpy'}; 1 BLAS thread), "
        "same run; target ratio >= 1.7x on 2 cores; the pure-numpy steps timed too",
        flush=True,
    )
    n_survey = int(SURVEY_ROWS * args.rows)
    n_customer = int(CUSTOMER_ROWS * args.rows)
    common = dict(tol=0.0, max_iter=args.iters, random_state=0)
    report(
        "categorical", "x 10 cat. (5 levels), k=6",
        CategoricalMixture(6, **common), survey_partition, n_survey, args.iters,
    )
    report(
        "mixed", "x 8 mixed cols, k=4",
        MixedMixture(4, **common), customer_partition, n_customer, args.iters,
    )


if __name__ == "__main__":
    main()
