"""The flows on a real multi-process cluster against real warehouses, killed at chosen moments.

A ``dask scheduler`` and two ``dask worker`` processes, and every flow process, run with a
directory of their own (an empty working directory, their own ``TMPDIR`` and ``HOME``) and
share no path: the data lives on an S3 server (moto), in Iceberg tables whose warehouse is on
that server (the SQL catalog is the flow processes'), and in Delta tables on it. The workers
are given the S3 server's endpoint and credentials in their own environment; the flow
processes get theirs, and the catalog's configuration, the same way. Flows report to a Prefect
server of their own, reached over HTTP.

* The flows on the cluster give what the same flows give on local Parquet: imputation from
  ``s3://`` to an ``s3://`` folder, to an Iceberg table and to a Delta table, segmentation
  from ``s3://`` to ``s3://``.
* A flow process SIGKILLed while its tables are being written, in the middle of its commit
  (versions and manifest written, the one visible step not taken) or right after its commit,
  for each kind of destination: the previous version stays whole and readable (same ids,
  same bytes) and nothing partial shows; a run started again publishes every id exactly once;
  after a kill right after the commit, the version is complete and the next run finds it.
  Killed mid-fit, a run started again in another process (another TMPDIR) resumes from the
  checkpoint kept on S3.
* Two flow processes publishing at once: to an S3 folder both publish (the conditional write
  of ``CURRENT`` refuses the second writer, which retries) and the history lists both; to an
  Iceberg table one commits and the other fails with ``ConcurrentCommitError``, never a mix.

Flow processes run ``tests/warehouse_jobs.py``, which places the kills and the gates; they are
forked from a process that imported the libraries they all use once (`ForkServer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster_helpers import REPO_ROOT, TESTS_DIR, ProcessCluster, mixture_table, write_parquet_parts
from servers import _stop_group, free_port, iceberg_catalog_env, s3_catalog_props
from warehouse_fixtures import s3  # noqa: F401  (the session's S3 server)

N_PARTS = 6
ROWS_PER_PART = 2_000
COLUMNS = [f"x{j}" for j in range(4)]
VERSION_NAME = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{8}")
JOB_TIMEOUT = 300  # a whole flow run on a loaded 2-core machine, imports included
MARK_TIMEOUT = 240
SLOW_WRITES = 1.5  # seconds a worker takes longer over each output partition

pytestmark = pytest.mark.filterwarnings(
    "ignore:The inplace keyword in DataFrame.reset_index:DeprecationWarning")


def _unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _own_dirs(base):
    """``cwd`` (empty), ``tmp`` and ``home`` under ``base``, created fresh."""
    dirs = {sub: base / sub for sub in ("cwd", "tmp", "home")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=False)
    return dirs


def _clean_environ():
    """This process's environment without the configuration each process is given its own of."""
    drop = ("AWS_", "PYICEBERG_", "PREFECT_", "DASK_SCHEDULER_ADDRESS", "TMPDIR", "HOME")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# ----------------------------------------------------------------------------------------
# Servers and cluster
# ----------------------------------------------------------------------------------------


