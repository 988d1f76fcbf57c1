"""GaussianMixture speed: emdask on a local Dask cluster against scikit-learn, same run.

Model: n x 16 (default n = 1,000,000), 8 components, full covariance, 10 EM iterations with
tol=0, both started from the same weights_init / means_init / precisions_init.

* emdask runs on a ``distributed.LocalCluster`` of 2 single-threaded worker processes
  (127.0.0.1). The table is generated on the workers, partition by partition (default 8
  partitions of 16 MiB, the block size emdask cuts an in-memory table into), so the client
  never holds it; emdask persists it there once.
* scikit-learn's GaussianMixture runs in a child process on the same machine (BLAS on all
  cores), on the same table built from the same partitions.

What is timed
-------------
* "EM time": the 10 iterations only (E-step over all rows, reduction, M-step). For emdask the
  sum of the per-iteration wall times its driver reports (each from the start of the pass to
  the end of the M-step); for scikit-learn the sum of the per-iteration time lapses it prints
  with ``verbose=2``, except that its first lapse also covers its initialisation from the
  given parameters, so iteration 1 of both is replaced by the median of iterations 2..10.
* "fit() time": the whole ``fit`` call: for emdask also the pass that summarises and checks
  the table (the table is already on the workers: generating it is not timed); for
  scikit-learn also its input checks, initialisation and its final E-step.
* The dense matrix-multiply rate: best of 5 products of two 2000 x 2000 float64 matrices
  with all cores, in this process, in the same run. The fit's rate counts 4 n k d² floating
  point operations per iteration (the two d x d products per row and component).
* Memory: peak resident set size of the client process and of each worker, sampled every
  20 ms in a thread; for a worker also the rise above its resident size before the table was
  generated, during the fit and including the (untimed) generation, against the bytes of
  the table it holds.
* With --missing-rate (default 0.2): the same model on the same table with that fraction of
  cells missing completely at random, time per iteration against the complete table. The
  two fits (--missing-iterations each) take turns, --missing-rounds times, so that a slow
  spell of a shared machine falls on both; the figure is the median iteration of each
  (iteration 1, which finds the table's missingness patterns, left out), and the ratio of
  every round is printed beside it.

Usage:  python benchmarks/gmm_vs_sklearn.py [--rows 1000000] [--features 16] [--components 8]
        [--iterations 10] [--partitions 8] [--missing-rate 0.2] [--missing-iterations 5]
        [--missing-rounds 3] [--no-sklearn]
        EMDASK_COMPILED=0 in the environment times the plain numpy steps (without the C kernel).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from contextlib import redirect_stdout

import numpy as np

SEED = 20240


# --------------------------------------------------------------------------------------
# The table and the starting point (identical wherever they are built)
# --------------------------------------------------------------------------------------


def truth(d, k):
    rng = np.random.default_rng(SEED)
    means = rng.normal(0.0, 3.0, (k, d))
    covs = []
    for _ in range(k):
        A = rng.normal(size=(d, d)) / np.sqrt(d)
        covs.append(A @ A.T + 0.3 * np.eye(d))
    weights = rng.dirichlet(np.full(k, 5.0))
    return weights, means, np.stack(covs)


def start(d, k):
    """Starting parameters: the truth moved a little (the same for both libraries)."""
    weights, means, covs = truth(d, k)
    rng = np.random.default_rng(SEED + 1)
    means0 = means + rng.normal(0.0, 0.5, means.shape)
    covs0 = covs * 1.5 + 0.1 * np.eye(d)
    return np.full(k, 1.0 / k), means0, np.linalg.inv(covs0)


def bounds(n_rows, partitions):
    return np.linspace(0, n_rows, partitions + 1).astype(int)


def make_block(index, n_rows, partitions, d, k, missing_rate=0.0):
    """Rows of partition ``index``, drawn from a seed tied to the partition."""
    edges = bounds(n_rows, partitions)
    size = int(edges[index + 1] - edges[index])
    weights, means, covs = truth(d, k)
    rng = np.random.default_rng([SEED, index])
    labels = rng.choice(k, size, p=weights)
    X = rng.standard_normal((size, d))
    out = np.empty((size, d))
    for j in range(k):
        sel = labels == j
        out[sel] = means[j] + X[sel] @ np.linalg.cholesky(covs[j]).T
    if missing_rate:
        mask = np.random.default_rng([SEED, index, 1]).random(out.shape) < missing_rate
        mask[mask.all(axis=1), 0] = False
        out[mask] = np.nan
    return out


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def matmul_rate(n=2000, repeats=5, threads=None):
    """Floating-point operations per second of an n x n float64 product (all cores, or
    ``threads``)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    A, B = rng.random((n, n)), rng.random((n, n))
    with threadpool_limits(threads):
        A @ B
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            A @ B
            best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def kernel_rate(args, repeats=5):
    """The E-step of one partition in this process on one core (no Dask): best of
    ``repeats``, in counted floating-point operations per second."""
    from threadpoolctl import threadpool_limits

    from emdask.families.gaussian import GaussianFamily

    d, k = args.features, args.components
    X = make_block(0, args.rows, args.partitions, d, k)
    family = GaussianFamily(k, "full")
    weights, means, precisions = start(d, k)
    params = family.make_params(weights, means, np.linalg.inv(precisions))
    with threadpool_limits(1):
        family.partial_stats(X, params)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            family.partial_stats(X, params)
            best = min(best, time.perf_counter() - t)
    return 4.0 * X.shape[0] * k * d * d / best, X.shape[0]


