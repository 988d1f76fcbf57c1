"""Destinations: where a flow publishes, one new version per run, made visible by one step.

A destination is named by a URL:

=========================================================  ===========================================
form                                                       a new version is
=========================================================  ===========================================
``PATH``, ``file://PATH``, ``s3://``, ``gs://``,           a folder ``versions/NAME/`` under it, made
``abfs://``, any fsspec URL                                visible by a conditional write of ``CURRENT``
``iceberg://CATALOG/NAMESPACE.TABLE``                      a snapshot of the table (created if missing),
                                                           committed in one catalog transaction
a path or URL holding ``_delta_log/`` (``delta+URL`` for   a table version, committed atomically
a new table)
=========================================================  ===========================================

Every flow goes through one context manager::

    with destination.new_version(key, keep_versions=5) as version:
        ...                                  # workers write version.table_url(NAME) (Parquet)
        ...                                  # the flow writes small files into version.local
        version.commit(manifest)             # validate first; this is the one visible step

Leaving the block without a commit (an error, a failed validation, an interrupt) removes
everything the run wrote; the published version stays as it was. A process killed outright
leaves files that nothing references: its staging folder (small files, on the flow process's
disk) and its version (a version folder, or a table's data folder and sidecar). Each run marks
both with who writes them (:data:`RUN_MARK`: machine, process and its start time), and the next
run on the destination removes the leftovers of runs that have ended: at once when that run was
on the same machine (its process is gone), else once nothing was written in them for
:data:`STALE_AFTER` seconds.

A commit is idempotent: one whose visible step failed, or failed to say whether it took
effect, can be repeated; it finds the version already published, or publishes it. A version
that the destination publishes is never removed by a failed run's clean-up.

Folder layout (local disk and object stores alike)::

    DEST/
      CURRENT                 the published version's name, then the names published before it
      versions/NAME/          manifest.json (written last), data tables, model/, plots;
                              .emdask-run while it is being written
      .checkpoints/KEY/       (local destinations) the EM state of a run still fitting

``CURRENT`` is replaced by compare-and-swap: ``os.replace`` under a file lock on the local
disk, a write conditional on the object's ETag (S3 ``If-Match`` / ``If-None-Match``) or
generation (GCS) on object stores. A publisher that loses the race reads the pointer again and
retries, so two runs publishing at once both keep their version and its place in the history.

Table destinations keep the same sidecar (manifest, model, plots, extra tables) under the
table's location in ``_emdask/versions/NAME/``; the snapshot (or commit) records the version's
name and run key in its properties, so the table itself says which run made each snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import InputError, ValidationError, one_line, redact
from .lifecycle import signals_deferred
from .sources import (
    delta_storage_options,
    filesystem,
    is_local,
    load_iceberg_catalog,
    parse_iceberg_url,
    _is_local_fs,
    _local_path,
    _location_pair,
    _protocol,
    _url,
)

__all__ = [
    "CURRENT",
    "ConcurrentCommitError",
    "Destination",
    "MANIFEST",
    "Published",
    "RUN_MARK",
    "STAGING_PREFIX",
    "Version",
    "open_destination",
    "run_key",
]

CURRENT = "CURRENT"
VERSIONS = "versions"
CHECKPOINTS = ".checkpoints"
SIDECAR = "_emdask"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "emdask-dataset-version"
#: Idle time (seconds) after which an unreferenced version of a run on another machine (or of
#: one that left no mark) is taken as left by a killed run.
STALE_AFTER = 6 * 3600
#: File naming the process that writes a version or a staging folder (JSON).
RUN_MARK = ".emdask-run"
#: Name prefix of the staging folders of versions being written (in the temporary directory).
STAGING_PREFIX = "emdask-staging-"
#: Staging folders of earlier releases: ``emdask-NAME-XXXX``.
_OLD_STAGING = re.compile(r"^emdask-\d{8}T\d{12}Z-[0-9a-f]{8}-")
#: A run marks its staging folder as it makes it: one left unmarked this long was abandoned.
_UNMARKED_STAGING_AFTER = 60
_VERSION_NAME = re.compile(r"^(\d{8}T\d{12})Z-[0-9a-f]{8}$")
_SWAP_ATTEMPTS = 20


class ConcurrentCommitError(RuntimeError):
    """Another run changed the destination between this run's start and its commit."""


def run_key(flow_name, parameters, source_identity, library_version):
    """Digest of everything that determines a run's output.

    A source that offers no stable identity (``None``) gets a fresh token: every run computes.
    """
    if source_identity is None:
        source_identity = {"unversioned": os.urandom(16).hex()}
    document = {"flow": flow_name, "parameters": parameters, "source": source_identity,
                "emdask": library_version}
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def version_name(key):
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%f}Z-{key[:8]}"


def _name_age(name):
    m = _VERSION_NAME.match(name)
    if not m:
        return None
    made = datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - made).total_seconds()