class PrefectServer:
    """``prefect server start`` in a directory of its own; the flow processes report to it."""

    def __init__(self, base):
        self.dirs = _own_dirs(base)
        self.log_path = base / "prefect.log"
        self.proc = None
        self.url = None
        self.attempts = 0

    def start(self):
        if self.proc is not None:
            _stop_group(self.proc, grace=5)
        self.attempts += 1
        self.port = free_port()
        env = _clean_environ()
        env.update(HOME=str(self.dirs["home"]), TMPDIR=str(self.dirs["tmp"]),
                   PREFECT_HOME=str(self.dirs["home"] / ".prefect"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-services", "--no-ui", "--analytics-off"],
                cwd=self.dirs["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def api_url(self, timeout=180):
        """The API's URL, once it answers (bounded wait)."""
        if self.url is not None:
            return self.url
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.attempts < 3:  # its port was taken meanwhile: another one
                    self.start()
                    continue
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}):\n{self.log()}")
            url = f"http://127.0.0.1:{self.port}/api"
            try:
                with opener.open(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.url = url
                        return url
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prefect server did not answer within {timeout} s:\n{self.log()}")

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None:
            _stop_group(self.proc, grace=10)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("warehouse-cluster")


@pytest.fixture(scope="module")
def prefect_server(base):
    server = PrefectServer(base / "prefect").start()  # answers while the cluster starts
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(base, s3, prefect_server):
    # the workers' own configuration: the S3 endpoint and credentials, in their environment
    with ProcessCluster(base / "cluster", n_workers=2, memory_limit="1GiB", own_dirs=True,
                        env={"PYTHONNOUSERSITE": "1"}, worker_env=s3.env) as c:
        yield c
    assert not c.leftovers()


@pytest.fixture(scope="module")
def bucket(s3):
    return s3.make_bucket(_unique("wc"))


class Catalog:
    """A pyiceberg SQL catalog (SQLite file) whose warehouse is ``s3://BUCKET/wh``."""

    def __init__(self, s3, directory, bucket):
        self.name = _unique("wc")
        directory.mkdir(parents=True)
        self.properties = {"type": "sql", "uri": f"sqlite:///{directory / 'catalog.db'}",
                           "warehouse": f"s3://{bucket}/wh", **s3_catalog_props(s3)}
        props = {k: v for k, v in self.properties.items() if k not in ("type", "uri", "warehouse")}
        self.env = iceberg_catalog_env(self.name, self.properties["uri"],
                                       self.properties["warehouse"], **props)
        self._catalogs = []

    def load(self):
        """The catalog, configured explicitly (this process has no PYICEBERG_* variable)."""
        from pyiceberg.catalog import load_catalog

        if not self._catalogs:
            self._catalogs.append(load_catalog(self.name, **self.properties))
        return self._catalogs[0]

    def url(self, table):
        return f"iceberg://{self.name}/{table}"

    def close(self):
        for catalog in self._catalogs:
            engine = getattr(catalog, "engine", None)
            if engine is not None:
                engine.dispose()


@pytest.fixture(scope="module")
def catalog(s3, base, bucket):
    handle = Catalog(s3, base / "catalog", bucket)
    handle.load().create_namespace("ns")
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture(scope="module")
def store(s3):
    import s3fs

    return s3fs.S3FileSystem(**s3.storage_options(), use_listings_cache=False,
                             skip_instance_cache=True)


@pytest.fixture(scope="module")
def survey(s3, base, bucket, store):
    """The survey table on S3 (one Parquet object per partition) and a local copy of it."""
    frame = mixture_table(N_PARTS * ROWS_PER_PART, n_features=len(COLUMNS), k=3, seed=17,
                          missing=0.1)
    local = write_parquet_parts(frame, base / "local-survey", N_PARTS)
    for path in sorted(local.glob("*.parquet")):
        store.put_file(str(path), f"{bucket}/survey/{path.name}")
    return frame, f"s3://{bucket}/survey", local


# ----------------------------------------------------------------------------------------
# Flow processes
# ----------------------------------------------------------------------------------------


class ForkServer:
    """`multiprocessing`'s fork server, started with the flow processes' environment and a
    directory of its own, having imported `warehouse_jobs.PRELOAD`: the flow processes are
    forked from it, so that each does not import those libraries again (seconds of CPU per
    process, which the flow processes of this module, started by the dozen on two cores,
    would otherwise spend side by side)."""

    def __init__(self, base, env):
        import multiprocessing
        import multiprocessing.forkserver

        import warehouse_jobs

        self.dirs = _own_dirs(base)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["warehouse_jobs", *warehouse_jobs.PRELOAD])
        saved = dict(os.environ)
        os.environ.clear()  # the server starts with the environment of this process
        os.environ.update(env, HOME=str(self.dirs["home"]), TMPDIR=str(self.dirs["tmp"]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def stop(self):
        import multiprocessing.forkserver

        stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
        if stop is not None:
            stop()
        self.context.set_forkserver_preload([])  # a later fork server imports nothing of ours


class FlowProcess:
    """A flow process forked from the fork server (`warehouse_jobs.forked`), with what the
    tests use of a `subprocess.Popen`: ``pid``, ``poll``, ``wait``, ``returncode``
    (``-SIGKILL`` once killed by it)."""

    def __init__(self, context, env, cwd, args, stdin, stdout, stderr):
        import warehouse_jobs

        self.args = args
        self._lock = threading.Lock()  # the exit status is read once, by one thread
        self._process = context.Process(
            target=warehouse_jobs.forked, name="flow",
            args=(env, str(cwd), args, str(stdin), str(stdout), str(stderr)))
        self._process.start()
        self.pid = self._process.pid

    def poll(self):
        with self._lock:
            return self._process.exitcode

    @property
    def returncode(self):
        return self.poll()

    def wait(self, timeout=None):
        from multiprocessing.connection import wait

        if not wait([self._process.sentinel], timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()


class Job:
    """A flow process (tests/warehouse_jobs.py) with a directory of its own, in its own
    process group; its stdout (a file) is read line by line (``MARK`` and ``RESULT`` lines).
    A gated job's stdin is a FIFO that this process holds open for writing."""

    def __init__(self, server, directory, env, args, gated=False):
        self.dir = directory
        self.dirs = _own_dirs(directory)
        env = dict(env)
        env.update(HOME=str(self.dirs["home"]), TMPDIR=str(self.dirs["tmp"]),
                   PREFECT_HOME=str(self.dirs["home"] / ".prefect"))
        self.args = [str(a) for a in args]
        self.stderr_path = directory / "stderr.log"
        self.stdout_path = directory / "stdout.log"
        self.stderr_path.touch()
        self.stdout_path.touch()
        stdin, self._gate = os.devnull, None
        if gated:
            stdin = directory / "stdin"
            os.mkfifo(stdin)
            self._gate = os.open(stdin, os.O_RDWR)  # the job's open does not wait for a writer
        self.proc = FlowProcess(server.context, env, self.dirs["cwd"], self.args, stdin,
                                self.stdout_path, self.stderr_path)
        self.started = time.monotonic()
        self.seen = []  # (first words of a line, seconds after the start), for the timing log
        self.lines = []
        self._new = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _line(self, line):
        self.seen.append((line.split(" ", 2)[:2], time.monotonic() - self.started))
        self.lines.append(line)
        self._new.put(line)

    def _read(self):
        """Whole lines as the job writes them, until it has ended and all is read."""
        pending = b""
        with open(self.stdout_path, "rb") as out:
            while True:
                chunk = out.read()
                if not chunk:
                    if self.proc.poll() is None:
                        time.sleep(0.02)
                        continue
                    chunk = out.read()  # written before it ended
                    if not chunk:
                        break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line.decode(errors="replace"))
        if pending:
            self._line(pending.decode(errors="replace"))
        self._new.put(None)
        self.seen.append((["end"], time.monotonic() - self.started))

    def marks(self):
        return [line.split(" ", 2)[1:] for line in list(self.lines) if line.startswith("MARK ")]

    def has_mark(self, name):
        return any(m[0] == name for m in self.marks())

    def wait_mark(self, name, timeout=MARK_TIMEOUT):
        """The detail of mark ``name`` once the job printed it (fails if it ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.marks():
                if m[0] == name:
                    return m[1] if len(m) > 1 else ""
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"job {self.args} never reached {name!r}:\n{self.stderr()}")
            try:
                line = self._new.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the job ended
                self.proc.wait(timeout=30)
                if not any(m[0] == name for m in self.marks()):
                    pytest.fail(f"job {self.args} ended ({self.proc.returncode}) before "
                                f"{name!r}:\n{self.stderr()}")

    def release(self):
        """Let a gated job go on."""
        os.write(self._gate, b"go\n")

    def kill(self):
        """SIGKILL the job's process group: the flow process dies outright."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet in a group of its own, or ended
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def finish(self, timeout=JOB_TIMEOUT):
        """(exit status, results) once the job ends (killed if it overruns)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job {self.args} did not end within {timeout} s:\n{self.stderr()}")
        self._reader.join(timeout=30)
        results = [json.loads(line[len("RESULT "):]) for line in self.lines
                   if line.startswith("RESULT ")]
        return self.proc.returncode, (results[-1] if results else None)

    def succeed(self, timeout=JOB_TIMEOUT):
        rc, results = self.finish(timeout)
        assert rc == 0 and results is not None, f"job {self.args} failed ({rc}):\n{self.stderr()}"
        return results

    def stderr(self, tail=6000):
        try:
            return self.stderr_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def cwd_entries(self):
        return sorted(p.name for p in self.dirs["cwd"].iterdir())


class Jobs:
    """Starts flow processes; every one still running is killed at teardown.

    With ``WAREHOUSE_CLUSTER_TIMING=1`` (and ``pytest -s``) the teardown prints when each job
    started and when it printed each line, to see where a slow run spends its time.
    """

    def __init__(self, root, env, address):
        self.root = root
        self.env = env
        self.address = address
        self.started = []
        self.server = ForkServer(root / "fork-server", env)

    def start(self, runs, address=None, hook=None, slow_writes=None, pause_fit=None, name="job"):
        args = [address or self.address]
        if hook:
            args += ["--hook", hook]
        if slow_writes:
            args += ["--slow-writes", slow_writes]
        if pause_fit:
            args += ["--pause-fit", pause_fit]
        for flow, source, dest, seed in runs:
            args += ["--run", flow, source, dest, seed]
        job = Job(self.server, self.root / _unique(name), self.env, args, gated=hook == "gate")
        self.started.append(job)
        return job

    def run(self, runs, **kwargs):
        """Run to the end: the results, checking the job left its working directory empty."""
        job = self.start(runs, **kwargs)
        results = job.succeed()
        assert job.cwd_entries() == [], "the flow process wrote into its working directory"
        return results

    def stop_all(self):
        for job in self.started:
            if job.proc.poll() is None:
                job.kill()
        self.server.stop()
        if os.environ.get("WAREHOUSE_CLUSTER_TIMING"):
            t0 = min((j.started for j in self.started), default=0)
            for j in self.started:
                print(f"{j.started - t0:7.1f} {j.dir.name:32s} rc={j.proc.returncode} "
                      + " ".join(f"{w[-1]}@{t:.1f}" for w, t in j.seen))


@pytest.fixture(scope="module")
def jobs(base, s3, catalog, cluster, prefect_server):
    env = _clean_environ()
    env.update(s3.env)  # the flow processes' own configuration: S3, the Iceberg catalog
    env.update(catalog.env)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)]),
        PYTHONNOUSERSITE="1",
        PREFECT_API_URL=prefect_server.api_url(),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    runner = Jobs(base / "jobs", env, cluster.address)
    try:
        yield runner
    finally:
        runner.stop_all()


# ----------------------------------------------------------------------------------------
# Reading destinations back (from this process, with explicit configuration)
# ----------------------------------------------------------------------------------------


def _digest(store, paths):
    """Digest of the names and bytes of objects (to prove nothing of a version changed)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.encode())
        h.update(store.cat_file(path))
    return h.hexdigest()


def _read_parts(store, paths):
    """The rows of Parquet objects, in partition order."""
    import pyarrow.parquet as pq

    number = lambda p: int(re.search(r"part\.(\d+)\.parquet$", p).group(1))  # noqa: E731
    paths = sorted(paths, key=number)
    assert paths, "no Parquet object"
    frames = []
    for path in paths:
        with store.open(path, "rb") as fh:
            frames.append(pq.read_table(fh).to_pandas())
    return pd.concat(frames, ignore_index=True)


def _objects(store, prefix):
    try:
        return set(store.find(prefix))
    except FileNotFoundError:
        return set()


class State:
    """What a destination shows: the published version, its pointer, its bytes and rows."""

    def __init__(self, name, pointer, digest, frame, manifest):
        self.name, self.pointer, self.digest = name, pointer, digest
        self.frame, self.manifest = frame, manifest

    def assert_same(self, other):
        assert (self.name, self.pointer, self.digest) == (other.name, other.pointer, other.digest)
        pd.testing.assert_frame_equal(self.frame, other.frame)


def _sorted(frame):
    return frame.sort_values("id").reset_index(drop=True)


class FolderDest:
    kind = "folder"

    def __init__(self, store, prefix):
        self.store, self.prefix = store, prefix
        self.url = f"s3://{prefix}"

    def version_dir(self, name):
        return f"{self.prefix}/versions/{name}"

    def state(self, table="data"):
        pointer = self.store.cat_file(f"{self.prefix}/CURRENT").decode()
        name = pointer.split()[0]
        files = _objects(self.store, self.version_dir(name))
        frame = _read_parts(self.store, [p for p in files if f"/{name}/{table}/part." in p])
        return State(name, pointer, _digest(self.store, files), _sorted(frame),
                     self.manifest(name))

    def manifest(self, name):
        path = f"{self.version_dir(name)}/manifest.json"
        return json.loads(self.store.cat_file(path)) if self.store.exists(path) else None

    def data_prefix(self):
        return f"{self.prefix}/versions"

    def history(self):
        return self.store.cat_file(f"{self.prefix}/CURRENT").decode().split()


class IcebergDest:
    kind = "iceberg"

    def __init__(self, store, catalog, table):
        self.store, self.catalog, self.table = store, catalog, table
        self.url = catalog.url(table)

    def load(self):
        return self.catalog.load().load_table(tuple(self.table.split(".")))

    def location(self):
        return self.load().location().split("://", 1)[1].rstrip("/")

    def sidecar(self, name):
        return f"{self.location()}/_emdask/versions/{name}"

    def state(self):
        table = self.load()
        snapshot = table.current_snapshot()
        name = snapshot.summary.additional_properties["emdask.version"]
        data = [t.file.file_path.split("://", 1)[1] for t in table.scan().plan_files()]
        files = set(data) | _objects(self.store, self.sidecar(name))
        frame = table.scan().to_arrow().to_pandas()
        return State(name, (snapshot.snapshot_id, table.metadata_location),
                     _digest(self.store, files), _sorted(frame), self.manifest(name))

    def manifest(self, name):
        path = f"{self.sidecar(name)}/manifest.json"
        return json.loads(self.store.cat_file(path)) if self.store.exists(path) else None

    def data_prefix(self):
        return f"{self.location()}/data"

    def metadata_files(self):
        return {p for p in _objects(self.store, f"{self.location()}/metadata")
                if p.endswith(".metadata.json")}


class DeltaDest:
    kind = "delta"

    def __init__(self, store, s3, prefix):
        self.store, self.prefix = store, prefix
        self.url = f"delta+s3://{prefix}"
        self.options = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
                        "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": s3.region,
                        "AWS_ALLOW_HTTP": "true"}

    def load(self):
        from deltalake import DeltaTable

        return DeltaTable(f"s3://{self.prefix}", storage_options=self.options)

    def sidecar(self, name):
        return f"{self.prefix}/_emdask/versions/{name}"

    def state(self):
        table = self.load()
        name = table.history(1)[0]["emdask.version"]
        data = [u.split("://", 1)[1] for u in table.file_uris()]
        files = set(data) | _objects(self.store, self.sidecar(name))
        frame = table.to_pyarrow_table().to_pandas()
        return State(name, table.version(), _digest(self.store, files), _sorted(frame),
                     self.manifest(name))

    def manifest(self, name):
        path = f"{self.sidecar(name)}/manifest.json"
        return json.loads(self.store.cat_file(path)) if self.store.exists(path) else None

    def data_prefix(self):
        return self.prefix

    def log_entries(self):
        return {p for p in _objects(self.store, f"{self.prefix}/_delta_log") if p.endswith(".json")}


def assert_complete(state, frame, name=None):
    """A whole published imputation: its manifest, every id of the source once, no gap."""
    if name is not None:
        assert state.name == name
    assert state.manifest is not None and state.manifest["version"] == state.name
    assert state.manifest["rows"] == len(frame)
    got = state.frame
    np.testing.assert_array_equal(got["id"].to_numpy(), np.sort(frame["id"].to_numpy()))
    assert not got[COLUMNS].isna().any().any()
    # observed cells are the source's, bit for bit
    source = _sorted(frame)
    observed = source[COLUMNS].notna().to_numpy()
    np.testing.assert_array_equal(got[COLUMNS].to_numpy()[observed],
                                  source[COLUMNS].to_numpy()[observed])


def _versions_in(keys):
    return {m.group(0) for k in keys for m in [VERSION_NAME.search(k)] if m}


# ----------------------------------------------------------------------------------------
# The flows on the cluster equal the flows on local Parquet
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dests(store, s3, catalog, bucket):
    return {
        "folder": FolderDest(store, f"{bucket}/out/impute"),
        "iceberg": IcebergDest(store, catalog, "ns.impute"),
        "delta": DeltaDest(store, s3, f"{bucket}/out/delta"),
    }


@pytest.fixture(scope="module")
def published(jobs, survey, dests, bucket, base, store):
    """Seed-0 runs: on the cluster from S3, and on this machine alone from local Parquet."""
    frame, source, local = survey
    segments = FolderDest(store, f"{bucket}/out/segments")
    reference_out = base / "reference"
    reference = jobs.start([("impute", local, reference_out / "impute", 0),
                            ("segment", local, reference_out / "segment", 0)],
                           address="local", name="reference")
    cluster_job = jobs.start([("impute", source, dests["folder"].url, 0),
                              ("impute", source, dests["iceberg"].url, 0),
                              ("impute", source, dests["delta"].url, 0),
                              ("segment", source, segments.url, 0)], name="published")
    results = cluster_job.succeed()
    assert cluster_job.cwd_entries() == []
    states = {kind: dests[kind].state() for kind in ("folder", "iceberg", "delta")}
    states["segments"] = segments.state(table="segments")
    ref = reference.succeed()
    assert reference.cwd_entries() == []
    expected = {
        "impute": _sorted(pd.read_parquet(Path(ref[0]["path"]) / "data")),
        "segment": _sorted(pd.read_parquet(Path(ref[1]["path"]) / "segments")),
        "impute_manifest": json.loads((Path(ref[0]["path"]) / "manifest.json").read_text()),
        "segment_manifest": json.loads((Path(ref[1]["path"]) / "manifest.json").read_text()),
    }
    return results, states, expected


@pytest.mark.parametrize("kind", ["folder", "iceberg", "delta"])
def test_impute_on_the_cluster_from_s3_equals_the_local_run(published, kind, survey):
    results, states, expected = published
    frame = survey[0]
    result = results[["folder", "iceberg", "delta"].index(kind)]
    state = states[kind]
    assert not result["up_to_date"] and state.name == result["version"]
    assert_complete(state, frame)
    want = expected["impute"]
    assert sorted(state.frame.columns) == sorted(want.columns)
    got = state.frame[list(want.columns)]
    np.testing.assert_array_equal(got["id"].to_numpy(), want["id"].to_numpy())
    np.testing.assert_allclose(got[COLUMNS].to_numpy(), want[COLUMNS].to_numpy(), rtol=1e-8)
    fit, ref_fit = state.manifest["fit"], expected["impute_manifest"]["fit"]
    assert fit["n_iter"] == ref_fit["n_iter"]
    np.testing.assert_allclose(fit["lower_bounds"], ref_fit["lower_bounds"], rtol=1e-8)


def test_segment_on_the_cluster_from_s3_equals_the_local_run(published, survey):
    results, states, expected = published
    state, want = states["segments"], expected["segment"]
    assert state.name == results[3]["version"]
    assert sorted(state.frame.columns) == sorted(want.columns)
    assert state.manifest["rows"] == len(survey[0])
    got = state.frame[list(want.columns)]
    np.testing.assert_array_equal(got["id"].to_numpy(), np.sort(survey[0]["id"].to_numpy()))
    np.testing.assert_array_equal(got["segment"].to_numpy(), want["segment"].to_numpy())
    probabilities = [c for c in want.columns if c.startswith("p_")]
    assert len(probabilities) == 3
    np.testing.assert_allclose(got[probabilities].to_numpy(), want[probabilities].to_numpy(),
                               rtol=1e-8, atol=1e-12)
    assert state.manifest["counts"] == expected["segment_manifest"]["counts"]


# ----------------------------------------------------------------------------------------
# A flow process killed before, during and right after its commit
# ----------------------------------------------------------------------------------------

KINDS = ["folder", "iceberg", "delta"]


def _for_each_kind(action):
    """``action(kind)`` for the three kinds of destination at once (their jobs overlap)."""
    with ThreadPoolExecutor(len(KINDS)) as pool:
        return dict(zip(KINDS, pool.map(action, KINDS)))


@pytest.mark.slow  # make test-all: a run killed later, with every file of its version
# written (in the commit), leaves the published version too, a default test below
def test_killed_while_writing_leaves_the_published_version(jobs, survey, dests, published, store):
    frame, source, _ = survey
    before = {kind: dests[kind].state() for kind in KINDS}
    listed = {kind: _objects(store, dests[kind].data_prefix()) for kind in KINDS}

    def kill_while_writing(kind):
        dest = dests[kind]
        # held at the commit should it ever get there: it is killed before, while writing
        job = jobs.start([("impute", source, dest.url, 1)], hook="commit", slow_writes=SLOW_WRITES,
                         name=f"writing-{kind}")
        deadline = time.monotonic() + MARK_TIMEOUT

        def new_parts():
            return [p for p in _objects(store, dest.data_prefix()) - listed[kind]
                    if re.search(r"/part\.\d+\.parquet$", p)]

        while not (parts := new_parts()):
            if job.proc.poll() is not None or time.monotonic() > deadline:
                job.kill()
                pytest.fail(f"{kind}: the job ended or stalled before writing:\n{job.stderr()}")
            time.sleep(0.05)
        job.kill()
        return job, parts

    killed = _for_each_kind(kill_while_writing)
    for kind in KINDS:
        job, parts = killed[kind]
        dest = dests[kind]
        assert job.proc.returncode == -signal.SIGKILL
        assert not job.has_mark("commit")  # it never got to its commit
        staged = _versions_in(parts)
        assert len(staged) == 1 and before[kind].name not in staged
        assert dest.manifest(staged.pop()) is None  # killed before its version was complete
        after = dest.state()
        after.assert_same(before[kind])  # the published version: whole, byte for byte
        assert_complete(after, frame)


def test_killed_mid_fit_a_run_in_another_process_resumes_from_the_checkpoint_on_s3(
        jobs, survey, published, store, bucket):
    """The fit's checkpoint is kept on the destination's storage: a run started again in a
    process with another TMPDIR (another machine) goes on from it, to the same model."""
    frame, source, _ = survey
    _, states, _ = published
    uninterrupted = states["folder"].manifest  # seed 0 from the same source: the same run key
    assert uninterrupted["fit"]["n_iter"] >= 4
    dest = FolderDest(store, f"{bucket}/out/resumed")

    def checkpointed_iterations():
        for path in _objects(store, f"{dest.prefix}/.checkpoints"):
            if path.endswith("/model.json"):
                try:
                    return json.loads(store.cat_file(path))["models"][0]["n_iter"]
                except (FileNotFoundError, ValueError, KeyError):  # being replaced
                    return 0
        return 0

    job = jobs.start([("impute", source, dest.url, 0)], pause_fit=1.0, name="mid-fit")
    deadline = time.monotonic() + MARK_TIMEOUT
    while (done := checkpointed_iterations()) < 2:
        if job.proc.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"the job ended or stalled before a checkpoint:\n{job.stderr()}")
        time.sleep(0.05)
    job.kill()
    assert job.proc.returncode == -signal.SIGKILL
    assert done < uninterrupted["fit"]["n_iter"]
    assert not store.exists(f"{dest.prefix}/CURRENT")  # nothing published

    result = jobs.run([("impute", source, dest.url, 0)], name="resume")[0]
    state = dest.state()
    assert state.name == result["version"]
    assert_complete(state, frame)
    fit = state.manifest["fit"]
    # it went on from the checkpoint: fewer passes than the uninterrupted run, same model
    assert fit["n_passes"] < uninterrupted["fit"]["n_passes"]
    assert fit["n_iter"] == uninterrupted["fit"]["n_iter"]
    np.testing.assert_allclose(fit["lower_bounds"], uninterrupted["fit"]["lower_bounds"], rtol=1e-8)
    np.testing.assert_allclose(state.frame[COLUMNS].to_numpy(),
                               states["folder"].frame[COLUMNS].to_numpy(), rtol=1e-8)
    assert not _objects(store, f"{dest.prefix}/.checkpoints")  # dropped once published


