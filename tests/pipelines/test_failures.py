"""Failures: bad input stops a command before any service starts, a killed command leaves no
process behind, Ctrl-C stops 'emdask serve' at once, a failed publish leaves nothing behind.

The commands run as real processes where that is the point (kill -9, Ctrl-C, a command's
whole output); checks of what happens before any service starts run in this process, with
every way of starting a service replaced by a tripwire, so that no timing is assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import pipelines.versions as versions
from pipelines.cli import main
from pipeline_data import survey_frame, tree_digest, write_dataset

REPO = Path(__file__).resolve().parents[2]
LINUX = sys.platform.startswith("linux")


def _command():
    """The ``emdask`` command of this checkout (an installed console script may be another's)."""
    return [sys.executable, "-m", "pipelines.cli"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small tables shared by the tests: a good one, and bad ones of every kind."""
    root = tmp_path_factory.mktemp("data")
    good = write_dataset(survey_frame(400), root / "survey", npartitions=2)
    empty = write_dataset(survey_frame(40).iloc[:0], root / "empty", npartitions=1)
    dup = survey_frame(400)
    dup.loc[300, "rid"] = dup.loc[3, "rid"]
    dup = write_dataset(dup, root / "dup", npartitions=2)
    dated = survey_frame(40).assign(when=pd.Timestamp("2024-01-01"))
    dated = write_dataset(dated, root / "dated", npartitions=1)
    mixed = root / "mixed"
    mixed.mkdir()
    survey_frame(20).to_parquet(mixed / "a.parquet", index=False)
    survey_frame(20).assign(x="text").to_parquet(mixed / "b.parquet", index=False)
    garbage = root / "garbage-dest"
    garbage.mkdir()
    (garbage / "CURRENT").write_text("not a version name\n")
    return dict(root=root, good=good, empty=empty, dup=dup, dated=dated, mixed=str(mixed),
                garbage=str(garbage))


def _env(**changes):
    """The environment of a command: this checkout's code in every process it starts, no
    Prefect API or Dask scheduler unless given."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])])}
    for name in ("PREFECT_API_URL", "DASK_SCHEDULER_ADDRESS"):
        env.pop(name, None)
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


@pytest.fixture(scope="module")
def local_api_env(prefect_api, tmp_path_factory):
    """Environment of a command that starts its own local Prefect API (no PREFECT_API_URL),
    on a database of its own: a copy of the session's test API's, migrated already (a new one
    takes its API many seconds to set up; a shared one makes writes wait on each other)."""
    import sqlite3

    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    home = tmp_path_factory.mktemp("prefect-home")
    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    scheme, _, path = url.partition(":///")
    assert scheme.startswith("sqlite"), url
    with sqlite3.connect(path) as source, sqlite3.connect(home / "prefect.db") as copy:
        source.backup(copy)
    return _env(PREFECT_HOME=str(home),
                PREFECT_SERVER_DATABASE_CONNECTION_URL=f"{scheme}:///{home / 'prefect.db'}")


# -- processes -----------------------------------------------------------------------------


def _proc_table():
    """{pid: (ppid, state, start)} of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def _tree(pid):
    """The process ``pid`` and its descendants, as (pid, start time) pairs."""
    table = _proc_table()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in table:
            found.append((p, table[p][2]))
            todo += [c for c, (ppid, _, _) in table.items() if ppid == p]
    return found


def _alive(processes):
    """Those of ``processes`` still running (a zombie runs nothing; a reused id is another)."""
    table = _proc_table()
    return [(p, s) for p, s in processes if p in table and table[p][2] == s and table[p][1] not in "ZX"]


def _listening(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _Command:
    """A command run as a process of its own (its own process group, as a terminal's job),
    its merged output read as it comes."""

    def __init__(self, argv, env):
        import threading

        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self):
        return self.proc.pid

    def wait_for(self, pattern, timeout=240):
        """The first line matching ``pattern``; fails if the command ends or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} (exit {self.proc.poll()}): "
                             f"{self.lines[-30:]}")

    def wait(self, timeout):
        status = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return status

    @property
    def output(self):
        return "\n".join(self.lines)

    def api_port(self):
        """The port of the local Prefect API the command started (as Prefect logs it)."""
        line = self.wait_for(r"temporary server on http://127\.0\.0\.1:\d+", timeout=1)
        return int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))

    def end(self, processes=()):
        """Kill what is left of the command (the test failed midway)."""
        for pid, _ in _alive([*processes, *(_tree(self.pid) if self.proc.poll() is None else [])]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


@pytest.mark.skipif(not LINUX, reason="the guard is the kernel's parent-death signal (Linux)")
def test_kill_9_of_a_run_leaves_no_process_and_no_listener(data, local_api_env, tmp_path):
    run = _Command([*_command(), "impute", data["good"], str(tmp_path / "out"), "--id", "rid",
                    "-k", "2", "--tol", "1e-300", "--max-iter", "100000"],  # fits until killed
                   local_api_env)
    processes = []
    try:
        run.wait_for(r"fitting")  # the local API and the cluster run
        port = run.api_port()
        processes = _tree(run.pid)
        assert len(processes) >= 3, processes  # the command, its Prefect API, Dask workers
        assert _listening(port)
        assert run.proc.poll() is None  # mid-run: the fit, writing and commit take seconds
        os.kill(run.pid, signal.SIGKILL)  # the command alone, not its process group
        run.wait(timeout=30)
        assert "published" not in run.output
        deadline = time.monotonic() + 10
        while (_alive(processes) or _listening(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(processes), f"survived the kill: {_alive(processes)}"
        assert not _listening(port), f"port {port} of the run's Prefect API still listens"
    finally:
        run.end(processes)


def _request(method, url, **kwargs):
    """An API request, tried again while the API says it is busy (503: its SQLite database
    is locked by another write), as Prefect's own client does."""
    import httpx

    deadline = time.monotonic() + 60
    while True:
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response.raise_for_status()
        time.sleep(0.5)


@pytest.mark.skipif(not LINUX, reason="the guard is the kernel's parent-death signal (Linux)")

def _long_fit_deployment(tmp_path, data, name):
    """A ``prefect.yaml`` serving one impute deployment whose fit runs until stopped."""
    config = tmp_path / "prefect.yaml"
    config.write_text(textwrap.dedent(f"""
        deployments:
          - name: {name}
            entrypoint: pipelines.impute:impute_survey
            parameters:
              source: {data["good"]}
              dest: {tmp_path / "out"}
              id_column: rid
              n_components: 2
              tol: 1.0e-300
              max_iter: 100000
        """))
    return config


def _run_until_fitting(serve, name):
    """Start a run of the served deployment ``name`` through the API; return once it fits."""
    serve.wait_for(r"being served")
    api = f"http://127.0.0.1:{serve.api_port()}/api"
    deployment = _request("GET", f"{api}/deployments/name/impute-survey/{name}").json()
    _request("POST", f"{api}/deployments/{deployment['id']}/create_flow_run", json={})
    serve.wait_for(r"fitting")  # the flow run fits, on a local cluster of its own


def test_ctrl_c_stops_serve_within_seconds_even_mid_run(data, local_api_env, tmp_path):
    """Ctrl-C reaches the whole process group, as from a terminal, while a flow run fits."""
    config = _long_fit_deployment(tmp_path, data, "ctrl-c")
    env = {**local_api_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serve = _Command([*_command(), "serve", "--config", str(config)], env)
    processes = []
    try:
        _run_until_fitting(serve, "ctrl-c")
        processes = _tree(serve.pid)
        started = time.monotonic()
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in a terminal
        status = serve.wait(timeout=60)
        seconds = time.monotonic() - started
        assert status == 130, serve.output[-3000:]
        assert "Traceback" not in serve.output, serve.output[-5000:]
        assert "emdask serve: interrupted" in serve.output
        assert not re.search(r"Flow run .* Finished in state Completed", serve.output)  # mid-run
        assert seconds < 20, f"took {seconds:.1f} s to stop"  # a few seconds; was over 60
        deadline = time.monotonic() + 10
        while _alive(processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(processes), f"left running: {_alive(processes)}"
    finally:
        serve.end(processes)


def _listeners(processes):
    """The TCP ports ``processes`` listen on."""
    import psutil

    ports = set()
    for pid, _ in _alive(processes):
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        ports |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return ports


@pytest.mark.skipif(not LINUX, reason="the guard is the kernel's parent-death signal (Linux)")
def test_kill_9_of_serve_ends_its_flow_runs(data, local_api_env, tmp_path):
    """'emdask serve' killed outright: the flow run it started, its Dask cluster and the local
    API stop within 10 s, and nothing of them listens any more."""
    config = _long_fit_deployment(tmp_path, data, "kill-9")
    env = {**local_api_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serve = _Command([*_command(), "serve", "--config", str(config)], env)
    processes = []
    try:
        _run_until_fitting(serve, "kill-9")
        processes = _tree(serve.pid)
        runs = [p for p in processes if p[0] != serve.pid]
        assert runs, processes
        ports = _listeners(runs)
        assert ports  # the run's Dask scheduler and workers, the local API
        os.kill(serve.pid, signal.SIGKILL)  # serve alone: its children get no signal
        serve.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (_alive(processes) or any(_listening(p) for p in ports)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(processes), f"left running: {_alive(processes)}"
        assert not [p for p in ports if _listening(p)]
        assert not (tmp_path / "out" / "CURRENT").exists()  # nothing published
    finally:
        serve.end(processes)


# -- checks before any service ---------------------------------------------------------------


@pytest.fixture()
def tripwires(monkeypatch):
    """Starting a Prefect API, a flow run or a Dask cluster fails the test."""
    import distributed
    import prefect.flows
    from prefect.server.api import server

    import pipelines.lifecycle

    started = []

    def tripwire(what):
        def start(*args, **kwargs):
            started.append(what)
            raise AssertionError(f"{what} started")
        return start

    monkeypatch.setattr(pipelines.lifecycle, "start_local_api", tripwire("Prefect API"))
    monkeypatch.setattr(server.SubprocessASGIServer, "start", tripwire("Prefect API"))
    monkeypatch.setattr(prefect.flows.Flow, "__call__", tripwire("flow run"))
    monkeypatch.setattr(distributed.LocalCluster, "__init__", tripwire("Dask cluster"))
    monkeypatch.setattr(distributed.Client, "__init__", tripwire("Dask client"))
    return started


def test_what_metadata_tells_is_checked_before_any_service(data, tmp_path, tripwires, capsys):
    out = str(tmp_path / "out")
    cases = [
        ([data["good"], data["garbage"], "--id", "rid"],
         f"{data['garbage']}/CURRENT does not name a version"),
        ([data["good"], out, "--id", "nope"], "id column 'nope' is not in the table"),
        ([data["good"], out, "--id", "rid", "--columns", "x,w"], "['w'] not in the table"),
        ([data["dated"], out, "--id", "rid", "--columns", "x,when"], "['when'] have types no model takes"),
        ([data["mixed"], out, "--id", "rid"], "column 'x' is double in a.parquet but "),
        ([data["empty"], out, "--id", "rid"], "is an empty table (0 rows)"),
        ([data["good"], out, "--id", "rid", "--dask-address", "tcp://127.0.0.1:1"],
         "no Dask scheduler answers at tcp://127.0.0.1:1"),
    ]
    garbage = tree_digest(data["garbage"])
    for argv, message in cases:
        status = main(["impute", *argv])
        err = capsys.readouterr().err.strip()
        assert status == 2, (argv, err)
        assert err.count("\n") == 0 and err.startswith("emdask impute: error: "), err
        assert message in err, err
        assert not tripwires, (argv, tripwires)
        assert not Path(out).exists()
    assert tree_digest(data["garbage"]) == garbage
    status = main(["segment", data["good"], out, "--id", "rid", "--features", "x,nope"])
    assert status == 2 and "['nope'] not in the table" in capsys.readouterr().err


def test_an_unreachable_scheduler_is_one_line_naming_it(data, tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [*_command(), "impute", data["good"], str(tmp_path / "out"), "--id", "rid"],
        cwd=REPO, env=_env(DASK_SCHEDULER_ADDRESS="tcp://127.0.0.1:1"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    # one line: no Prefect API was started (Prefect would have logged it), no flow ran
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "tcp://127.0.0.1:1 (from $DASK_SCHEDULER_ADDRESS)" in done.stderr
    assert time.monotonic() - started < 60  # refused at once, not after a connect timeout
    assert not (tmp_path / "out").exists()


def test_what_needs_the_data_is_checked_in_the_first_pass(data, prefect_api, dask_address, tmp_path):
    done = subprocess.run(
        [*_command(), "impute", data["dup"], str(tmp_path / "out"), "--id", "rid",
         "--dask-address", dask_address],
        cwd=REPO, env=_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("emdask impute: error: id column 'rid' is not unique"), last
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "fitting" not in done.stdout + done.stderr  # before any fit
    assert not (tmp_path / "out").exists()


def test_only_io_errors_are_retried():
    import errno

    from prefect.states import Failed

    from pipelines.errors import InputError, ValidationError
    from pipelines.tasks import _retry_io_errors, io_task
    from pipelines.versions import ConcurrentCommitError

    @io_task
    def read():
        pass

    assert read.retries > 0 and read.retry_condition_fn is _retry_io_errors
    for exc in (InputError("bad"), ValidationError("bad"), ConcurrentCommitError("moved"),
                ValueError("bug"), KeyError("bug"), FileNotFoundError("gone"),
                PermissionError("denied"), OSError(errno.ENOSPC, "No space left on device")):
        assert not _retry_io_errors(read, None, Failed(data=exc)), exc
    for exc in (ConnectionResetError("reset"), TimeoutError("slow"), OSError(errno.EIO, "I/O error")):
        assert _retry_io_errors(read, None, Failed(data=exc)), exc


# -- publishing -----------------------------------------------------------------------------


def _publish(dest, key, text):
    with dest.new_version(key) as version:
        (version.local / "data.txt").write_text(text)
        return version.commit({"run_key": key})


def _assert_published_once(root, name):
    pointer = (root / "CURRENT").read_text().split()
    assert pointer.count(name) == 1 and pointer[0] == name
    on_disk = sorted(p.name for p in (root / "versions").iterdir())
    assert sorted(set(pointer)) == on_disk  # no unpublished version left
    for each in on_disk:  # every version CURRENT names is whole
        assert json.loads((root / "versions" / each / "manifest.json").read_text())["version"] == each
    assert versions.open_destination(str(root)).published().name == name


def test_a_failed_write_of_current_publishes_once_when_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(versions.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = tmp_path / "dest"
    dest = versions.open_destination(str(root))
    first = _publish(dest, "a" * 64, "one")
    swap = versions.FolderDestination._swap_pointer
    faults = []

    def failing(self, text, token):  # the write of CURRENT fails, after the version is in place
        if faults:
            raise OSError(faults.pop())
        return swap(self, text, token)

    def applied_then_failing(self, text, token):  # took effect, but the store said it failed
        swap(self, text, token)
        raise TimeoutError("no answer from the store")

    monkeypatch.setattr(versions.FolderDestination, "_swap_pointer", failing)
    # a run whose commit fails cleans up; the next run starts over and publishes
    faults.append("Input/output error")
    with pytest.raises(OSError, match="Input/output error"):
        _publish(dest, "b" * 64, "two")
    _assert_published_once(root, first.name)
    second = _publish(dest, "b" * 64, "two")
    _assert_published_once(root, second.name)
    # a commit repeated after the failure (a task retry) completes the same version
    with dest.new_version("c" * 64) as version:
        (version.local / "data.txt").write_text("three")
        faults.append("Input/output error")
        with pytest.raises(OSError):
            version.commit({"run_key": "c" * 64})
        third = version.commit({"run_key": "c" * 64})
    _assert_published_once(root, third.name)
    # a write that took effect though it reported a failure: published, never removed
    monkeypatch.setattr(versions.FolderDestination, "_swap_pointer", applied_then_failing)
    fourth = _publish(dest, "d" * 64, "four")
    _assert_published_once(root, fourth.name)
    assert (root / "versions" / fourth.name / "data.txt").read_text() == "four"
    assert not list((tmp_path / "tmp").iterdir())  # no staging folder left


def test_the_next_run_removes_what_a_run_killed_while_publishing_left(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(versions.tempfile, "tempdir", str(tmp))
    root = tmp_path / "dest"
    dest = versions.open_destination(str(root))
    first = _publish(dest, "a" * 64, "one")
    crash = textwrap.dedent(f"""
        import os, signal
        import pipelines.versions as versions

        def killed(self, text, token):  # SIGKILL at the write of CURRENT
            os.kill(os.getpid(), signal.SIGKILL)

        versions.FolderDestination._swap_pointer = killed
        dest = versions.open_destination({str(root)!r})
        with dest.new_version("b" * 64) as version:
            (version.local / "data.txt").write_text("two")
            version.commit({{"run_key": "b" * 64}})
        """)
    done = subprocess.run([sys.executable, "-c", crash], cwd=REPO, env=_env(TMPDIR=str(tmp)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p for p in (root / "versions").iterdir() if p.name != first.name]
    assert len(left) == 1 and (left[0] / "manifest.json").exists()  # whole, not published
    assert len(list(tmp.iterdir())) == 1  # and its staging folder
    with dest.new_version("c" * 64) as alive:  # a run of this process, still writing
        (alive.local / "data.txt").write_text("three")
        second = _publish(versions.open_destination(str(root)), "b" * 64, "two")
        assert not left[0].exists()  # the killed run's version is gone
        assert (root / "versions" / alive.name).exists()  # a living run's is not
        assert sorted(p.name for p in tmp.iterdir()) == [alive.staging.name]
        third = alive.commit({"run_key": "c" * 64})
    _assert_published_once(root, third.name)
    assert second.name in (root / "CURRENT").read_text().split()
    assert not list(tmp.iterdir())
