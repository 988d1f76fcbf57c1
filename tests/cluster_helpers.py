"""Real Dask clusters for tests: scheduler and worker processes on 127.0.0.1.

They are started the way a deployment starts them (``dask scheduler`` / ``dask worker``
command lines, a scheduler file, memory limits, one thread per worker), each in a process
group of its own so that a test can kill one worker (with or without its nanny) and the
fixture can always stop everything it started.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from distributed.diagnostics.plugin import WorkerPlugin

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
LOOPBACK = "127.0.0.1"
DASK = [sys.executable, "-m", "dask"]


# --------------------------------------------------------------------------------------
# TLS certificates
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a certificate authority and one certificate it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def security(self, **kwargs):
        from distributed.security import Security

        return Security(
            tls_ca_file=str(self.ca_file),
            tls_client_cert=str(self.cert_file),
            tls_client_key=str(self.key_file),
            tls_scheduler_cert=str(self.cert_file),
            tls_scheduler_key=str(self.key_file),
            tls_worker_cert=str(self.cert_file),
            tls_worker_key=str(self.key_file),
            require_encryption=True,
            **kwargs,
        )


def make_certificates(directory, name="emdask-test"):
    """A fresh CA and a certificate for 127.0.0.1/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TLSFiles(directory / "ca.pem", directory / "node.pem", directory / "node-key.pem")
    files.ca_file.write_bytes(ca_cert.public_bytes(pem))
    files.cert_file.write_bytes(cert.public_bytes(pem))
    files.key_file.write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key_file.chmod(0o600)
    return files


def tls_environment(tls):
    """TLS settings of every Dask process as environment variables, as
    deploy/docker-compose.tls.yml sets them."""
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME": "tls",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tls.ca_file),
        "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT": str(tls.cert_file),
        "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY": str(tls.key_file),
        "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": str(tls.cert_file),
        "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": str(tls.key_file),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tls.cert_file),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tls.key_file),
    }


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def machine_report(top=8, interval=0.5):
    """Load, free memory and disk, and the processes using the most CPU now (over
    ``interval`` s, with their command lines): when a cluster does not start, whether the
    machine itself was the cause."""
    import shutil

    import psutil

    lines = [
        f"load average {tuple(round(x, 2) for x in os.getloadavg())}, "
        f"{psutil.virtual_memory().available >> 20} MiB available, "
        f"{shutil.disk_usage(TESTS_DIR).free >> 20} MiB free on disk, "
        f"{len(psutil.pids())} processes",
    ]
    procs = list(psutil.process_iter())
    for proc in procs:
        try:
            proc.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    busy = []
    for proc in procs:
        try:
            with proc.oneshot():
                busy.append((proc.cpu_percent(None), proc.memory_info().rss >> 20, proc.pid,
                             " ".join(proc.cmdline())[:160]))
        except psutil.Error:
            continue
    for cpu, rss, pid, cmd in sorted(busy, reverse=True)[:top]:
        lines.append(f"pid {pid}: {cpu:.0f}% CPU, {rss} MiB: {cmd}")
    return "\n".join(lines)