def test_killed_in_the_commit_leaves_the_published_version_and_a_rerun_publishes_every_id_once(
        jobs, survey, dests, published):
    frame, source, _ = survey
    before = {kind: dests[kind].state() for kind in KINDS}
    metadata = dests["iceberg"].metadata_files()
    delta_log = dests["delta"].log_entries()

    def kill_in_commit(kind):
        job = jobs.start([("impute", source, dests[kind].url, 1)], hook="commit",
                         name=f"commit-{kind}")
        name = job.wait_mark("commit")
        job.kill()
        return job, name

    killed = _for_each_kind(kill_in_commit)
    for kind in KINDS:
        job, name = killed[kind]
        assert job.proc.returncode == -signal.SIGKILL
        assert VERSION_NAME.fullmatch(name) and name != before[kind].name
        dests[kind].state().assert_same(before[kind])  # nothing of it shows
        # killed at the one visible step: every file of the version, manifest last, was written
        assert dests[kind].manifest(name)["version"] == name
    assert killed["folder"][1] not in dests["folder"].history()
    assert len(dests["iceberg"].metadata_files() - metadata) == 1  # written, never swapped in
    assert dests["delta"].log_entries() == delta_log

    results = jobs.run([("impute", source, dests[kind].url, 1) for kind in KINDS], name="rerun-1")
    for kind, result in zip(KINDS, results):
        assert not result["up_to_date"]
        state = dests[kind].state()
        assert state.name == result["version"] != before[kind].name
        assert_complete(state, frame)  # every id once: nothing of the killed runs got in
        assert len(state.frame) == len(frame)
    assert dests["folder"].history()[:2] == [results[0]["version"], before["folder"].name]