def _proc_stat(pid):
    """(state, start time in clock ticks since boot) of a process from ``/proc``; None when
    there is no such process; raises OSError where ``/proc`` cannot tell."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            raise
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[19])


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def run_mark():
    """Who writes a version: this machine, this boot, this process and when it started."""
    try:
        start = _proc_stat(os.getpid())[1]
    except (OSError, TypeError, ValueError, IndexError):
        start = None
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid_namespace": _pid_namespace(),
            "pid": os.getpid(), "start": start}


def _run_state(mark):
    """``"ended"``, ``"running"`` or None (this process cannot tell) for the run a
    :func:`run_mark` names.

    Only a process of the same machine, boot and process namespace can be told: it has ended
    when it is gone, a zombie, or its id names another process now. Another machine or
    container, or a system without ``/proc``, cannot tell.
    """
    if not isinstance(mark, dict) or mark.get("host") != socket.gethostname():
        return None
    boot, namespace = _boot_id(), _pid_namespace()
    if boot is None or namespace is None or mark.get("boot") != boot \
            or mark.get("pid_namespace") != namespace:
        return None
    try:
        found = _proc_stat(int(mark["pid"]))
    except (KeyError, TypeError, ValueError, OSError, IndexError):
        return None
    if found is None:
        return "ended"
    state, start = found
    if mark.get("start") is not None and start != mark["start"]:
        return "ended"  # the id names another process now
    return "ended" if state in ("Z", "X") else "running"


def _mark_bytes():
    return json.dumps(run_mark()).encode()


def _read_mark(fs, path):
    try:
        return json.loads(fs.cat_file(path))
    except Exception:  # no mark (a run of an earlier release, or killed before writing it)
        return None


def _sweep_staging(root=None):
    """Remove the staging folders of ended runs (on this machine's temporary directory)."""
    root = Path(root or tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for path in entries:
        if not path.is_dir():
            continue
        if path.name.startswith(STAGING_PREFIX):
            try:
                mark = json.loads((path / RUN_MARK).read_text())
            except (OSError, ValueError):
                mark = None
            idle_after = STALE_AFTER if mark is not None else _UNMARKED_STAGING_AFTER
        elif _OLD_STAGING.match(path.name):
            mark, idle_after = None, STALE_AFTER
        else:
            continue
        state = _run_state(mark)
        if state is not None:
            gone = state == "ended"
        else:  # another machine's (a shared temporary directory), or unmarked
            try:
                gone = _local_idle_for(path) > idle_after
            except OSError:
                gone = False
        if gone:
            shutil.rmtree(path, ignore_errors=True)


def _local_idle_for(path):
    newest = path.stat().st_mtime
    for child in path.rglob("*"):
        with contextlib.suppress(OSError):
            newest = max(newest, child.stat().st_mtime)
    return time.time() - newest


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def manifest_text(name, manifest):
    document = {"format": MANIFEST_FORMAT, "version": name, **manifest}
    return json.dumps(document, indent=2, default=_json_default) + "\n"


# --------------------------------------------------------------------------------------
# What a publish leaves: a version to read
# --------------------------------------------------------------------------------------


@dataclass
class Published:
    """A published version: its name, where its files are, and its manifest."""

    name: str
    url: str  # the version's folder (sidecar folder for tables)
    manifest: dict
    table: str | None = None  # the table URL, for table destinations
    storage_options: dict = field(default_factory=dict, repr=False)

    def join(self, relative):
        """URL (or local path) of a file of the version."""
        return posixpath.join(self.url, relative) if "://" in self.url else str(Path(self.url) / relative)


# --------------------------------------------------------------------------------------
# A version being written
# --------------------------------------------------------------------------------------


class Version:
    """A new version being written: where its tables and files go, and its commit.

    Attributes
    ----------
    name : str
        ``YYYYmmddTHHMMSSffffffZ-KEY8``.
    local : pathlib.Path
        Scratch folder of the flow process for small files (model, plots, profile); copied
        into the version at the commit. It lies in the run's staging folder
        (``$TMPDIR/emdask-staging-NAME-*``), marked with :data:`RUN_MARK`.
    storage_options : dict
        fsspec options for writing :meth:`table_url` from the workers.
    """

    def __init__(self, destination, key, keep_versions):
        self.destination = destination
        self.key = key
        self.keep_versions = max(1, int(keep_versions))
        self.name = version_name(key)
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.name}-"))
        (self.staging / RUN_MARK).write_bytes(_mark_bytes())
        self.local = self.staging / "files"
        self.local.mkdir()
        self.storage_options = destination.storage_options
        self.published = None
        self.base = None  # what the destination held when the version started
        self._tables = {}

    @property
    def url(self):
        """Folder of the version's files (the sidecar folder for table destinations)."""
        return self.destination._version_url(self.name)

    def table_url(self, name, primary=False):
        """Where the workers write the Parquet table ``name`` (``part.N.parquet`` files).

        ``primary`` marks the table a table destination commits; the others stay in the
        version's folder.
        """
        url = self.destination._table_url(self, name, primary)
        self._tables[name] = (url, primary)
        return url

    def table_files(self, name):
        """The ``part.N.parquet`` files written for table ``name``, in partition order."""
        return partition_files(self._tables[name][0], self.storage_options)

    def commit(self, manifest):
        """Write the manifest and make the version visible in one step; returns :class:`Published`.

        Idempotent: after a failure (an I/O error, even one that hid whether the visible step
        took effect) it can be called again; the version is published once.
        """
        if self.published is not None:
            raise RuntimeError(f"version {self.name} is committed already")
        manifest = {**manifest, "outputs": manifest.get("outputs", {})}
        self.published = self.destination._commit(self, manifest)
        return self.published

    def discard(self):
        self.destination._discard(self)

    def close(self):
        shutil.rmtree(self.staging, ignore_errors=True)


def partition_files(url, storage_options=None):
    """The ``part.N.parquet`` files Dask wrote under ``url``, in partition order (as URLs)."""
    fs, path = filesystem(url, storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    files = []
    for p in names:
        m = re.match(r"^part\.(\d+)\.parquet$", posixpath.basename(p))
        if m:
            files.append((int(m.group(1)), _url(fs, p)))
    return [p for _, p in sorted(files)]


# --------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------


class Destination:
    """Where a flow publishes; :meth:`new_version` is the one way to publish."""

    kind = "?"
    url = ""
    storage_options = {}

    def check(self, source=None):
        """Check the destination can take a version without touching the source; writes nothing."""

    def published(self):
        """The published version, or None."""
        raise NotImplementedError

    def find(self, key):
        """The published version when it holds the run ``key`` (nothing to do), else None."""
        try:
            current = self.published()
        except InputError:
            raise
        except Exception:
            return None
        if current is not None and current.manifest.get("run_key") == key:
            return current
        return None

    def checkpoint_path(self, key):
        """Where a run's EM state is checkpointed while it fits (the flow process's disk)."""
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        base = Path(os.environ.get("EMDASK_CHECKPOINT_DIR")
                    or Path(tempfile.gettempdir()) / "emdask-checkpoints")
        return base / digest / key

    def _checkpoint_url(self, key):
        """Where a run's checkpoint is kept on the destination's storage; None: only locally."""
        return None

    def checkpoint(self, key):
        """A fit's checkpoint folder (on the flow's disk) and a fit callback that keeps a copy on
        the destination's storage, or None.

        A run started again on another machine (a rescheduled flow, a new pod) first fetches
        that copy, and so resumes the fit where the killed run left it.
        """
        path = self.checkpoint_path(key)
        remote = self._checkpoint_url(key)
        if remote is None:
            return path, None
        fs, root = filesystem(remote, self.storage_options)
        if not (path / "model.json").exists() and fs.exists(posixpath.join(root, "model.json")):
            path.mkdir(parents=True, exist_ok=True)
            for name in fs.ls(root, detail=False):
                fs.get_file(name, str(path / posixpath.basename(name)))
        copied = {}

        def keep_a_copy(info):
            """Copy the checkpoint's changed files, ``model.json`` (which names the others) last,
            then remove the copies of files the checkpoint no longer has."""
            if not path.is_dir():
                return None
            fs.makedirs(root, exist_ok=True)
            names = sorted((f.name for f in path.iterdir() if f.is_file()),
                           key=lambda n: n == "model.json")
            for name in names:
                try:
                    stamp = (path / name).stat().st_mtime_ns
                    if copied.get(name) != stamp:
                        fs.put_file(str(path / name), posixpath.join(root, name))
                        copied[name] = stamp
                except FileNotFoundError:  # replaced by the next checkpoint meanwhile
                    continue
            for name in set(copied) - set(names):
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(posixpath.join(root, name))
                copied.pop(name)
            return None

        return path, keep_a_copy

    def drop_checkpoint(self, key):
        path = self.checkpoint_path(key)
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        remote = self._checkpoint_url(key)
        if remote is not None:
            with contextlib.suppress(Exception):
                fs, root = filesystem(remote, self.storage_options)
                self._remove_tree(fs, root)

    @contextlib.contextmanager
    def new_version(self, key, keep_versions=5):
        """A :class:`Version` to write; removed unless committed, checkpoint dropped either way.

        What ended runs left (staging folders, unpublished versions) is removed first.
        """
        version = Version(self, key, keep_versions)
        try:
            version.base = self._begin()
            self.clean_up()
            self._mark(version)
        except BaseException:
            version.close()
            raise
        failed = True
        try:
            yield version
            if version.published is None:
                raise RuntimeError(f"version {version.name} was left without a commit")
            failed = False
        finally:
            with signals_deferred():  # a second Ctrl-C (or the runner's SIGTERM) waits for it
                version.close()
            # a run that ends, published or failed, leaves no checkpoint; only a process
            # killed outright leaves one, for the next run to resume from
            self.drop_checkpoint(key)
            if failed:
                with contextlib.suppress(Exception):
                    version.discard()

    def _begin(self):
        """What the destination holds as a version starts (a table's snapshot or version)."""
        return None

    def clean_up(self):
        """Remove what ended runs left (:meth:`sweep`, and staging folders on this machine);
        never fails: a clean-up is no reason to fail a run."""
        with contextlib.suppress(Exception):
            _sweep_staging()
        with contextlib.suppress(Exception):
            self.sweep()

    def sweep(self):
        """Remove what ended runs left: versions that are not published and whose run has
        ended (see :func:`_run_state`) or, when that cannot be told, in which nothing was
        written for :data:`STALE_AFTER` seconds."""

    def _mark(self, version):
        """Mark the version's files with the run writing them (:data:`RUN_MARK`)."""

    def _left_over(self, fs, path, name, mark):
        """Whether the unpublished version ``name`` at ``path``, written by the run ``mark``
        names (None: no mark), is a leftover of an ended run."""
        state = _run_state(mark)
        if state is not None:
            return state == "ended"  # a run still running may fit for hours, writing nothing
        age = _name_age(name)
        return age is not None and age > STALE_AFTER and _idle_for(fs, path) > STALE_AFTER

    # -- shared by the backends ------------------------------------------------------

    def _upload_local(self, version, fs, target):
        for path in sorted(version.local.rglob("*")):
            if path.is_file():
                relative = path.relative_to(version.local).as_posix()
                dest = posixpath.join(target, relative)
                fs.makedirs(posixpath.dirname(dest), exist_ok=True)
                fs.put_file(str(path), dest)

    def _remove_tree(self, fs, path):
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(path):
                fs.rm(path, recursive=True)


def _write_bytes(fs, path, data):
    if _is_local_fs(fs):
        _write_local_atomic(path, data)
    else:
        fs.pipe_file(path, data)


def _write_local_atomic(path, data):
    from emdask.persistence import write_file_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data)
    _fsync_dir(path.parent)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- folders: local disk and object stores ------------------------------------------------


class _Conflict(Exception):
    """The pointer changed since it was read."""


class FolderDestination(Destination):
    """A folder of versions on the local disk or an object store, published through ``CURRENT``."""

    kind = "folder"

    def __init__(self, url, storage_options=None):
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(url, self.storage_options)
        self.local = _is_local_fs(self.fs)
        self.url = _local_path(url) if self.local else str(url).rstrip("/")
        if self.local:
            self.root = self.url

    def _p(self, *parts):
        return posixpath.join(self.root, *parts)

    def _version_url(self, name):
        return _url(self.fs, self._p(VERSIONS, name))

    def _table_url(self, version, name, primary):
        return _url(self.fs, self._p(VERSIONS, version.name, name))

    def checkpoint_path(self, key):
        if self.local:
            return Path(self.root) / CHECKPOINTS / key
        return super().checkpoint_path(key)

    def _checkpoint_url(self, key):
        return None if self.local else _url(self.fs, self._p(CHECKPOINTS, key))

    def drop_checkpoint(self, key):
        if not self.local:
            return super().drop_checkpoint(key)
        root = Path(self.root) / CHECKPOINTS
        shutil.rmtree(root / key, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty

    # -- checks --------------------------------------------------------------------------

    def check(self, source=None):
        shown = self.url
        if source is not None:
            mine = _location_pair(self.url)
            for protocol, path in source.locations():
                if protocol != mine[0]:
                    continue
                a, b = mine[1].rstrip("/"), str(path).rstrip("/")
                if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
                    raise InputError(
                        f"destination {shown} is the source or overlaps it ({path}); choose a "
                        "separate location, the source is never modified"
                    )
        try:
            if self.local:
                self._check_local()
            else:
                self._check_remote()
            self._read_pointer()  # a CURRENT edited by hand is reported now, not after the fit
        except InputError:
            raise
        except PermissionError as exc:
            raise InputError(f"destination {shown} is not accessible: {one_line(exc)}; check the "
                             "credentials in the environment") from None
        except Exception as exc:
            raise InputError(f"cannot reach destination {shown}: {one_line(exc)}; check the URL, "
                             "the endpoint and the credentials in the environment") from None

    def _check_local(self):
        path = Path(self.root)
        if path.exists():
            if not path.is_dir():
                raise InputError(f"destination {self.url} exists and is not a directory; choose a directory")
            entries = [e for e in os.listdir(path) if e not in (CHECKPOINTS, ".lock")]
            if entries and not (path / CURRENT).exists() and not (path / VERSIONS).is_dir():
                raise InputError(
                    f"destination {self.url} is a non-empty directory that holds no emdask output; "
                    "choose a new or empty directory"
                )
            if not os.access(path, os.W_OK | os.X_OK):
                raise InputError(f"destination {self.url} is not writable; check its permissions")
            return
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"destination {self.url} cannot be created: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(
                f"destination {self.url} cannot be created: {parent} is not writable; check its permissions"
            )

    def _check_remote(self):
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol not in _CONDITIONAL_STORES:
            raise InputError(_no_conditional_write(self.url, protocol))
        if protocol in ("gs", "gcs"):
            try:
                import google.cloud.storage  # noqa: F401
            except ImportError:
                raise InputError(f"destination {self.url}: publishing to GCS needs the "
                                 "google-cloud-storage package; install it") from None
        bucket = self.root.split("/", 1)[0]
        if not self.fs.exists(bucket):
            raise InputError(f"destination {self.url}: the bucket {bucket!r} does not exist (or "
                             "the credentials cannot see it); create it first")
        if self.fs.isfile(self.root):
            raise InputError(f"destination {self.url} is a file; choose a folder")
        if self.fs.isdir(self.root):
            names = {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)}
            names.discard("")
            if names and not ({CURRENT, VERSIONS, CHECKPOINTS} & names):
                raise InputError(
                    f"destination {self.url} holds other data and no emdask output; choose a "
                    "new or empty folder"
                )

    # -- the pointer ---------------------------------------------------------------------

    def _read_pointer(self):
        """(names published, newest first; token for the conditional write)."""
        path = self._p(CURRENT)
        if self.local:
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                return [], None
            names = self._parse_pointer(data)
            return names, data.decode()
        try:
            info = self.fs.info(path, refresh=True) if "refresh" in _params(self.fs.info) else self.fs.info(path)
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return [], None
        token = _object_token(info)
        return self._parse_pointer(data), token

    def _parse_pointer(self, data):
        """The names CURRENT holds (bytes or text), newest first; InputError when its first
        line names no version (edited by hand, or damaged)."""
        try:
            text = data.decode() if isinstance(data, bytes) else data
            names = [n.strip() for n in text.splitlines() if n.strip()]
            first = names[0] if names else None
        except UnicodeDecodeError:
            names, first = [], data[:40]
        if first is not None and not (isinstance(first, str) and _VERSION_NAME.match(first)):
            raise InputError(
                f"{self._p(CURRENT)} does not name a version ({first[:80]!r}); it was edited "
                f"by hand or damaged: write the name of a folder of {self._p(VERSIONS)} on its "
                "first line"
            )
        return [n for n in names if _VERSION_NAME.match(n)]

    def _swap_pointer(self, text, token):
        path = self._p(CURRENT)
        data = text.encode()
        if self.local:
            lock = Path(self.root) / ".lock"
            with open(lock, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    try:
                        now = Path(path).read_text()
                    except FileNotFoundError:
                        now = None
                    if now != token:
                        raise _Conflict()
                    _write_local_atomic(path, data)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return
        _conditional_put(self.fs, path, data, token)

    # -- versions ------------------------------------------------------------------------

    def published(self):
        names, _ = self._read_pointer()
        if not names:
            return None
        url = self._version_url(names[0])
        manifest = json.loads(self.fs.cat_file(self._p(VERSIONS, names[0], MANIFEST)))
        return Published(names[0], url, manifest, storage_options=self.storage_options)

    def list_versions(self):
        """Names of the complete versions (with a manifest), oldest first."""
        root = self._p(VERSIONS)
        try:
            entries = self.fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(posixpath.basename(p.rstrip("/")) for p in entries)
        return [n for n in names if _VERSION_NAME.match(n) and self.fs.exists(self._p(VERSIONS, n, MANIFEST))]

    def _mark(self, version):
        _write_bytes(self.fs, self._p(VERSIONS, version.name, RUN_MARK), _mark_bytes())

    def _commit(self, version, manifest):
        published = Published(version.name, self._version_url(version.name),
                              {"format": MANIFEST_FORMAT, "version": version.name, **manifest},
                              storage_options=self.storage_options)
        names, _ = self._read_pointer()
        if version.name in names:  # a repeated commit whose first attempt took effect
            return published
        target = self._p(VERSIONS, version.name)
        self.fs.makedirs(target, exist_ok=True)
        self._upload_local(version, self.fs, target)
        _write_bytes(self.fs, self._p(VERSIONS, version.name, MANIFEST),
                     manifest_text(version.name, manifest).encode())
        try:
            history = self._publish(version.name)
        except (_Conflict, ConcurrentCommitError, InputError):
            raise
        except Exception:
            # the write of CURRENT failed, or failed to say whether it took effect: the
            # pointer tells (a version it names is published, whatever the error said)
            try:
                history, _ = self._read_pointer()
            except Exception:
                history = []
            if version.name not in history:
                raise
        with contextlib.suppress(Exception):
            self.fs.rm_file(self._p(VERSIONS, version.name, RUN_MARK))
        with contextlib.suppress(Exception):
            self._prune(history, version.keep_versions)
        return published

    def _publish(self, name):
        """Make ``name`` the published version by compare-and-swap of CURRENT; the new history."""
        for _ in range(_SWAP_ATTEMPTS):
            names, token = self._read_pointer()
            history = [name] + [n for n in names if n != name]
            try:
                self._swap_pointer("\n".join(history) + "\n", token)
                return history
            except _Conflict:
                time.sleep(0.05)
        raise ConcurrentCommitError(
            f"{self.url}: CURRENT kept changing under {_SWAP_ATTEMPTS} attempts to publish "
            f"{name}; too many runs publish here at once"
        )

    def _prune(self, history, keep_versions):
        """Remove versions published before the newest ``keep_versions``, and leftovers."""
        for name in history[keep_versions:]:
            self._remove_tree(self.fs, self._p(VERSIONS, name))
        self._sweep(set(history))
        if len(history) > keep_versions:
            names, token = self._read_pointer()
            trimmed = [n for n in names if n not in history[keep_versions:]]
            if trimmed != names:
                with contextlib.suppress(_Conflict):
                    self._swap_pointer("\n".join(trimmed) + "\n", token)

    def sweep(self):
        names, _ = self._read_pointer()
        self._sweep(set(names))

    def _sweep(self, published):
        try:
            entries = self.fs.ls(self._p(VERSIONS), detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if name in published or not _VERSION_NAME.match(name):
                continue
            path = self._p(VERSIONS, name)
            with contextlib.suppress(Exception):
                mark = _read_mark(self.fs, posixpath.join(path, RUN_MARK))
                if self._left_over(self.fs, path, name, mark) \
                        and name not in self._read_pointer()[0]:  # not published meanwhile
                    self._remove_tree(self.fs, path)

    def _discard(self, version):
        try:
            names, _ = self._read_pointer()
        except Exception:
            names = [version.name]  # cannot tell: keep the files
        if version.name in names:  # published after all: never removed by a clean-up
            return
        self._remove_tree(self.fs, self._p(VERSIONS, version.name))
        if self.local:
            for empty in (Path(self.root) / VERSIONS, Path(self.root)):
                with contextlib.suppress(OSError):
                    if empty.is_dir() and not any(p for p in empty.iterdir() if p.name != ".lock"):
                        lock = empty / ".lock"
                        if lock.exists() and not (empty / CURRENT).exists():
                            lock.unlink()
                        empty.rmdir()


def _idle_for(fs, path):
    """Seconds since anything under ``path`` was last written (a run still writing is young)."""
    newest = None
    for info in fs.find(path, detail=True, withdirs=False).values():
        stamp = next((info[k] for k in ("LastModified", "mtime", "updated", "created")
                      if info.get(k) is not None), None)
        if isinstance(stamp, str):
            with contextlib.suppress(ValueError):
                stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if isinstance(stamp, datetime):
            stamp = stamp.timestamp()
        if isinstance(stamp, (int, float)):
            newest = stamp if newest is None else max(newest, stamp)
    return float("inf") if newest is None else time.time() - newest


def _params(fn):
    import inspect

    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def _object_token(info):
    for key in ("generation", "ETag", "etag"):
        if info.get(key):
            return (key, str(info[key]))
    return ("none", None)


def _precondition_failed(exc):
    """Whether ``exc`` (or what it wraps) is the store's "the condition does not hold" answer."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, FileExistsError):
            return True
        text = f"{type(exc).__name__} {exc} {getattr(exc, 'response', '')}"
        if any(m in text for m in ("PreconditionFailed", "412", "ConditionalRequestConflict")):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _gcs_client(fs):
    """A google-cloud-storage client with the credentials, project and endpoint of ``fs`` (gcsfs),
    so that ``CURRENT`` is written as the rest of the version was."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    credentials = getattr(getattr(fs, "credentials", None), "credentials", None)  # None: anonymous
    endpoint = getattr(fs, "_endpoint", None)
    return storage.Client(project=getattr(fs, "project", None) or None,
                          credentials=credentials or AnonymousCredentials(),
                          client_options={"api_endpoint": endpoint} if endpoint else None)


def _conditional_put(fs, path, data, token):
    """Write ``data`` to ``path`` only if the object is still the one ``token`` names."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a"):
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token[1]}
        try:
            sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as exc:
            if _precondition_failed(exc):
                raise _Conflict() from None
            raise
        fs.invalidate_cache(path)
        return
    if protocol in ("gs", "gcs"):
        # gcsfs writes unconditionally; Google's own client takes the generation precondition
        from google.api_core.exceptions import PreconditionFailed

        bucket, _, key = fs._strip_protocol(path).partition("/")
        blob = _gcs_client(fs).bucket(bucket).blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=0 if token is None else int(token[1]))
        except PreconditionFailed:
            raise _Conflict() from None
        fs.invalidate_cache(path)
        return
    if protocol in ("memory",):  # one process: no other writer can interleave
        current = fs.cat_file(path) if fs.exists(path) else None
        if (current is None) != (token is None):
            raise _Conflict()
        fs.pipe_file(path, data)
        return
    raise InputError(_no_conditional_write(fs.unstrip_protocol(path), protocol))


#: Stores whose conditional writes publish a folder destination's CURRENT.
_CONDITIONAL_STORES = ("file", "local", "s3", "s3a", "gs", "gcs", "memory")


def _no_conditional_write(url, protocol):
    return (f"destination {url}: emdask publishes a folder by a conditional write of CURRENT, "
            f"which it does not make on {protocol}:// stores; publish to a local folder, S3, GCS, "
            "or an Iceberg or Delta table on this store")


class _TableDestination(Destination):
    """What Iceberg and Delta destinations share: the sidecar of each version beside the table.

    ``LOCATION/_emdask/versions/NAME/`` holds a version's manifest, model, plots and extra tables;
    ``LOCATION/_emdask/checkpoints/KEY/`` a fitting run's checkpoint. The table's own commit
    (:meth:`_commit_files`) is the one visible step.
    """

    def _location(self):
        """URL of the table's location (where the workers write its data files)."""
        raise NotImplementedError

    def _published_name(self):
        """Name of the version the table's current snapshot or version holds, or None."""
        raise NotImplementedError

    def _commit_files(self, version, files, properties):
        """Commit ``files`` as the table's new content in one step, or raise ConcurrentCommitError."""
        raise NotImplementedError

    def _sidecar(self, name=None):
        return posixpath.join(self._location(), SIDECAR, VERSIONS, *([name] if name else []))

    def _version_url(self, name):
        return self._sidecar(name)

    def _checkpoint_url(self, key):
        return posixpath.join(self._location(), SIDECAR, "checkpoints", key)

    def _table_url(self, version, name, primary):
        if primary:
            return posixpath.join(self._location(), self._data_folder, f"emdask-{version.name}")
        return posixpath.join(self._sidecar(version.name), name)

    def _check_overlap(self, source, location):
        if source is None:
            return
        mine = _location_pair(location)
        for protocol, path in source.locations():
            if protocol == mine[0] and (mine[1] == path or mine[1].startswith(path.rstrip("/") + "/")
                                        or path.startswith(mine[1] + "/")):
                raise InputError(f"destination {self.url} is the source or overlaps it; choose "
                                 "another table, the source is never modified")

    def published(self):
        name = self._published_name()
        if not name:
            return None
        url = self._sidecar(name)
        fs, path = filesystem(url, self.storage_options)
        manifest = json.loads(fs.cat_file(posixpath.join(path, MANIFEST)))
        return Published(name, url, manifest, table=self.url, storage_options=self.storage_options)

    def _mark(self, version):
        fs, side_path = filesystem(self._sidecar(version.name), self.storage_options)
        _write_bytes(fs, posixpath.join(side_path, RUN_MARK), _mark_bytes())

    def _commit(self, version, manifest):
        sidecar = self._sidecar(version.name)
        published = Published(version.name, sidecar,
                              {"format": MANIFEST_FORMAT, "version": version.name, **manifest},
                              table=self.url, storage_options=self.storage_options)
        if self._published_name() == version.name:  # a repeated commit whose first took effect
            return published
        primary = [n for n, (url, p) in version._tables.items() if p]
        if len(primary) != 1:
            raise RuntimeError(f"a table destination commits one table; {len(primary)} marked primary")
        files = version.table_files(primary[0])
        if not files:
            raise ValidationError(f"{version.name}: no data file was written for the table")
        fs, side_path = filesystem(sidecar, self.storage_options)
        fs.makedirs(side_path, exist_ok=True)
        self._upload_local(version, fs, side_path)
        _write_bytes(fs, posixpath.join(side_path, MANIFEST), manifest_text(version.name, manifest).encode())
        properties = {"emdask.version": version.name, "emdask.run-key": version.key,
                      "emdask.manifest": posixpath.join(sidecar, MANIFEST)}
        try:
            self._commit_files(version, files, properties)
        except ConcurrentCommitError:
            raise
        except Exception:
            # failed, or failed to say whether it took effect: the table tells
            try:
                done = self._published_name() == version.name
            except Exception:
                done = False
            if not done:
                raise
        with contextlib.suppress(Exception):
            fs.rm_file(posixpath.join(side_path, RUN_MARK))
        with contextlib.suppress(Exception):
            self._prune(version.keep_versions)
        return published

    def _history(self):
        """Names of the versions the table's snapshots (or versions) hold, newest first."""
        raise NotImplementedError

    def _prune(self, keep_versions):
        """Remove the sidecars of published versions beyond the newest ``keep_versions`` (their
        snapshots stay readable, data included), and what ended runs left (:meth:`sweep`)."""
        history = list(dict.fromkeys(self._history()))
        fs, root = filesystem(self._sidecar(), self.storage_options)
        for name in history[keep_versions:]:
            self._remove_tree(fs, posixpath.join(root, name))
        self._sweep(set(history))

    def sweep(self):
        self._sweep(set(self._history()))

    def _sweep(self, published):
        """Sidecars and data folders that no snapshot references, of ended runs."""
        fs, root = filesystem(self._sidecar(), self.storage_options)
        data_fs, data_root = filesystem(posixpath.join(self._location(), self._data_folder),
                                        self.storage_options)
        found = {}  # name -> [(store, path)]
        for store, folder, prefix in ((fs, root, ""), (data_fs, data_root, "emdask-")):
            try:
                entries = store.ls(folder, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                base = posixpath.basename(entry.rstrip("/"))
                if base.startswith(prefix) and _VERSION_NAME.match(base[len(prefix):]):
                    found.setdefault(base[len(prefix):], []).append((store, entry.rstrip("/")))
        candidates = {name: paths for name, paths in found.items() if name not in published}
        for name, paths in candidates.items():
            with contextlib.suppress(Exception):
                mark = _read_mark(fs, posixpath.join(root, name, RUN_MARK))
                if all(self._left_over(store, path, name, mark) for store, path in paths) \
                        and name not in self._history():  # not published meanwhile
                    for store, path in paths:
                        self._remove_tree(store, path)

    def _discard(self, version):
        try:
            published = version.name in self._history()
        except Exception:
            published = True  # cannot tell: keep the files
        if published:  # committed after all: never removed by a clean-up
            return
        for url, primary in version._tables.values():
            fs, path = filesystem(url, self.storage_options)
            self._remove_tree(fs, path)
        fs, path = filesystem(self._sidecar(version.name), self.storage_options)
        self._remove_tree(fs, path)
        if _is_local_fs(fs):  # empty folders left on a local disk: a new table's is empty again
            for folder in (posixpath.dirname(path), posixpath.dirname(posixpath.dirname(path))):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _emdask_entry(name):
    """Whether a table location's entry is emdask's own (a sidecar, or a run's data folder)."""
    return name == SIDECAR or (name.startswith("emdask-")
                               and bool(_VERSION_NAME.match(name[len("emdask-"):])))


def _first_schema(files, storage_options):
    import pyarrow.parquet as pq

    fs, path = filesystem(files[0], storage_options)
    with fs.open(path, "rb") as fh:
        return pq.read_schema(fh).remove_metadata()


# -- Apache Iceberg -----------------------------------------------------------------------


class IcebergDestination(_TableDestination):
    """An Iceberg table: each version is a snapshot committed in one catalog transaction."""

    kind = "iceberg"
    _data_folder = "data"

    def __init__(self, url, storage_options=None):
        self.url = str(url)
        self.catalog_name, self.namespace, self.table_name, snapshot = parse_iceberg_url(url)
        if snapshot is not None:
            raise InputError(f"destination {url}: a destination takes no @SNAPSHOT_ID; a run "
                             "commits a new snapshot")
        self.storage_options = dict(storage_options or {})
        self._catalog = None
        self._table_location = None

    @property
    def catalog(self):
        if self._catalog is None:
            self._catalog = load_iceberg_catalog(self.catalog_name, self.url)
        return self._catalog

    def _load(self):
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog.load_table((self.namespace, self.table_name))
        except NoSuchTableError:
            return None

    def _location(self):
        # a table's location never changes; a new table is created at the catalog's default
        if self._table_location is None:
            table = self._load()
            self._table_location = (
                table.location().rstrip("/") if table is not None
                else self.catalog._resolve_table_location(None, self.namespace, self.table_name))
        return self._table_location

    def check(self, source=None):
        from pyiceberg.exceptions import NoSuchNamespaceError

        try:
            namespaces = {tuple(n) for n in self.catalog.list_namespaces()}
            if tuple(self.namespace.split(".")) not in namespaces:
                raise NoSuchNamespaceError(self.namespace)
            location = self._location()
        except NoSuchNamespaceError:
            raise InputError(
                f"destination {self.url}: the catalog {self.catalog_name!r} has no namespace "
                f"{self.namespace!r}; create it first (pyiceberg: catalog.create_namespace)"
            ) from None
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot reach destination {self.url}: {one_line(exc)}") from None
        self._check_overlap(source, location)

    def _published_name(self):
        table = self._load()
        if table is None or table.current_snapshot() is None:
            return None
        return table.current_snapshot().summary.additional_properties.get("emdask.version")

    def _history(self):
        table = self._load()
        snapshots = [] if table is None else list(table.snapshots())
        names = [s.summary.additional_properties.get("emdask.version") if s.summary else None
                 for s in reversed(snapshots)]
        return [n for n in names if n]

    def _begin(self):
        table = self._load()
        snapshot = None if table is None or table.current_snapshot() is None else table.current_snapshot().snapshot_id
        return (table is not None, snapshot)

    def _commit_files(self, version, files, properties):
        from pyiceberg.exceptions import (
            CommitFailedException,
            TableAlreadyExistsError,
            ValidationException,
        )
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids

        arrow_schema = _first_schema(files, self.storage_options)
        existed, base_snapshot = version.base or (False, None)
        try:
            if not existed:
                try:
                    tx = self.catalog.create_table_transaction(
                        (self.namespace, self.table_name), schema=arrow_schema)
                except TableAlreadyExistsError:
                    raise ConcurrentCommitError(
                        f"{self.url}: another run created the table while this one ran; run "
                        "again to publish on top of it") from None
            else:
                table = self._load()
                current = None if table.current_snapshot() is None else table.current_snapshot().snapshot_id
                if current != base_snapshot:
                    raise ConcurrentCommitError(
                        f"{self.url}: another run committed snapshot {current} while this one ran "
                        f"(it started from {base_snapshot}); nothing was overwritten: run again")
                tx = table.transaction()
                with tx.update_schema() as update:
                    update.union_by_name(_pyarrow_to_schema_without_ids(arrow_schema))
                if current is not None:
                    tx.delete(AlwaysTrue(), snapshot_properties=properties)
            tx.add_files(files, snapshot_properties=properties)
            tx.commit_transaction()
        except TableAlreadyExistsError:  # created by another run between our check and commit
            raise ConcurrentCommitError(
                f"{self.url}: another run created the table while this one ran; nothing was "
                "overwritten: run again to publish on top of it") from None
        except (CommitFailedException, ValidationException) as exc:
            # pyiceberg retries a refused commit on the new head, and its validation then finds
            # the other run's files: either way the table changed under this run
            raise ConcurrentCommitError(
                f"{self.url}: another run committed to the table while this one ran "
                f"({one_line(exc)}); nothing was overwritten: run again") from None


# -- Delta Lake ---------------------------------------------------------------------------


class DeltaDestination(_TableDestination):
    """A Delta Lake table: each version is a table version committed atomically."""

    kind = "delta"
    _data_folder = ""

    def __init__(self, url, storage_options=None):
        text = str(url)
        if text.startswith("delta+"):
            text = text[len("delta+"):]
        self.table_uri = _local_path(text) if is_local(text) else text.rstrip("/")
        self.url = redact(self.table_uri)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.table_uri, self.storage_options)
        if _is_local_fs(self.fs):
            self.root = self.table_uri

    def _location(self):
        return _url(self.fs, self.root)

    def _dt(self, version=None):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.table_uri, version=version,
                              storage_options=delta_storage_options(self.table_uri, self.storage_options))
        except TableNotFoundError:
            return None

    def check(self, source=None):
        try:
            exists = self.fs.exists(posixpath.join(self.root, "_delta_log"))
            if not exists and self.fs.isdir(self.root) and any(
                    not _emdask_entry(posixpath.basename(p.rstrip("/")))
                    for p in self.fs.ls(self.root, detail=False)):
                raise InputError(f"destination {self.url} holds other data and no Delta table; "
                                 "choose a new folder")
            if not _is_local_fs(self.fs):
                bucket = self.root.split("/", 1)[0]
                if not self.fs.exists(bucket):
                    raise InputError(f"destination {self.url}: the bucket {bucket!r} does not exist; "
                                     "create it first")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot reach destination {self.url}: {one_line(exc)}") from None
        self._check_overlap(source, self.table_uri)

    def _published_name(self):
        dt = self._dt()
        history = dt.history(1) if dt is not None else []
        return history[0].get("emdask.version") if history else None

    def _history(self):
        dt = self._dt()
        return [] if dt is None else [c.get("emdask.version") for c in dt.history()
                                      if c.get("emdask.version")]

    def _begin(self):
        dt = self._dt()
        return None if dt is None else dt.version()

    def _commit_files(self, version, files, properties):
        import pyarrow.parquet as pq
        from deltalake import CommitProperties, Schema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import AddAction, create_table_with_add_actions

        actions, now = [], int(time.time() * 1000)
        for url in files:
            fs, path = filesystem(url, self.storage_options)
            with fs.open(path, "rb") as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
            stats = json.dumps({"numRecords": int(rows)})
            actions.append(AddAction(posixpath.relpath(path, self.root), int(fs.size(path)), {}, now,
                                     True, stats))
        schema = _first_schema(files, self.storage_options)
        commit = CommitProperties(custom_metadata={k: v for k, v in properties.items()
                                                   if k != "emdask.manifest"},
                                  max_commit_retries=0)
        try:
            if version.base is None:
                if self._dt() is not None:
                    raise ConcurrentCommitError(f"{self.url}: another run created the table while "
                                                "this one ran; run again to publish on top of it")
                create_table_with_add_actions(
                    self.table_uri, Schema.from_arrow(schema), actions, mode="error",
                    storage_options=delta_storage_options(self.table_uri, self.storage_options),
                    commit_properties=commit)
            else:
                self._dt(version.base).create_write_transaction(
                    actions, mode="overwrite", schema=schema, commit_properties=commit)
        except CommitFailedError as exc:
            raise ConcurrentCommitError(
                f"{self.url}: another run committed to the table while this one ran "
                f"({one_line(exc)}); nothing was overwritten: run again") from None


# --------------------------------------------------------------------------------------


def open_destination(url, storage_options=None):
    """The destination named by ``url`` (nothing is read or written yet).

    Raises
    ------
    InputError
        An empty URL, an unknown scheme, or a source-only scheme (``postgresql://``).
    """
    if isinstance(url, Destination):
        return url
    if not isinstance(url, (str, os.PathLike)) or not str(url).strip():
        raise InputError("destination is empty; give a folder, an object-store URL or a table URL")
    text = str(url).strip()
    protocol = _protocol(text)
    if protocol == "iceberg":
        return IcebergDestination(text, storage_options)
    if protocol in ("postgresql", "postgres"):
        raise InputError(f"destination {redact(text)}: PostgreSQL is a source only; publish to a "
                         "folder, an object store, an Iceberg or a Delta table")
    if text.startswith("delta+"):
        return DeltaDestination(text, storage_options)
    fs, path = filesystem(text, storage_options)
    try:
        if fs.exists(posixpath.join(_local_path(text) if _is_local_fs(fs) else path, "_delta_log")):
            return DeltaDestination(text, storage_options)
    except Exception:
        pass  # unreachable: the folder destination's check reports it
    return FolderDestination(text, storage_options)