class PeakRSS:
    """Peak resident set size of this process, sampled in a thread."""

    def __init__(self, interval=0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self.baseline = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def reset(self):
        self.baseline = self.peak = self.process.memory_info().rss

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak


def _worker_start_sampler(dask_worker=None):
    dask_worker._bench_rss = PeakRSS()
    return dask_worker._bench_rss.baseline


def _worker_held(keys, dask_worker=None):
    """Bytes of the table this worker holds; starts the fit's own peak from here."""
    held = 0
    for key in keys:
        task = dask_worker.state.tasks.get(key)
        if task is not None and task.state == "memory":
            held += task.nbytes or 0
    sampler = dask_worker._bench_rss
    sampler.before_fit = sampler.process.memory_info().rss
    sampler.peak_before_fit, sampler.peak = sampler.peak, sampler.before_fit
    return held


def _worker_peak(dask_worker=None):
    sampler = dask_worker._bench_rss
    return {
        "peak": max(sampler.peak, sampler.peak_before_fit),
        "fit_peak": sampler.peak,
        "baseline": sampler.baseline,
        "before_fit": sampler.before_fit,
    }


def _worker_warm_up(d, k):
    """Import the kernels and run them once on every path (complete rows, missing cells,
    row weights), so that the timed iterations do not include it."""
    from emdask.families import _kernels
    from emdask.families.gaussian import GaussianFamily

    family = GaussianFamily(k, "full")
    weights, means, precisions = start(d, k)
    params = family.make_params(weights, means, np.linalg.inv(precisions))
    X = make_block(0, 4000, 1, d, k, missing_rate=0.2)
    family.partial_stats(X[:2000], params)
    family.partial_stats(X[:2000], params, np.ones(2000))
    family.partial_stats(np.nan_to_num(X[:2000]), params)
    family.partial_stats(X[:2000], params)
    compiled = _kernels._compiled_kernels()
    if compiled is None:
        return None
    from emdask.families import _cgaussian

    return _cgaussian.versions()[0]  # the version in use: the widest this CPU runs


def _mb(x):
    return x / 2**20


# --------------------------------------------------------------------------------------
# emdask
# --------------------------------------------------------------------------------------


def emdask_fit(client, args, missing_rate, iterations, measure=None, rows=None):
    import dask
    import dask.array as da

    from emdask import GaussianMixture

    d, k, parts = args.features, args.components, args.partitions
    n = rows or args.rows
    edges = bounds(n, parts)
    blocks = [
        da.from_delayed(
            dask.delayed(make_block)(i, n, parts, d, k, missing_rate),
            shape=(int(edges[i + 1] - edges[i]), d),
            dtype=np.float64,
        )
        for i in range(parts)
    ]
    X = da.concatenate(blocks, axis=0)
    X = client.persist(X)  # generated on the workers; not timed
    from distributed import wait

    wait(X)
    held = None
    if measure is not None:
        held = client.run(_worker_held, [b.key for b in X.to_delayed().ravel()])
    weights0, means0, precisions0 = start(d, k)
    seconds = []
    gm = GaussianMixture(
        k, covariance_type="full", max_iter=iterations, tol=0.0,
        weights_init=weights0, means_init=means0, precisions_init=precisions0,
    )
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X, callbacks=[lambda info: seconds.append(info.seconds)])
    fit_time = time.perf_counter() - t
    report = None
    if measure is not None:
        report = client.run(measure)
        for address in report:
            report[address]["held"] = held[address]
    client.cancel(X)
    del X
    return gm, np.array(seconds), fit_time, report