@pytest.mark.slow  # make test-all: the reruns that find a version up to date, and the
# commit killed before it shows, are default tests (here and in pipelines/test_warehouses.py)
def test_killed_right_after_the_commit_the_version_is_complete_and_a_rerun_finds_it(
        jobs, survey, dests, published):
    frame, source, _ = survey
    before = {kind: dests[kind].state() for kind in KINDS}

    def kill_after_commit(kind):
        job = jobs.start([("impute", source, dests[kind].url, 2)], hook="committed",
                         name=f"committed-{kind}")
        name = job.wait_mark("committed")
        job.kill()
        return job, name

    killed = _for_each_kind(kill_after_commit)
    for kind in KINDS:
        job, name = killed[kind]
        assert job.proc.returncode == -signal.SIGKILL
        assert VERSION_NAME.fullmatch(name) and name != before[kind].name
        assert_complete(dests[kind].state(), frame, name=name)

    results = jobs.run([("impute", source, dests[kind].url, 2) for kind in KINDS], name="rerun-2")
    for kind, result in zip(KINDS, results):
        state = dests[kind].state()
        if result["up_to_date"]:
            assert result["version"] == killed[kind][1] == state.name
        else:
            assert state.name == result["version"] != killed[kind][1]
        assert_complete(state, frame)


