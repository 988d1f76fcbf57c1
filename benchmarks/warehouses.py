"""The imputation flow on the same table read from local Parquet, a local S3 server and Iceberg.

One table (``--rows``, default 1,000,000, of an integer id and 6 float64 columns drawn from a
3-component Gaussian mixture, 10% of the cells missing completely at random) is written as
``--partitions`` (16) Parquet files, then offered to the ``impute-survey`` flow
(``pipelines.impute.impute_survey``) three ways, each run publishing to a destination of the
same kind:

==================  =====================================  ===================================
run                 source                                 destination
==================  =====================================  ===================================
local parquet       the folder of Parquet files            a local folder
s3 (moto)           the same files uploaded to a bucket    a folder of the same bucket
                    of a moto server on 127.0.0.1
iceberg (sqlite)    a table of a pyiceberg SQL catalog     a new table of the same catalog
                    (SQLite file, local warehouse) whose
                    one snapshot adds the same files
==================  =====================================  ===================================

Every run fits the same model (EMImputer, 3 components, full covariances) for exactly
``--iterations`` (10) EM iterations (``tol`` 1e-12, never reached), on one shared
``LocalCluster`` of 2 single-threaded worker processes on 127.0.0.1 given to the flow as
``dask_address``. Prefect runs with a temporary API (``prefect_test_harness``) and a
temporary ``PREFECT_HOME``. A warm-up run on a small table first starts the API and compiles
the kernels on the workers; it is not reported.

Reported per run, from the published version's manifest (``fit.seconds``, ``fit.n_iter``)
and from this process:

* per-iteration: the fit task's seconds over its EM iterations (the fit's first pass, which
  reads the source and summarises it, is counted in), as a ratio of the local run's;
* commit: the time spent in ``pipelines.versions.Version.commit`` (wrapped with a timer in
  this process, where the flow's tasks run), as a share of the whole flow call's wall time
  (checks, profile pass, fit, fill and write, validation, commit, report).

The servers, catalog, cluster and files are this script's own, under a temporary directory
removed at the end (also on Ctrl-C or SIGTERM). Example::

    python benchmarks/warehouses.py              # 1,000,000 rows
    python benchmarks/warehouses.py --quick      # 100,000 rows
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (REPO, REPO / "tests"):  # pipelines/, and tests/servers.py (moto, catalogs)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

ID = "rid"
CATALOG = "bench"  # pyiceberg catalog name (letters and digits: set through the environment)
NAMESPACE = "bench"
LABEL_WIDTH = 16


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def make_part(index, start, n_rows, n_features, k, missing, seed):
    """Rows ``start .. start + n_rows`` of the table as a pyarrow Table (reproducible)."""
    import pyarrow as pa

    base = np.random.default_rng([seed, 0])
    centers = base.normal(0.0, 3.0, (k, n_features))
    mixing = base.normal(0.0, 1.0, (k, n_features, n_features)) / np.sqrt(n_features)
    rng = np.random.default_rng([seed, 1, index])
    labels = rng.integers(0, k, n_rows)
    z = rng.standard_normal((n_rows, n_features))
    X = centers[labels] + np.einsum("ni,nij->nj", z, mixing[labels])
    mask = rng.random(X.shape) < missing
    mask[mask.all(axis=1), 0] = False  # every row keeps an observed cell
    X[mask] = np.nan
    columns = {ID: np.arange(start, start + n_rows, dtype=np.int64)}
    columns.update({f"x{j}": X[:, j] for j in range(n_features)})
    return pa.table(columns)


def write_table(path, n_rows, n_parts, n_features, k, missing, seed):
    """``n_parts`` Parquet files ``part.NN.parquet`` under ``path``; returns them in order."""
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    bounds = np.linspace(0, n_rows, n_parts + 1).astype(int)
    files = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = path / f"part.{i:03d}.parquet"
        pq.write_table(make_part(i, int(a), int(b - a), n_features, k, missing, seed), name)
        files.append(name)
    return files


def upload(files, fs, prefix):
    for f in files:
        fs.put_file(str(f), f"{prefix}/{f.name}")
    return f"s3://{prefix}"


def iceberg_table(catalog, name, files):
    """A new table ``NAMESPACE.name`` whose one snapshot adds copies of ``files``."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(files[0]).remove_metadata()
    table = catalog.create_table((NAMESPACE, name), schema=schema)
    data = Path(table.location().removeprefix("file://")) / "data"
    data.mkdir(parents=True, exist_ok=True)
    copies = []
    for f in files:
        shutil.copyfile(f, data / f.name)
        copies.append(str(data / f.name))
    table.add_files(copies)
    return f"iceberg://{CATALOG}/{NAMESPACE}.{name}"


# --------------------------------------------------------------------------------------
# Timing the commit
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed_commits():
    """Wrap ``Version.commit`` with a timer; yields the list of seconds of every commit."""
    from pipelines.versions import Version

    original = Version.commit
    seconds = []

    def commit(self, manifest):
        started = time.perf_counter()
        try:
            return original(self, manifest)
        finally:
            seconds.append(time.perf_counter() - started)

    Version.commit = commit
    try:
        yield seconds
    finally:
        Version.commit = original


