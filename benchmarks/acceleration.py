"""Passes over the data to the optimum: plain EM against SQUAREM-accelerated EM, one run.

Every case is fitted twice from the same starting point (same initialisation, same
``random_state``), with ``algorithm='em'`` and ``algorithm='squarem'``, on the same
``distributed.LocalCluster`` (2 single-threaded worker processes), with a tight ``tol`` and a
cap on the passes. The best log-likelihood is the larger of the two final ones; reported for
each algorithm: the EM passes (and the EM wall time: the driver's per-pass seconds, summed)
until the recorded mean log-likelihood is within ``--gap`` (relative, default 1e-8) of the
best, and the ratios plain / accelerated. Cases:

* ``gaussian``: GaussianMixture, ``--rows`` × 16 (default 1,000,000), k=8, full covariance,
  components drawn close together (means ~N(0, 0.9²) per coordinate, covariances of
  scale ~1), so they overlap;
* ``gaussian-mcar``: the same table with 20% of the cells missing completely at random;
* ``mixed``: MixedMixture, ``--mixed-rows`` (default 2,000,000) rows of the customer table of
  ``benchmarks/families.py`` (2 Gaussian, 2 count, 2 categorical, 2 binary columns), k=4;
* ``out-of-core``: GaussianMixture k=4, full, on a Parquet table of ``--ooc-size`` (default
  1 GiB) with 16 columns drawn like ``gaussian``'s (4 components), re-read at every pass (``persist=False``) by workers limited to
  ``--ooc-worker-memory`` each (default 1 GiB, as ``benchmarks/out_of_core.py``).

The table generation and a warm-up fit of two passes (workers importing and compiling their
kernels) are never timed. Example::

    python benchmarks/acceleration.py
    python benchmarks/acceleration.py --rows 200000 --mixed-rows 400000 --ooc-size 256MiB
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import dask
import dask.array as da
from dask.utils import format_bytes, parse_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEED = 1414
D = 16


def truth(d, k, spread):
    rng = np.random.default_rng(SEED)
    means = rng.normal(0.0, spread, (k, d))
    covs = []
    for _ in range(k):
        A = rng.normal(size=(d, d)) / np.sqrt(d)
        covs.append(A @ A.T + 0.5 * np.eye(d))
    weights = rng.dirichlet(np.full(k, 5.0))
    return weights, means, np.stack(covs)


def make_block(index, size, d, k, spread, missing_rate):
    weights, means, covs = truth(d, k, spread)
    rng = np.random.default_rng([SEED, index])
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


def fit_both(make_estimator, X, max_passes, **fit_kw):
    from emdask import ConvergenceWarning

    traces, models = {}, {}
    with warnings.catch_warnings():  # the workers' first passes (imports, compiled kernels)
        warnings.simplefilter("ignore", ConvergenceWarning)  # are not timed
        make_estimator("em", 2).fit(X, **fit_kw)
    for algorithm in ("em", "squarem"):
        trace = Trace()
        est = make_estimator(algorithm, max_passes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, callbacks=[trace], **fit_kw)
        traces[algorithm], models[algorithm] = trace, est
    return traces, models


def report(name, traces, gap, max_passes):
    best = max(max(t.loglik) for t in traces.values())
    target = best - gap * abs(best)
    reached = {a: t.reach(target) for a, t in traces.items()}
    (pe, se), (ps, ss) = reached["em"], reached["squarem"]

    def passes(p, t):
        return f"{p:5d}" if p is not None else f">{t.passes[-1]:4d}"

    line = (
        f"{name:<13} passes to within {gap:.0e} of the best log-lik: em {passes(pe, traces['em'])} "
        f"({se:7.1f} s)  squarem {passes(ps, traces['squarem'])} ({ss:7.1f} s)"
    )
    ratio_p = (pe or traces["em"].passes[-1]) / ps if ps else float("nan")
    ratio_t = se / ss if ps and ss > 0 else float("nan")
    more = "≥" if pe is None else ""
    line += f"  ratio passes {more}{ratio_p:.2f}x  wall {more}{ratio_t:.2f}x"
    print(line, flush=True)
    return ratio_p, ratio_t


def gaussian_case(client, args, missing_rate):
    from distributed import wait

    from emdask import GaussianMixture

    X = client.persist(gaussian_table(args.rows, D, 8, args.spread, missing_rate))
    wait(X)

    def make(algorithm, max_passes):
        return GaussianMixture(
            8, covariance_type="full", tol=args.tol, max_iter=max_passes, random_state=0,
            algorithm=algorithm,
        )

    traces, _ = fit_both(make, X, args.max_passes)
    del X
    return traces


def mixed_case(client, args):
    from families import customer_partition, lazy_table

    from emdask import MixedMixture

    table = client.persist(lazy_table(customer_partition, args.mixed_rows))

    def make(algorithm, max_passes):
        return MixedMixture(
            4, tol=args.tol, max_iter=max_passes, random_state=0, algorithm=algorithm
        )

    traces, _ = fit_both(make, table, args.max_passes)
    del table
    return traces


def out_of_core_case(args, root):
    import dask.dataframe as dd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from emdask import GaussianMixture
    from emdask.engine.cluster import connect

    rows = parse_bytes(args.ooc_size) // (D * 8)
    path = root / "table"
    path.mkdir()
    edges = np.linspace(0, rows, max(2, -(-rows // 250_000)) + 1).astype(int)
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        X = make_block(1000 + i, int(b - a), D, 4, args.spread, 0.0)
        table = pa.table({f"x{j}": X[:, j] for j in range(D)})
        pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=int(b - a))
    with connect(None, n_workers=2, threads_per_worker=1, memory_limit=args.ooc_worker_memory):
        ddf = dd.read_parquet(str(path))

        def make(algorithm, max_passes):
            return GaussianMixture(
                4, covariance_type="full", tol=args.tol, max_iter=max_passes, random_state=0,
                algorithm=algorithm, persist=False,
            )

        traces, _ = fit_both(make, ddf, args.ooc_max_passes)
    return traces, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mixed-rows", type=int, default=2_000_000)
    parser.add_argument("--spread", type=float, default=0.9)
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--gap", type=float, default=1e-8)
    parser.add_argument("--max-passes", type=int, default=1000)
    parser.add_argument("--ooc-size", default="1GiB")
    parser.add_argument("--ooc-worker-memory", default="1GiB")
    parser.add_argument("--ooc-max-passes", type=int, default=300)
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
                traces = gaussian_case(client, args, 0.0)
                ratios.append(report("gaussian", traces, args.gap, args.max_passes))
            if "gaussian-mcar" in cases:
                traces = gaussian_case(client, args, 0.2)
                ratios.append(report("gaussian-mcar", traces, args.gap, args.max_passes))
            if "mixed" in cases:
                traces = mixed_case(client, args)
                ratios.append(report("mixed", traces, args.gap, args.max_passes))
    if "out-of-core" in cases:
        root = Path(tempfile.mkdtemp(prefix="emdask-accel-"))
        try:
            traces, rows = out_of_core_case(args, root)
            ratios.append(report("out-of-core", traces, args.gap, args.ooc_max_passes))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    p = np.median([r[0] for r in ratios])
    t = np.median([r[1] for r in ratios])
    print(
        f"median over {len(ratios)} cases: passes {p:.2f}x fewer, wall time {t:.2f}x lower "
        f"(gaussian: {args.rows:,} x {D}, k=8; mixed: {args.mixed_rows:,} rows, k=4; "
        f"out-of-core: {format_bytes(parse_bytes(args.ooc_size))} Parquet, k=4, workers "
        f"{args.ooc_worker_memory}; whole run {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
