"""Flow runs that tests start in processes of their own, so that they can be killed outright.

    python warehouse_jobs.py ADDRESS [--hook HOOK] [--slow-writes S] [--pause-fit S]
                             --run FLOW SOURCE DEST SEED [--run ...]

Each ``--run`` is one flow run, one after the other in this process: FLOW is ``impute``
(``impute_survey``, id column ``id``) or ``segment`` (``segment_customers``, three segments).
ADDRESS is a Dask scheduler, or ``local`` for a Dask cluster of threads inside this process (a
run on this machine alone, the reference the cluster runs are compared with). SOURCE and DEST
are the flow's URLs: object-store and table URLs need their configuration in the environment
(the AWS variables, ``PYICEBERG_CATALOG__*``), as a deployment gives it. Arguments are passed
as a list, never through a shell.

A hook stops the run at one moment of its publication, so that the test can SIGKILL it
there. The job prints ``MARK NAME`` on stdout when it gets there, then:

``commit``      (mark ``commit NAME``) sleeps at the one visible step of the commit of version
                NAME, after its files and manifest are written: before the conditional write
                of ``CURRENT`` (folders), after the new Iceberg metadata file is written and
                before the catalog's swap to it (Iceberg), before the Delta log entry is
                written (Delta);
``committed``   (mark ``committed NAME``) sleeps right after the commit of version NAME
                returned, before the flow goes on;
``gate``        (mark ``commit NAME``) waits for a line on stdin at that same step of the
                commit, then goes on; ``commit-done`` once a folder's conditional write went
                through. Two jobs held there commit in the order the test lets them go, each
                from what it read before: the second one's commit is a real conflict.

Whatever the hook, ``MARK conflict`` says a conditional write of ``CURRENT`` was refused (the
publisher reads it again and retries).

``--slow-writes S`` makes the workers take S seconds longer over every output partition,
which leaves the test a window to kill the run while its tables are being written;
``--pause-fit S`` pauses S seconds after every EM iteration of the imputation's fit, a window
to kill it mid-fit.

The last line on stdout is ``RESULT [...]``: per run, in JSON, the version published (or
found up to date), its folder, table and rows.

tests/test_warehouse_cluster.py starts its flow processes with `forked` instead of this
command line: forked from a process that imported `PRELOAD` once, each takes its own
process group, working directory, environment, stdin, stdout and stderr, then runs `main`
with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

#: How long a hooked job waits to be killed before it gives up (bounded, never forever).
HOOK_WAIT = 300


def mark(name):
    print(f"MARK {name}", flush=True)


def hold(name):
    """At a kill point: say so, then wait to be killed."""
    mark(name)
    time.sleep(HOOK_WAIT)
    raise SystemExit(f"hook {name}: nobody killed this job within {HOOK_WAIT} s")


def gate(name):
    """At a gate: say so, then wait for the test to let this job go on."""
    mark(name)
    if not sys.stdin.readline():
        raise SystemExit(f"gate {name}: stdin closed before the go")
    mark(f"{name.split()[0]}-passed")


def _slow_part(part, delay):
    """Runs on the workers: a partition written ``delay`` seconds later."""
    time.sleep(delay)
    return part


def slow_writes(delay):
    import pipelines.impute
    import pipelines.segment
    import pipelines.tasks

    original = pipelines.tasks.parquet_writes

    def parquet_writes(version, tables):
        slowed = [(name, frame.map_partitions(_slow_part, delay, meta=frame._meta), primary, index)
                  for name, frame, primary, index in tables]
        return original(version, slowed)

    pipelines.impute.parquet_writes = parquet_writes
    pipelines.segment.parquet_writes = parquet_writes


def pause_fit(seconds):
    import pipelines.impute

    logged = pipelines.impute.progress_callback

    def slow_progress(*args, **kwargs):
        log = logged(*args, **kwargs)

        def callback(info):
            log(info)
            time.sleep(seconds)

        return callback

    pipelines.impute.progress_callback = slow_progress


def once(action):
    """``action`` the first time only (a commit's later steps, pruning, go on untouched)."""
    done = []

    def run(name):
        if not done:
            done.append(name)
            action(name)

    return run


def install_hook(hook, dests):
    """Stop the flow at the visible step of its commit (``commit``, ``gate``) or after it.

    Only the table libraries the destinations need are imported (and patched)."""
    import pipelines.versions as versions

    committing = {}
    commit = versions.Version.commit

    def version_commit(self, manifest):
        committing["name"] = self.name
        published = commit(self, manifest)
        if hook == "committed":
            hold(f"committed {published.name}")
        return published

    versions.Version.commit = version_commit
    if hook == "committed":
        return
    at_commit = hold if hook == "commit" else gate
    stop = once(lambda what: at_commit(f"{what} {committing.get('name')}"))

    # folder destinations: the conditional write of CURRENT
    put = versions._conditional_put

    def conditional_put(fs, path, data, token):
        stop("commit")
        try:
            put(fs, path, data, token)
        except versions._Conflict:
            mark("conflict")
            raise
        mark("commit-done")

    versions._conditional_put = conditional_put
    if any(d.startswith("iceberg://") for d in dests):
        iceberg_hook(stop)
    if any(d.startswith("delta+") for d in dests):
        delta_hook(stop)


def iceberg_hook(stop):
    """Iceberg: the catalog's swap to the new metadata file, once that file is written."""
    from pyiceberg.catalog.sql import SqlCatalog

    write_metadata = SqlCatalog._write_metadata

    def _write_metadata(metadata, io, metadata_path):
        write_metadata(metadata, io, metadata_path)
        stop("commit")

    SqlCatalog._write_metadata = staticmethod(_write_metadata)


def delta_hook(stop):
    """Delta: the log entry of the new table version."""
    import deltalake
    import deltalake.transaction

    create = deltalake.transaction.create_table_with_add_actions
    write = deltalake.DeltaTable.create_write_transaction

    def create_table_with_add_actions(*args, **kwargs):
        stop("commit")
        return create(*args, **kwargs)

    def create_write_transaction(self, *args, **kwargs):
        stop("commit")
        return write(self, *args, **kwargs)

    deltalake.transaction.create_table_with_add_actions = create_table_with_add_actions
    deltalake.DeltaTable.create_write_transaction = create_write_transaction


def local_cluster():
    """A Dask cluster of threads in this process, reached over TCP on loopback (without
    Dask's statistical profiler, as the pipeline tests' cluster: walking the frames of another
    thread of the same process can crash CPython 3.11)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                            protocol="tcp://", host="127.0.0.1", dashboard_address=None)


def run(flow, address, source, dest, seed):
    if flow == "impute":
        from pipelines.impute import impute_survey

        return impute_survey(source=source, dest=dest, id_column="id", random_state=seed,
                             max_iter=20, tol=1e-6, dask_address=address)
    from pipelines.segment import segment_customers

    return segment_customers(source=source, dest=dest, id_column="id", n_components=3,
                             random_state=seed, max_iter=20, tol=1e-6, dask_address=address)


def run_all(address, runs):
    results = []
    for flow, source, dest, seed in runs:
        if flow not in ("impute", "segment"):
            raise SystemExit(f"unknown flow {flow!r}")
        summary = run(flow, address, source, dest, int(seed))
        result = {k: summary.get(k) for k in ("version", "path", "table", "rows")}
        result["up_to_date"] = bool(summary.get("up_to_date"))
        results.append(result)
    return results


#: What the process the tests fork flow processes from imports once, before any flow
#: process exists (see `forked`). Of these libraries, only Dask and fsspec read a
#: configuration when imported (environment variables, files under HOME); each flow
#: process reads theirs again once it has its own environment. Prefect, the Iceberg
#: catalog client and matplotlib read theirs when imported: each flow process imports them
#: itself.
PRELOAD = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "dask", "dask.dataframe",
           "distributed", "emdask", "s3fs")


def forked(env, cwd, argv, stdin, stdout, stderr):
    """A flow process forked from that process (`multiprocessing`'s fork server): it takes
    a process group, a working directory and an environment of its own, its stdin, stdout
    and stderr from the paths given, then runs `main` as ``python warehouse_jobs.py ARGV``
    would; its exit status is the same (an uncaught exception: 1 and its traceback on
    stderr)."""
    import atexit
    import os
    import tempfile
    import threading

    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR is read again
    import dask.config
    import fsspec.config

    dask.config.refresh()
    fsspec.config.default_conf_dir = os.path.join(os.path.expanduser("~"), ".config/fsspec")
    fsspec.config.conf_dir = os.environ.get("FSSPEC_CONFIG_DIR", fsspec.config.default_conf_dir)
    fsspec.config.conf.clear()
    fsspec.config.set_conf_files(fsspec.config.conf_dir, fsspec.config.conf)
    fsspec.config.set_conf_env(fsspec.config.conf, os.environ)
    for fd, path, flags in ((0, stdin, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_APPEND),
                            (2, stderr, os.O_WRONLY | os.O_APPEND)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        main(argv)
    finally:  # what the interpreter does on its way out: other threads, then atexit
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--run", nargs=4, action="append", required=True,
                   metavar=("FLOW", "SOURCE", "DEST", "SEED"))
    p.add_argument("--hook", choices=["commit", "committed", "gate"])
    p.add_argument("--slow-writes", type=float, default=0.0)
    p.add_argument("--pause-fit", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.slow_writes:
        slow_writes(args.slow_writes)
    if args.pause_fit:
        pause_fit(args.pause_fit)
    if args.hook:
        install_hook(args.hook, [dest for _, _, dest, _ in args.run])
    mark("started")
    if args.address == "local":
        with local_cluster() as cluster:
            results = run_all(cluster.scheduler_address, args.run)
    else:
        results = run_all(args.address, args.run)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