def _signal_group(proc):
    """SIGTERM a process group (a Dask process and its children), as a service manager would."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _reap_group(proc, grace):
    """Wait for the group leader; SIGKILL whatever is left of the group after ``grace`` s."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # the group may hold children (the worker under its nanny) after the leader exits
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def group_members(pgid):
    """Live (not zombie) processes of a process group."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def group_alive(pgid, wait=5.0):
    """Whether a process of the group is still running ``wait`` seconds from now at most."""
    deadline = time.monotonic() + wait
    while group_members(pgid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False


class ProcessCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1.

    Use as a context manager; leaving it stops every process it started (SIGTERM to each
    process group, SIGKILL after a grace period), even when the test failed.

    Parameters
    ----------
    workdir : path
        Scheduler file, logs and worker scratch space go there.
    n_workers : int
    memory_limit : str
        Per worker, as ``dask worker --memory-limit`` takes it.
    nanny : bool
        Run workers under a nanny, which restarts a worker process that dies.
    tls : TLSFiles, optional
        Require TLS: the scheduler and workers use these certificates, given to them in
        environment variables as the compose file does.
    env : dict, optional
        Variables added to the environment of every process started.
    worker_env : dict, optional
        Variables added to the environment of the workers only (their own configuration,
        such as an object store's endpoint and credentials).
    own_dirs : bool
        Give each process a directory of its own, as separate machines would have:
        ``workdir/NAME/`` holds ``cwd/`` (its working directory, empty when it starts),
        ``tmp/`` (its ``TMPDIR``, and a worker's local directory) and ``home/`` (its
        ``HOME``). The scheduler writes its scheduler file in its own directory and the
        workers are given its address, so that no path is shared between the processes.
    """

    def __init__(self, workdir, n_workers=2, memory_limit="1GiB", nthreads=1, nanny=True,
                 tls=None, start_timeout=60, env=None, worker_env=None, own_dirs=False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_workers = n_workers
        self.memory_limit = memory_limit
        self.nthreads = nthreads
        self.nanny = nanny
        self.tls = tls
        self.start_timeout = start_timeout
        self.own_dirs = own_dirs
        self.worker_env = dict(worker_env or {})
        self.scheduler_file = (self.process_dir("scheduler") if own_dirs else self.workdir) / "scheduler.json"
        self.scheduler = None
        self.workers = {}  # name -> Popen
        self.env = dict(os.environ)
        # Workers unpickle functions defined in this directory (plugins used by tests).
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), str(REPO_ROOT)] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else [])
        )
        if tls is not None:
            self.env.update(tls_environment(tls))
        self.env.update(env or {})

    def process_dir(self, name):
        """The directory of the process ``name`` (``scheduler``, ``w0``, ...) with ``own_dirs``."""
        return self.workdir / name

    # -- command lines --------------------------------------------------------------------

    def scheduler_command(self):
        return DASK + [
            "scheduler",
            "--host", LOOPBACK,
            "--port", "0",
            "--dashboard-address", f"{LOOPBACK}:0",
            "--scheduler-file", str(self.scheduler_file),
            "--idle-timeout", "900s",  # a safety net should a test runner die without cleanup
        ] + (["--protocol", "tls"] if self.tls is not None else [])

    def worker_command(self, name):
        if self.own_dirs:  # the scheduler's address, not a path it wrote
            where = [self.address]
            local = self.process_dir(name) / "tmp"
        else:
            where = ["--scheduler-file", str(self.scheduler_file)]
            local = self.workdir / name
        return DASK + [
            "worker",
            *where,
            "--host", LOOPBACK,
            "--dashboard-address", f"{LOOPBACK}:0",
            "--nthreads", str(self.nthreads),
            "--memory-limit", str(self.memory_limit),
            "--name", name,
            "--local-directory", str(local),
            "--death-timeout", "60s",
            "--nanny" if self.nanny else "--no-nanny",
        ]

    def _popen(self, command, log_name, extra_env=None):
        env, cwd = dict(self.env), self.workdir
        env.update(extra_env or {})
        if self.own_dirs:
            base = self.process_dir(log_name)
            cwd = base / "cwd"
            for sub in ("cwd", "tmp", "home"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            env.update(TMPDIR=str(base / "tmp"), HOME=str(base / "home"))
        log = open(self.workdir / f"{log_name}.log", "ab")
        try:
            return subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )
        finally:
            log.close()

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        try:
            self.scheduler = self._popen(self.scheduler_command(), "scheduler")
            deadline = time.monotonic() + self.start_timeout
            while not self._scheduler_file_ready():
                if self.scheduler.poll() is not None:
                    raise RuntimeError(f"dask scheduler exited early:\n{self.report()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dask scheduler did not start:\n{self.report()}")
                time.sleep(0.05)
            for i in range(self.n_workers):
                self.add_worker(f"w{i}")
            try:
                self.wait_for_workers(self.n_workers)
            except Exception as exc:
                raise RuntimeError(
                    f"{self.n_workers} dask workers did not join the scheduler within "
                    f"{self.start_timeout} s ({exc!r})\n{self.report()}"
                ) from exc
        except BaseException:
            self.stop()
            raise
        return self

    def report(self):
        """The end of every process's log, and what else runs on this machine: what a
        cluster that did not start needs to be understood from a test run's output."""
        names = (["scheduler"] if self.scheduler else []) + list(self.workers)
        logs = "\n".join(f"--- {name}.log\n{self.log(name, tail=2000)}" for name in names)
        return f"{logs}\n--- this machine\n{machine_report()}"

    def _scheduler_file_ready(self):
        try:
            return bool(json.loads(self.scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            return False

    def add_worker(self, name):
        self.workers[name] = self._popen(self.worker_command(name), name, self.worker_env)

    @property
    def address(self):
        return json.loads(self.scheduler_file.read_text())["address"]

    def security(self):
        return self.tls.security() if self.tls is not None else None

    def client(self, **kwargs):
        from emdask.engine.cluster import connect

        return connect(self.address, timeout=30, security=self.security(), **kwargs)

    def wait_for_workers(self, n, timeout=None):
        with self.client(set_as_default=False) as client:
            client.wait_for_workers(n, timeout=timeout or self.start_timeout)

    def stop(self, grace=10.0):
        procs = list(self.workers.values()) + ([self.scheduler] if self.scheduler else [])
        for proc in procs:
            _signal_group(proc)
        for proc in procs:
            _reap_group(proc, grace)

    def leftovers(self, wait=5.0):
        """Process groups started here with a process still running after ``wait`` seconds
        (none once stopped)."""
        return [group for group in self.process_groups() if group_alive(group, wait)]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- inspection and faults --------------------------------------------------------------

    def log(self, name, tail=4000):
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def process_groups(self):
        procs = list(self.workers.values()) + ([self.scheduler] if self.scheduler else [])
        return [p.pid for p in procs]

    def pids(self):
        """Every live process of every group started here (nannies, workers, trackers)."""
        import psutil

        groups = set(self.process_groups())
        out = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) in groups:
                    out.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return out

    def listening_addresses(self):
        """(ip, port) of every socket listening in a process started here."""
        import psutil

        found = []
        for pid in self.pids():
            try:
                conns = psutil.Process(pid).net_connections("inet")
            except psutil.Error:
                continue
            found += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        return found

    def kill_node(self, name):
        """SIGKILL a worker's whole process group (nanny and worker): a machine lost."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def task_prefix(key):
    """The function name a task key starts with: ``'_em_chunk'`` for ``'_em_chunk-<uuid>'``,
    ``'read_parquet'`` for ``('read_parquet-<token>', 3)``."""
    if isinstance(key, tuple):
        key = key[0]
    return str(key).split("-", 1)[0]


def worker_addresses_by_name(client):
    return {w["name"]: addr for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}


# --------------------------------------------------------------------------------------
# Killing at a chosen moment of a pass
# --------------------------------------------------------------------------------------


class KillWhenRunning(threading.Thread):
    """Once armed, SIGKILL a worker's process group (nanny and worker) while a task with the
    given key prefix is running on it: a machine lost in the middle of a pass.

    Polling the scheduler can miss tasks that take milliseconds, so the worker itself marks
    the moment: armed (:meth:`arm`, called between two passes: ``_arm`` with a ``hold``
    token, on that worker only), the next such task to start writes the token file and holds
    its start until the kill. ``seen`` holds the key of that task.
    """

    def __init__(self, cluster, worker_name, prefix, timeout=120):
        super().__init__(daemon=True, name=f"kill-{worker_name}")
        self.cluster = cluster
        self.worker_name = worker_name
        self.prefix = prefix
        self.timeout = timeout
        self.token = Path(cluster.workdir) / f"held-{worker_name}"
        self.address = None
        self.registered = threading.Event()
        self.armed = threading.Event()
        self.done = threading.Event()
        self.seen = ()
        self.error = None

    def arm(self, client):
        """Arm the worker, from the fit's own client (a callback between two passes), so
        that the next pass's first such task on it is held: no race with the fit."""
        if not self.registered.wait(self.timeout):
            raise TimeoutError("the killer never registered its worker plugin")
        client.run(_arm, self.prefix, str(self.token), True, workers=[self.address])
        self.armed.set()

    def run(self):
        try:
            with self.cluster.client(set_as_default=False) as client:
                client.register_plugin(self_kill_plugin())
                self.address = worker_addresses_by_name(client)[self.worker_name]
                self.registered.set()
                if not self.armed.wait(self.timeout):
                    return
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline:
                    if self.token.exists() and self.token.stat().st_size:
                        self.cluster.kill_node(self.worker_name)
                        self.seen = (self.token.read_text().split(" ", 1)[1],)
                        return
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()


_ARMED = None  # (key prefix, token path, hold) on an armed worker process
HOLD_SECONDS = 120  # how long a held task start waits for the kill


def _arm(prefix, token, hold=False):
    """Run on workers: the next task with this key prefix that starts on one of them kills
    that worker process — on one worker only, the first to create the ``token`` file (it
    writes its pid and the task key there). With ``hold``, the worker does not kill itself:
    it holds the task's start until something else kills it."""
    global _ARMED
    _ARMED = (prefix, token, hold)
    return os.getpid()


def _kill_if_armed(prefix, key):
    """The armed action (see ``_arm``) if ``prefix`` is the armed one."""
    global _ARMED
    if _ARMED is None or prefix != _ARMED[0]:
        return
    _, token, hold = _ARMED
    _ARMED = None
    try:
        fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:  # another worker went first
        return
    os.write(fd, f"{os.getpid()} {key}".encode())
    os.close(fd)
    if hold:
        time.sleep(HOLD_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


class SelfKillOnTask(WorkerPlugin):
    """When armed (``_arm``), SIGKILL the worker process the moment a task whose key starts
    with the armed prefix begins executing on it: a worker dying mid-pass, at an exact point
    (or, with ``hold``, stop there and wait to be killed from outside). A resident pass
    (blocks worked on by the worker's helper, not by tasks) counts as a task named after its
    chunk function, keyed ``<chunk>-resident``. A restarted worker gets the plugin again,
    unarmed."""

    name = "emdask-test-self-kill"

    def setup(self, worker):
        from emdask.engine import resident

        inner = resident.chunk_group
        if getattr(inner, "armed_kill", False):
            return

        def chunk_group(chunk, indices, blocks, args):
            name = getattr(chunk, "__name__", "chunk")
            _kill_if_armed(name, f"{name}-resident")
            return inner(chunk, indices, blocks, args)

        chunk_group.armed_kill = True
        resident.chunk_group = chunk_group

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing":
            _kill_if_armed(task_prefix(key), key)


def self_kill_plugin():
    return SelfKillOnTask()


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def mixture_table(n_rows, n_features=6, k=3, seed=0, missing=0.0):
    """Rows from a k-component Gaussian mixture, with an ``id`` column."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 4.0, (k, n_features))
    labels = rng.integers(0, k, n_rows)
    X = centers[labels] + rng.normal(0.0, 1.0, (n_rows, n_features))
    if missing:
        X[rng.random(X.shape) < missing] = np.nan
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(n_features)])
    frame.insert(0, "id", np.arange(n_rows, dtype=np.int64))
    return frame


def write_parquet_parts(frame, directory, n_parts):
    """One Parquet file per partition, in order: ``part-00000.parquet``, ..."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(frame), n_parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        frame.iloc[a:b].to_parquet(directory / f"part-{i:05d}.parquet", index=False)
    return directory