# --------------------------------------------------------------------------------------
# scikit-learn (child process)
# --------------------------------------------------------------------------------------


def sklearn_child(argv):
    """Run scikit-learn's fit on the whole table; print a JSON line."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    n, d, k, parts, iterations = (int(a) for a in argv)
    X = np.vstack([make_block(i, n, parts, d, k) for i in range(parts)])
    weights0, means0, precisions0 = start(d, k)
    sk = SkGaussianMixture(
        k, covariance_type="full", max_iter=iterations, tol=0.0, init_params="random_from_data",
        weights_init=weights0, means_init=means0, precisions_init=precisions0,
        verbose=2, verbose_interval=1,
    )
    out = io.StringIO()
    t = time.perf_counter()
    with warnings.catch_warnings(), redirect_stdout(out):
        warnings.simplefilter("ignore")
        sk.fit(X)
    fit_time = time.perf_counter() - t
    lapses = [float(x) for x in re.findall(r"Iteration \d+\s+time lapse ([0-9.]+)s", out.getvalue())]
    print(json.dumps({
        "fit_time": fit_time,
        "lapses": lapses,
        "means": sk.means_.tolist(),
        "weights": sk.weights_.tolist(),
        "lower_bound": sk.lower_bound_,
    }))


def run_sklearn(args):
    cmd = [sys.executable, __file__, "--sklearn-child", str(args.rows), str(args.features),
           str(args.components), str(args.partitions), str(args.iterations)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def em_time(per_iteration):
    """Sum of the iterations, iteration 1 counted as the median of the others."""
    per_iteration = np.asarray(per_iteration, dtype=float)
    if per_iteration.size < 2:
        return float(per_iteration.sum())
    return float(np.median(per_iteration[1:]) + per_iteration[1:].sum())


# --------------------------------------------------------------------------------------


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--sklearn-child":
        sklearn_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--missing-rate", type=float, default=0.2)
    parser.add_argument("--missing-iterations", type=int, default=5)
    parser.add_argument("--missing-rounds", type=int, default=3)
    parser.add_argument("--no-sklearn", action="store_true")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    n, d, k, iters = args.rows, args.features, args.components, args.iterations
    print(f"# GaussianMixture {n:,} x {d}, {k} components, full covariance, {iters} EM "
          f"iterations, tol=0, same start; {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    rate = matmul_rate()
    rate1 = matmul_rate(threads=1)
    print(f"dense matmul (2000x2000 float64): {rate / 1e9:.1f} GFLOP/s all cores, "
          f"{rate1 / 1e9:.1f} GFLOP/s one core")
    k_rate, k_rows = kernel_rate(args)
    print(f"E-step kernel alone (one partition of {k_rows:,} rows, one core, no Dask): "
          f"{k_rate / 1e9:.1f} GFLOP/s = {100 * k_rate / rate1:.0f}% of the one-core matmul rate")

    client_rss = PeakRSS()
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster, Client(cluster) as client:
        versions = set(client.run(_worker_warm_up, d, k).values())
        compiled = None if None in versions else ", ".join(sorted(versions))
        client.run(_worker_start_sampler)
        client_rss.reset()
        gm, seconds, fit_time, workers = emdask_fit(client, args, 0.0, iters, _worker_peak)
        missing = None
        if args.missing_rate > 0 and args.missing_iterations > 1:
            missing = []  # (complete, missing) seconds per iteration, round by round
            for _ in range(max(1, args.missing_rounds)):
                _, sec_c, _, _ = emdask_fit(client, args, 0.0, args.missing_iterations)
                _, sec_m, _, _ = emdask_fit(
                    client, args, args.missing_rate, args.missing_iterations
                )
                missing.append((sec_c[1:], sec_m[1:]))
        _, sec_o, _, _ = emdask_fit(client, args, 0.0, iters, rows=100 * args.partitions)
    client_peak = client_rss.stop()

    print("emdask seconds per iteration:", " ".join(f"{x:.3f}" for x in seconds))
    t_em = em_time(seconds)
    flops = 4.0 * n * k * d * d * iters
    print(f"kernel steps: {f'compiled (C, {compiled} version)' if compiled else 'numpy'}")
    print(f"emdask  (2 workers x 1 thread): EM time {t_em:7.2f} s  "
          f"({t_em / iters:.3f} s/iteration), fit() {fit_time:7.2f} s")
    print(f"emdask  rate: {flops / t_em / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / t_em / rate:.0f}% of the dense matmul rate (all cores)")
    overhead = em_time(sec_o) / len(sec_o)
    print(f"engine overhead: {overhead:.3f} s/iteration for the same fit on "
          f"{100 * args.partitions:,} rows in the same {args.partitions} partitions "
          f"({100 * overhead * iters / t_em:.0f}% of the EM time above)")

    if not args.no_sklearn:
        sk = run_sklearn(args)
        t_sk = em_time(sk["lapses"])
        print(f"sklearn (1 process, BLAS on all cores): EM time {t_sk:7.2f} s  "
              f"({t_sk / iters:.3f} s/iteration), fit() {sk['fit_time']:7.2f} s")
        print(f"speed-up sklearn/emdask: EM time {t_sk / t_em:.1f}x, fit() "
              f"{sk['fit_time'] / fit_time:.1f}x")
        ours = gm.means_
        ref = np.array(sk["means"])
        print(f"agreement: max |means difference| / max |means| = "
              f"{np.max(np.abs(ours - ref)) / np.max(np.abs(ref)):.1e}, "
              f"lower bounds {gm.lower_bound_:.10f} vs {sk['lower_bound']:.10f}")

    table = n * d * 8
    print(f"memory: client peak RSS {_mb(client_peak):.0f} MiB (rise {_mb(client_peak - client_rss.baseline):.0f} MiB; "
          f"table {_mb(table):.0f} MiB, never on the client)")
    for address, w in sorted(workers.items()):
        rise = w["peak"] - w["baseline"]
        during = w["fit_peak"] - w["baseline"]
        print(f"memory: worker {address}: {_mb(w['held']):.0f} MiB of table held; peak RSS "
              f"{_mb(w['peak']):.0f} MiB; above its size before the table: "
              f"{_mb(during):.0f} MiB during the fit = {during / max(w['held'], 1):.2f}x the "
              f"table held, {_mb(rise):.0f} MiB including generating the table = "
              f"{rise / max(w['held'], 1):.2f}x")
    if missing is not None:
        per_c = float(np.median(np.concatenate([c for c, _ in missing])))
        per_m = float(np.median(np.concatenate([m for _, m in missing])))
        rounds = " ".join(f"{np.median(m) / np.median(c):.2f}x" for c, m in missing)
        print(f"missing cells: {100 * args.missing_rate:.0f}% MCAR: {per_m:.3f} s/iteration vs "
              f"{per_c:.3f} s/iteration complete = {per_m / per_c:.2f}x (median iterations "
              f"of {len(missing)} rounds taken in turn; each round: {rounds})")


if __name__ == "__main__":
    main()