# ----------------------------------------------------------------------------------------
# Two flow processes publishing at once
# ----------------------------------------------------------------------------------------


def _copy_published(store, src, dst_prefix):
    """A folder destination at ``dst_prefix`` holding (a copy of) ``src``'s published version."""
    name = src.state().name
    for path in _objects(store, src.version_dir(name)):
        store.copy(path, f"{dst_prefix}/versions/{name}/" + path.split(f"/{name}/", 1)[1])
    store.pipe_file(f"{dst_prefix}/CURRENT", f"{name}\n".encode())
    return name


def _folder_race(jobs, survey, dests, store, bucket):
    """Two runs (seeds 3 and 4) at their conditional write of CURRENT at once, over a
    destination that has a published version; the first let go writes first."""
    _, source, _ = survey
    dest = FolderDest(store, f"{bucket}/concurrent/folder")
    first = _copy_published(store, dests["folder"], dest.prefix)
    a = jobs.start([("impute", source, dest.url, 3)], hook="gate", name="race-folder-a")
    b = jobs.start([("impute", source, dest.url, 4)], hook="gate", name="race-folder-b")
    # both have read CURRENT and hold their conditional write of it
    a.wait_mark("commit")
    b.wait_mark("commit")
    a.release()
    a.wait_mark("commit-done")
    b.release()  # its write names a CURRENT that is no longer there
    return {"dest": dest, "first": first, "a": a.succeed()[0], "b": b.succeed()[0],
            "conflicts": (a.has_mark("conflict"), b.has_mark("conflict"))}