def run_flow(source, dest, address, args, commits, storage_options=None):
    """One flow run: (wall seconds, commit seconds, the published manifest)."""
    from pipelines.impute import impute_survey
    from pipelines.versions import open_destination

    before = len(commits)
    started = time.perf_counter()
    summary = impute_survey(
        source, dest, ID, n_components=args.components, covariance_type="full",
        max_iter=args.iterations, tol=1e-12, random_state=0, dask_address=address,
        storage_options=storage_options,
    )
    wall = time.perf_counter() - started
    if summary.get("up_to_date"):
        raise RuntimeError(f"{dest} already held this run; nothing was computed")
    spent = commits[before:]
    if len(spent) != 1:
        raise RuntimeError(f"expected one commit for {dest}, timed {len(spent)}")
    manifest = open_destination(dest, storage_options).published().manifest
    return wall, spent[0], manifest


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="100,000 rows (overrides --rows)")
    p.add_argument("--partitions", type=int, default=16, help="Parquet files of the table")
    p.add_argument("--columns", type=int, default=6, help="float64 columns besides the id")
    p.add_argument("--components", type=int, default=3)
    p.add_argument("--missing", type=float, default=0.10, help="fraction of missing cells")
    p.add_argument("--iterations", type=int, default=10, help="EM iterations of every fit")
    p.add_argument("--warmup-rows", type=int, default=20_000)
    p.add_argument("--dir", default=None, help="parent of the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--verbose", action="store_true", help="show the flows' Prefect logs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n_rows = 100_000 if args.quick else args.rows

    signal.signal(signal.SIGTERM, _terminate)  # clean up as on Ctrl-C
    root = Path(tempfile.mkdtemp(prefix="emdask-warehouses-", dir=args.dir))
    saved_env = dict(os.environ)
    try:
        return _run(args, n_rows, root)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(args, n_rows, root):
    # Prefect, pyiceberg and the checkpoints read their settings from the environment at
    # import: everything is set before pipelines, prefect or pyiceberg is imported.
    (root / "prefect-home").mkdir()
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        EMDASK_CHECKPOINT_DIR=str(root / "checkpoints"),
    )
    if not args.verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from emdask import ConvergenceWarning

    # tol is never reached on purpose: every fit ends on max_iter
    warnings.simplefilter("ignore", ConvergenceWarning)
    from servers import s3_server, sqlite_catalog_env

    (root / "iceberg").mkdir()
    os.environ.update(sqlite_catalog_env(CATALOG, root / "iceberg"))

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# warehouses: impute-survey on {n_rows:,} rows x ({args.columns} float64 + id), "
        f"{args.missing:.0%} missing, {args.partitions} Parquet partitions; EMImputer "
        f"k={args.components} full, {args.iterations} EM iterations; 2 workers x 1 thread; "
        f"{os.cpu_count()} cores, load average {load}",
        flush=True,
    )
    started = time.perf_counter()
    files = write_table(root / "table", n_rows, args.partitions, args.columns,
                        args.components, args.missing, args.seed)
    write_table(root / "warmup", args.warmup_rows, 2, args.columns, args.components,
                       args.missing, args.seed + 1)
    print(f"wrote the table in {time.perf_counter() - started:.1f} s", flush=True)

    with s3_server() as s3:
        # the workers read and write S3 with these: set before the cluster starts
        os.environ.update(s3.env)
        import s3fs
        from distributed import LocalCluster
        from prefect.testing.utilities import prefect_test_harness
        from pyiceberg.catalog import load_catalog

        fs = s3fs.S3FileSystem(**s3.storage_options())
        bucket = s3.make_bucket("emdask-warehouses")
        s3_source = upload(files, fs, f"{bucket}/survey")
        catalog = load_catalog(CATALOG)
        catalog.create_namespace(NAMESPACE)
        iceberg_source = iceberg_table(catalog, "survey", files)

        runs = [
            ("local parquet", str(root / "table"), str(root / "out")),
            ("s3 (moto)", s3_source, f"s3://{bucket}/out"),
            ("iceberg (sqlite)", iceberg_source, f"iceberg://{CATALOG}/{NAMESPACE}.filled"),
        ]
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                prefect_test_harness(server_startup_timeout=120), \
                timed_commits() as commits:
            address = cluster.scheduler_address
            t0 = time.perf_counter()
            run_flow(str(root / "warmup"), str(root / "warmup-out"), address, args, commits)
            print(f"warm-up run ({args.warmup_rows:,} rows, local): "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)

            results = []
            for label, source, dest in runs:
                wall, commit, manifest = run_flow(source, dest, address, args, commits)
                fit = manifest["fit"]
                if fit["n_iter"] != args.iterations:
                    raise RuntimeError(f"{label}: {fit['n_iter']} EM iterations, not "
                                       f"{args.iterations}")
                per_iter = fit["seconds"] / fit["n_iter"]
                reference = results[0][1] if results else per_iter
                results.append((label, per_iter, fit["lower_bounds"][-1]))
                print(
                    f"warehouses: {label:<{LABEL_WIDTH}} {manifest['rows']:,} rows  "
                    f"per-iteration {per_iter:.2f} s ({per_iter / reference:.2f}x local)  "
                    f"commit {commit:.3f} s ({commit / wall:.1%} of run {wall:.1f} s)",
                    flush=True,
                )
            bounds = [b for _, _, b in results]
            spread = max(bounds) - min(bounds)
            print(
                "warehouses: same fit on every backend: final mean log-likelihood "
                + ", ".join(f"{b:.10f}" for b in bounds)
                + f" (spread {spread:.1e})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
