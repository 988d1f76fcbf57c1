"""Passes over the data to the optimum: plain EM against SQUAREM-accelerated EM, one run.

Plain EM is slow when components overlap (and when cells are missing): that is where the
cases are. Every case is fitted twice from the same starting point (same initialisation and
``random_state``; the script checks that both first passes evaluate the same
log-likelihood), with ``algorithm='squarem'`` then ``algorithm='em'``, on the same cluster of
2 single-threaded worker processes, with a tight ``tol`` and a cap on the passes. The best
log-likelihood is the larger of the two final ones; reported for each algorithm: the passes
over the data (every EM pass counts, rejected extrapolations included) and the EM wall time
(the driver's per-pass seconds, summed) until the recorded mean log-likelihood is within
``--gap`` (relative, default 1e-8) of the best, and the ratios plain / accelerated. Plain EM
stops once within ``--gap`` / 100 of the accelerated fit's final log-likelihood rather than
at its own ``tol``: by then its count is known, and going on could only raise the best, so
the target, so its count (the comparison errs in plain EM's favour). Pass counts are exact
and reproducible; wall times depend on what else the machine runs. Cases:

* ``gaussian``: GaussianMixture, k=8, full covariance, on ``--rows`` (default 1,000,000) x 16
  drawn from 8 overlapping components: means ~N(0, s²) per coordinate with
  s = ``--spread`` / sqrt(2 d), so two means are about ``--spread`` (default 2) apart, and
  random covariances A Aᵀ / (2 d) + I / 2 (A standard normal: variances about 1);
* ``gaussian-mcar``: the same table with 20% of the cells missing completely at random;
* ``mixed``: MixedMixture, k=4, on ``--mixed-rows`` (default 2,000,000) rows of a customer
  table (spend, tenure: Gaussian; orders, returns: counts; region, channel: categorical;
  member, newsletter: binary; 3% of four columns missing) whose four segments overlap (see
  ``customer_partition``);
* ``out-of-core``: GaussianMixture, k=4, full, on a Parquet table of ``--ooc-size`` (default
  8 GiB of float64 values) with 8 columns drawn like ``gaussian``'s (4 components, means
  ``--ooc-spread`` apart), written to a temporary directory (under ``--dir``) deleted at the
  end, re-read at every pass (``persist=False``) by workers limited to
  ``--ooc-worker-memory`` each (default 1.5 GiB, far below the table).

The table generation and a warm-up fit on a small part of each table (workers importing and
compiling their kernels) are never timed. Example::

    python benchmarks/acceleration.py
    python benchmarks/acceleration.py --rows 200000 --mixed-rows 400000 --ooc-size 1GiB
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

import dask
import dask.array as da
from dask.utils import format_bytes, parse_bytes

SEED = 1414
D = 16
OOC_COLUMNS = 8
FILE_BYTES = 32 * 2**20  # of values per Parquet file
REGIONS = ["north", "south", "east", "west", "centre", "islands"]
CHANNELS = ["web", "store", "app"]


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def truth(d, k, spread):
    """Weights, means and covariances of ``k`` overlapping components in ``d`` dimensions."""
    rng = np.random.default_rng([SEED, d, k])
    means = rng.normal(0.0, spread / np.sqrt(2 * d), (k, d))
    covs = []
    for _ in range(k):
        A = rng.normal(size=(d, d))
        covs.append(A @ A.T / (2 * d) + 0.5 * np.eye(d))
    weights = rng.dirichlet(np.full(k, 5.0))
    return weights, means, np.stack(covs)


def make_block(index, size, d, k, spread, missing_rate):
    weights, means, covs = truth(d, k, spread)
    rng = np.random.default_rng([SEED, d, k, index])
    labels = rng.choice(k, size, p=weights)
    X = rng.standard_normal((size, d))
    out = np.empty((size, d))
    for j in range(k):
        sel = labels == j
        out[sel] = means[j] + X[sel] @ np.linalg.cholesky(covs[j]).T
    if missing_rate:
        mask = rng.random(out.shape) < missing_rate
        mask[mask.all(axis=1), 0] = False
        out[mask] = np.nan
    return out


def gaussian_table(n, d, k, spread, missing_rate, partitions=8):
    edges = np.linspace(0, n, partitions + 1).astype(int)
    blocks = [
        da.from_delayed(
            dask.delayed(make_block)(i, int(b - a), d, k, spread, missing_rate),
            shape=(int(b - a), d),
            dtype=np.float64,
        )
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))
    ]
    return da.concatenate(blocks, axis=0)


def customer_partition(index, rows, separation):
    """Rows of a customer table from four segments: those of ``benchmarks/families.py``
    with wider Gaussian columns (standard deviations 1 and 2, not 0.6 and 1.5), so that
    they overlap, and their differences scaled by ``separation``."""
    rng = np.random.default_rng([SEED, 2, index])

    def pull(values):
        values = np.asarray(values, float)
        return values.mean() + separation * (values - values.mean())

    z = rng.choice(4, rows, p=[0.35, 0.3, 0.2, 0.15])
    spend = rng.normal(pull([2.0, 3.5, 5.0, 3.0])[z], 1.0)
    tenure = rng.normal(pull([1.0, 4.0, 8.0, 2.0])[z], 2.0)
    orders = rng.poisson(np.exp(pull(np.log([1.0, 3.0, 9.0, 2.0])))[z])
    returns = rng.poisson(np.exp(pull(np.log([0.1, 0.4, 1.0, 1.5])))[z])
    region = rng.choice(6, rows, p=[0.3, 0.25, 0.15, 0.15, 0.1, 0.05])
    channel = np.where(rng.random(rows) < pull([0.7, 0.4, 0.2, 0.5])[z], 0,
                       rng.integers(1, 3, rows))
    member = rng.random(rows) < pull([0.1, 0.4, 0.9, 0.3])[z]
    newsletter = rng.random(rows) < pull([0.2, 0.5, 0.6, 0.1])[z]
    lost = rng.random((rows, 4)) < 0.03
    df = pd.DataFrame(
        {
            "spend": np.where(lost[:, 0], np.nan, spend),
            "tenure": np.where(lost[:, 1], np.nan, tenure),
            "orders": pd.array(orders, dtype="Int64"),
            "returns": returns,
            "region": pd.Categorical.from_codes(np.where(lost[:, 2], -1, region),
                                                categories=REGIONS),
            "channel": pd.Categorical.from_codes(channel, categories=CHANNELS),
            "member": pd.array(member, dtype="boolean"),
            "newsletter": newsletter,
        }
    )
    df.loc[lost[:, 3], "orders"] = pd.NA
    return df


def customer_table(n, separation, rows_per_partition=250_000):
    import dask.dataframe as dd

    parts = max(2, -(-n // rows_per_partition))
    edges = np.linspace(0, n, parts + 1).astype(int)
    sizes = [int(b - a) for a, b in zip(edges[:-1], edges[1:])]
    meta = customer_partition(0, 1, separation).iloc[:0]
    return dd.from_map(customer_partition, range(parts), sizes, [separation] * parts,
                       meta=meta)


def _write_part(path, index, rows, k, spread):
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = make_block(1000 + index, rows, OOC_COLUMNS, k, spread, 0.0)
    table = pa.table({f"x{j}": X[:, j] for j in range(OOC_COLUMNS)})
    file = path / f"part-{index:05d}.parquet"
    pq.write_table(table, file, row_group_size=rows)
    return os.path.getsize(file)


def write_parquet(path, n_rows, rows_per_file, k, spread, processes=2):
    path.mkdir(parents=True)
    sizes = [rows_per_file] * (n_rows // rows_per_file)
    if n_rows % rows_per_file:
        sizes.append(n_rows % rows_per_file)
    with ProcessPoolExecutor(processes) as pool:
        futures = [pool.submit(_write_part, path, i, n, k, spread) for i, n in enumerate(sizes)]
        on_disk = sum(f.result() for f in futures)
    return len(sizes), on_disk


# --------------------------------------------------------------------------------------
# Fits and report
# --------------------------------------------------------------------------------------


class Trace:
    """Callback: the recorded log-likelihood and the summed EM seconds after every pass."""

    def __init__(self):
        self.passes, self.loglik, self.seconds = [], [], []

    def __call__(self, info):
        if info.model == 0:
            total = (self.seconds[-1] if self.seconds else 0.0) + info.seconds
            self.passes.append(info.iteration)
            self.loglik.append(info.lower_bound)
            self.seconds.append(total)

    def reach(self, target):
        for p, ll, s in zip(self.passes, self.loglik, self.seconds):
            if ll >= target:
                return p, s
        return None, self.seconds[-1] if self.seconds else 0.0


def fit_both(make_estimator, X, small, max_passes, gap, name):
    """Fit accelerated and plain EM from the same start; ``small`` (a part of ``X``) warms
    the workers up first. Plain EM stops once within ``gap / 100`` of the accelerated fit's
    final log-likelihood: its passes to within ``gap`` are known by then, and going on could
    only raise the best log-likelihood, so the target, so its count."""
    from emdask import ConvergenceWarning

    traces = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        make_estimator("em", 2).fit(small)
        for algorithm in ("squarem", "em"):
            trace = Trace()
            callbacks = [trace]
            if algorithm == "em":
                final = traces["squarem"].loglik[-1]
                near = final - gap / 100 * abs(final)
                callbacks.append(lambda info, near=near: info.lower_bound >= near)
            start = time.perf_counter()
            make_estimator(algorithm, max_passes).fit(X, callbacks=callbacks)
            print(f"  [{name} {algorithm}: {trace.passes[-1]} passes, fit "
                  f"{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
            traces[algorithm] = trace
    first = {a: t.loglik[0] for a, t in traces.items()}
    if first["em"] != first["squarem"]:
        raise SystemExit(f"{name}: the two fits did not start from the same point: {first}")
    return traces


def report(name, traces, gap):
    best = max(max(t.loglik) for t in traces.values())
    target = best - gap * abs(best)
    (pe, se), (ps, ss) = traces["em"].reach(target), traces["squarem"].reach(target)

    def passes(p, t):
        return f"{p:5d}" if p is not None else f">{t.passes[-1]:4d}"

    line = (
        f"{name:<13} passes to within {gap:.0e} of the best log-lik: em {passes(pe, traces['em'])} "
        f"({se:7.1f} s)  squarem {passes(ps, traces['squarem'])} ({ss:7.1f} s)"
    )
    ratio_p = (pe or traces["em"].passes[-1]) / ps if ps else float("nan")
    ratio_t = se / ss if ps and ss > 0 else float("nan")
    more = ">=" if pe is None else ""
    line += f"  ratio passes {more}{ratio_p:.2f}x  wall {more}{ratio_t:.2f}x"
    print(line, flush=True)
    return ratio_p, ratio_t


def gaussian_case(client, args, missing_rate, name):
    from distributed import wait

    from emdask import GaussianMixture

    X = client.persist(gaussian_table(args.rows, D, 8, args.spread, missing_rate))
    wait(X)

    def make(algorithm, max_passes):
        return GaussianMixture(
            8, covariance_type="full", tol=args.tol, max_iter=max_passes, random_state=0,
            algorithm=algorithm,
        )

    traces = fit_both(make, X, X[:20_000], args.max_passes, args.gap, name)
    del X
    return traces


def mixed_case(client, args):
    from distributed import wait

    from emdask import MixedMixture

    table = client.persist(customer_table(args.mixed_rows, args.mixed_separation))
    wait(table)

    def make(algorithm, max_passes):
        return MixedMixture(
            4, tol=args.tol, max_iter=max_passes, random_state=0, algorithm=algorithm
        )

    small = customer_table(20_000, args.mixed_separation)
    traces = fit_both(make, table, small, args.max_passes, args.gap, "mixed")
    del table
    return traces


def out_of_core_case(args, root):
    import dask.dataframe as dd

    from emdask import GaussianMixture
    from emdask.engine.cluster import connect

    rows = parse_bytes(args.ooc_size) // (OOC_COLUMNS * 8)
    rows_per_file = FILE_BYTES // (OOC_COLUMNS * 8)
    path = root / "table"
    start = time.perf_counter()
    files, on_disk = write_parquet(path, rows, rows_per_file, 4, args.ooc_spread)
    os.sync()  # flush the written pages now, not during the fits
    print(f"  [out-of-core: wrote {rows:,} rows x {OOC_COLUMNS} in {files} Parquet files "
          f"({format_bytes(on_disk)} on disk) in {time.perf_counter() - start:.0f} s]",
          file=sys.stderr, flush=True)
    with connect(None, n_workers=2, threads_per_worker=1, memory_limit=args.ooc_worker_memory):
        ddf = dd.read_parquet(str(path))
        small = dd.read_parquet(sorted(str(f) for f in path.glob("*.parquet"))[:2])

        def make(algorithm, max_passes):
            return GaussianMixture(
                4, covariance_type="full", tol=args.tol, max_iter=max_passes, random_state=0,
                algorithm=algorithm, persist=False,
            )

        traces = fit_both(make, ddf, small, args.ooc_max_passes, args.gap,
                          "out-of-core")
    return traces, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mixed-rows", type=int, default=2_000_000)
    parser.add_argument("--spread", type=float, default=2.0,
                        help="typical distance between two component means")
    parser.add_argument("--ooc-spread", type=float, default=2.5)
    parser.add_argument("--mixed-separation", type=float, default=1.0,
                        help="scales the differences between the customer segments")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--gap", type=float, default=1e-8)
    parser.add_argument("--max-passes", type=int, default=600)
    parser.add_argument("--ooc-size", default="8GiB", help="float64 values of the Parquet table")
    parser.add_argument("--ooc-worker-memory", default="1.5GiB")
    parser.add_argument("--ooc-max-passes", type=int, default=150)
    parser.add_argument("--dir", default=None, help="parent of the out-of-core table's directory")
    parser.add_argument("--cases", default="gaussian,gaussian-mcar,mixed,out-of-core")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")

    from distributed import Client, LocalCluster

    ratios = []
    start = time.perf_counter()
    in_memory = [c for c in cases if c != "out-of-core"]
    if in_memory:
        with LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster, Client(cluster) as client:
            if "gaussian" in cases:
                traces = gaussian_case(client, args, 0.0, "gaussian")
                ratios.append(report("gaussian", traces, args.gap))
            if "gaussian-mcar" in cases:
                traces = gaussian_case(client, args, 0.2, "gaussian-mcar")
                ratios.append(report("gaussian-mcar", traces, args.gap))
            if "mixed" in cases:
                traces = mixed_case(client, args)
                ratios.append(report("mixed", traces, args.gap))
    if "out-of-core" in cases:
        root = Path(tempfile.mkdtemp(prefix="emdask-accel-", dir=args.dir))
        try:
            traces, rows = out_of_core_case(args, root)
            ratios.append(report("out-of-core", traces, args.gap))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    p = np.median([r[0] for r in ratios])
    t = np.median([r[1] for r in ratios])
    every = all(r[1] > 1 for r in ratios)
    print(
        f"median over {len(ratios)} cases: passes {p:.2f}x fewer (goal >= 2x: "
        f"{'met' if p >= 2 else 'missed'}), wall time {t:.2f}x lower (lower in every case: "
        f"{'yes' if every else 'no'}; wall times from a shared machine, pass counts exact)"
    )
    print(
        f"  (gaussian: {args.rows:,} x {D}, k=8, means ~{args.spread:g} apart; mixed: "
        f"{args.mixed_rows:,} rows, k=4, separation {args.mixed_separation:g}; out-of-core: "
        f"{format_bytes(parse_bytes(args.ooc_size))} Parquet, {OOC_COLUMNS} columns, k=4, "
        f"means ~{args.ooc_spread:g} apart, 2 workers x {args.ooc_worker_memory}; "
        f"whole run {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