def _iceberg_race(jobs, survey, catalog, store, case):
    """Two runs (seeds 3 and 4) at the catalog's swap at once; the first let go commits."""
    import pyarrow as pa

    frame, source, _ = survey
    table_name = f"ns.{_unique('race').replace('-', '_')}"
    dest = IcebergDest(store, catalog, table_name)
    first = None
    if case == "existing-table":  # a table with a snapshot of its own: the raw survey
        identifier = tuple(table_name.split("."))
        table = catalog.load().create_table(identifier,
                                            schema=pa.Schema.from_pandas(frame, preserve_index=False))
        table.append(pa.Table.from_pandas(frame, preserve_index=False))
        first = catalog.load().load_table(identifier).current_snapshot().snapshot_id
    a = jobs.start([("impute", source, dest.url, 3)], hook="gate", name=f"race-{case}-a")
    b = jobs.start([("impute", source, dest.url, 4)], hook="gate", name=f"race-{case}-b")
    # both wrote their new table metadata and hold the catalog's swap to it
    a.wait_mark("commit")
    b.wait_mark("commit")
    a.release()
    winner = a.succeed()[0]
    b.release()  # its swap names metadata that is no longer the table's
    rc, loser = b.finish()
    return {"dest": dest, "first": first, "winner": winner, "rc": rc, "loser": loser,
            "stderr": b.stderr(20000), "state": dest.state()}


ICEBERG_CASES = ["existing-table", "new-table"]


@pytest.fixture(scope="module")
def races(jobs, survey, dests, published, catalog, store, bucket):
    """The three races at once: to an S3 folder, to an Iceberg table that has a snapshot and
    to one that does not exist yet."""
    with ThreadPoolExecutor(3) as pool:
        folder = pool.submit(_folder_race, jobs, survey, dests, store, bucket)
        iceberg = {case: pool.submit(_iceberg_race, jobs, survey, catalog, store, case)
                   for case in ICEBERG_CASES}
        return {"folder": folder.result(), **{case: f.result() for case, f in iceberg.items()}}


def test_two_runs_publishing_to_one_s3_folder_both_publish(races, survey, store):
    frame = survey[0]
    race = races["folder"]
    dest, ra, rb = race["dest"], race["a"], race["b"]
    assert race["conflicts"] == (False, True)  # the second write was refused once, then retried
    assert ra["version"] != rb["version"]
    history = dest.history()
    assert history[0] in (ra["version"], rb["version"])
    assert sorted(history) == sorted([ra["version"], rb["version"], race["first"]])
    for name in (ra["version"], rb["version"]):
        manifest = dest.manifest(name)
        assert manifest is not None and manifest["version"] == name and manifest["rows"] == len(frame)
        data = _read_parts(store, [p for p in _objects(store, f"{dest.version_dir(name)}/data")
                                   if p.endswith(".parquet")])
        np.testing.assert_array_equal(np.sort(data["id"].to_numpy()), np.sort(frame["id"].to_numpy()))
        assert not data[COLUMNS].isna().any().any()


@pytest.mark.parametrize("case", ICEBERG_CASES)
def test_two_runs_committing_to_one_iceberg_table_one_wins_whole(races, survey, case):
    frame = survey[0]
    race = races[case]
    assert race["rc"] != 0 and race["loser"] is None, "the second commit went through"
    state = race["state"]
    assert state.name == race["winner"]["version"]
    assert_complete(state, frame)  # one run's rows, whole: never a mix of both
    assert len(state.frame) == len(frame)
    table = race["dest"].load()
    assert {s.summary.additional_properties.get("emdask.version") for s in table.snapshots()} \
        <= {None, state.name}  # no snapshot of the run that lost
    if race["first"] is not None:  # the snapshot before them is still there to read
        old = table.scan(snapshot_id=race["first"]).to_arrow().to_pandas()
        pd.testing.assert_frame_equal(_sorted(old), _sorted(frame), check_dtype=False)


@pytest.mark.parametrize("case", ICEBERG_CASES)
def test_the_run_that_loses_an_iceberg_race_fails_with_concurrent_commit_error(races, case):
    err = races[case]["stderr"]
    assert "pipelines.versions.ConcurrentCommitError" in err, err[-3000:]
    assert "another run" in err and "run again" in err


def test_every_process_ran_in_a_directory_of_its_own_and_wrote_nothing_there(cluster, jobs, s3,
                                                                            published):
    """Checked last, once every flow ran: scheduler, workers and flow processes each had an
    empty working directory, a TMPDIR and a HOME of their own, and left the first empty."""
    import psutil

    assert jobs.started
    cwds, tmps = set(), set()
    for name, leader in [("scheduler", cluster.scheduler), *cluster.workers.items()]:
        own = cluster.process_dir(name)
        members = [pid for pid in cluster.pids() if os.getpgid(pid) == leader.pid]
        assert members, f"{name} is not running"
        for pid in members:  # a worker's nanny and the worker process it started
            proc = psutil.Process(pid)
            environ = proc.environ()
            assert Path(proc.cwd()) == own / "cwd"
            assert environ["TMPDIR"] == str(own / "tmp") and environ["HOME"] == str(own / "home")
            if name != "scheduler":  # the workers' own S3 configuration
                assert environ["AWS_ENDPOINT_URL"] == s3.endpoint_url
            cwds.add(proc.cwd())
            tmps.add(environ["TMPDIR"])
        assert list((own / "cwd").iterdir()) == []
    assert len(cwds) == len(tmps) == 1 + len(cluster.workers)
    assert not (cluster.workdir / "scheduler.json").exists()  # workers were given an address
    for job in jobs.started:
        assert job.proc.returncode is not None
        assert job.cwd_entries() == [], f"{job.dir.name} wrote into its working directory"
        cwds.add(str(job.dirs["cwd"]))
        tmps.add(str(job.dirs["tmp"]))
    assert len(cwds) == len(tmps) == 1 + len(cluster.workers) + len(jobs.started)
