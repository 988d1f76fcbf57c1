"""Sources: the table a flow reads, named by a URL, read lazily by the Dask workers.

=====================================================  =========================================
form                                                   what is read
=====================================================  =========================================
``PATH``, ``file://PATH``                              a Parquet dataset (directory, ``.parquet``
                                                       file or glob) or CSV file(s)
``s3://``, ``gs://``, ``abfs://``, any fsspec URL      the same on object storage
``iceberg://CATALOG/NAMESPACE.TABLE[@SNAPSHOT_ID]``    an Apache Iceberg table: its current
                                                       snapshot, or the one named
a path or URL whose folder holds ``_delta_log/``       a Delta Lake table: its latest version,
(``[@VERSION]``)                                       or the one named
``postgresql://USER@HOST:PORT/DB?table=SCHEMA.TABLE``  a PostgreSQL table (or ``?query=SELECT
                                                       ...``), read in ranges of an indexed
                                                       column (``&partition_on=COLUMN``)
=====================================================  =========================================

Credentials come from each ecosystem's own configuration: the AWS, Google Cloud and Azure
environment variables and files (and fsspec ``storage_options``), pyiceberg's catalog
configuration (``PYICEBERG_CATALOG__NAME__URI``, ``.pyiceberg.yaml``), libpq's variables and
files (``PGPASSWORD``, ``~/.pgpass``). They are never written to a manifest, a log line or an
error message.

:func:`open_source` checks a source and pins what it reads (the files and their object
versions, the Iceberg snapshot, the Delta version); :meth:`Source.open_table` then gives the same
Dask DataFrame, partition for partition, every time it is called, so that validation can pair
each output partition with the source partition it came from. :meth:`Source.identity` is what
the run key records of the source: object ETags or versions, an Iceberg snapshot id, a Delta
version, a PostgreSQL watermark given by the caller (none: every run computes).
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from .errors import InputError, one_line, redact

__all__ = [
    "DeltaSource",
    "FileSource",
    "IcebergSource",
    "PostgresSource",
    "Source",
    "file_token",
    "filesystem",
    "is_local",
    "open_source",
]

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz")
_AT_VERSION = re.compile(r"^(?P<base>.+?)@(?P<version>\d+)$")
#: Timeouts for object stores, so that an unreachable endpoint fails in bounded time; no
#: listings cache, so that long-lived workers never read a listing older than the run.
_S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                  "retries": {"max_attempts": 2, "mode": "standard"}},
                "use_listings_cache": False}


# --------------------------------------------------------------------------------------
# URLs and file systems
# --------------------------------------------------------------------------------------


def _protocol(url):
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(str(url))
    return protocol


def is_local(url):
    """Whether ``url`` names the local file system (a plain path or ``file://``)."""
    return _protocol(url) in (None, "file", "local")


def _local_path(url):
    text = str(url)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text))


def storage_options_for(url, storage_options=None):
    """fsspec options for ``url``: bounded timeouts for S3, then the caller's own."""
    options = {}
    if _protocol(url) in ("s3", "s3a"):
        options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _S3_DEFAULTS.items()}
    for key, value in (storage_options or {}).items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


def filesystem(url, storage_options=None):
    """The fsspec file system of ``url`` and the path on it.

    Raises
    ------
    InputError
        An unknown scheme, or a scheme whose fsspec package is not installed.
    """
    import fsspec
    from fsspec.core import url_to_fs

    protocol = _protocol(url)
    if protocol is not None and protocol not in fsspec.available_protocols():
        raise InputError(
            f"{redact(url)}: unknown URL scheme {protocol!r}; use a local path, an fsspec URL "
            "(s3://, gs://, abfs://, ...), iceberg://CATALOG/NAMESPACE.TABLE or postgresql://..."
        )
    try:
        return url_to_fs(str(url), **storage_options_for(url, storage_options))
    except ImportError as exc:
        raise InputError(
            f"{redact(url)}: the {protocol}:// file system needs a package that is not "
            f"installed ({one_line(exc)}); install it (s3fs, gcsfs or adlfs)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{redact(url)}: {one_line(exc)}; check --storage-option") from None


def _url(fs, path):
    """A full URL for ``path`` on ``fs`` (local paths stay plain paths)."""
    return path if _is_local_fs(fs) else fs.unstrip_protocol(path)


def _is_local_fs(fs):
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def file_token(info):
    """What identifies one version of a file: the store's version id, ETag or generation.

    Local files have none of these: their token is a digest of their bytes (of the footer
    alone for Parquet files, whose footer records every row group's size and statistics).
    """
    for key in ("VersionId", "version_id", "generation"):
        if info.get(key):
            return f"{key}:{info[key]}"
    for key in ("ETag", "etag", "md5Hash", "crc32c", "content_md5"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return None


def _local_token(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if str(path).endswith(".parquet") and size > 8:
            fh.seek(size - 8)
            footer = int.from_bytes(fh.read(4), "little")
            fh.seek(max(0, size - 8 - footer))
            h.update(fh.read())
        else:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"sha256:{h.hexdigest()}"


def _fingerprint(fs, files, root, infos=None):
    """[relative name, size, token] of every file (the run key's record of a file source).

    ``infos`` are the listing's details, when the listing gave them (one request for all).
    """
    out = []
    for path in files:
        info = (infos or {}).get(path) or fs.info(path)
        size = int(info.get("size") or 0)
        token = _local_token(path, size) if _is_local_fs(fs) else file_token(info)
        if token is None:  # a store that offers no identity: its modification time
            token = f"modified:{info.get('LastModified') or info.get('mtime') or info.get('updated')}"
        name = posixpath.relpath(path, root) if root and path != root else posixpath.basename(path)
        out.append([name, size, token])
    return out


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


class Source:
    """A table to read: what every kind of source offers the flows."""

    kind = "?"
    #: Rows of the table when its metadata tells them (Parquet footers, an Iceberg snapshot's
    #: summary, a count the database made), else None: the flow's first pass counts them.
    rows = None

    def open_table(self):  # pragma: no cover - every kind defines it
        """The table as a lazy Dask DataFrame, the same partitions every time."""
        raise NotImplementedError

    def identity(self):
        """What the run key records of the source; None when the source offers nothing stable."""
        return None

    def describe(self):
        """The source as the manifest records it (no secret)."""
        return {"url": self.url, "kind": self.kind, "identity": self.identity()}

    def locations(self):
        """Storage locations the source's data lives under, as ``(protocol, path)`` pairs."""
        return []


def _read_failure(source, exc):
    return InputError(f"cannot read source {source.url}: {one_line(exc)}")


@dataclass(frozen=True)
class FileSource(Source):
    """Parquet or CSV files on the local disk or an object store (any fsspec URL)."""

    url: str
    format: str  # "parquet" or "csv"
    files: tuple
    root: str = ""
    fingerprint: tuple = ()
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)
    rows: int | None = field(default=None, compare=False)
    kind = "files"

    def open_table(self):
        import dask.dataframe as dd

        options = storage_options_for(self.url, self.storage_options)
        try:
            if self.format == "csv":
                files = list(self.files)
                # nullable dtypes: an integer column keeps its type when a later block has gaps
                return dd.read_csv(files if len(files) > 1 else files[0], blocksize="64MB",
                                   dtype_backend="numpy_nullable", storage_options=options)
            if self.root and not _glob.has_magic(self.url):
                return dd.read_parquet(self.url, storage_options=options)
            return dd.read_parquet(list(self.files), storage_options=options)
        except InputError:
            raise
        except Exception as exc:  # unreadable or corrupt file
            raise InputError(f"cannot read source {self.url} as {self.format}: {one_line(exc)}") from exc

    def identity(self):
        return [list(f) for f in self.fingerprint]

    def describe(self):
        return {"url": self.url, "kind": self.kind, "format": self.format,
                "files": [list(f) for f in self.fingerprint]}

    def locations(self):
        protocol = "file" if is_local(self.url) else _protocol(self.url)
        paths = [self.root] if self.root else []
        paths += [f if is_local(f) else f.split("://", 1)[1] for f in self.files]
        return [(protocol, p) for p in paths]


def _is_csv(name):
    return str(name).lower().endswith(_CSV_SUFFIXES)


def _hidden(relative):
    parts = relative.split("/")
    name = parts[-1]
    if any(p.startswith((".", "_")) for p in parts[:-1]):
        return True
    return name.startswith((".", "_")) and name not in ("_metadata", "_common_metadata")


def _check_schemas(fs, files, shown):
    """Every Parquet file of a source has the same columns, of the same types; returns the
    number of rows the files hold.

    Dask reads a dataset through one file's schema: a column present in some files only would
    be dropped, and a column of another type would fail late or be misread. Only footers are
    read. A column that is all null in one file (type ``null``) agrees with any type.
    """
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    files = [f for f in files if not posixpath.basename(f).startswith("_")]

    def footer(path):
        with fs.open(path, "rb") as fh:
            try:
                metadata = pq.read_metadata(fh)
                return metadata.schema.to_arrow_schema(), metadata.num_rows
            except Exception as exc:
                raise InputError(f"source {shown}: {posixpath.basename(path)} is not a readable "
                                 f"Parquet file ({one_line(exc)}); replace or remove it") from None

    with ThreadPoolExecutor(8) as pool:
        footers = list(pool.map(footer, files))
    rows = sum(n for _, n in footers)
    if len(files) < 2:
        return rows
    schemas = [schema for schema, _ in footers]
    root = posixpath.commonpath(files)

    def name(i):
        return posixpath.relpath(files[i], root)

    columns = {}
    for i, sch in enumerate(schemas):
        for field_ in sch:
            columns.setdefault(field_.name, {}).setdefault(str(field_.type), []).append(i)
    for column, types in columns.items():
        having = sorted(i for ids in types.values() for i in ids)
        if len(having) < len(files):
            missing = sorted(set(range(len(files))) - set(having))
            more = f" (and {len(missing) - 1} other file(s))" if len(missing) > 1 else ""
            raise InputError(
                f"source {shown}: column {column!r} is in {name(having[0])} but not in "
                f"{name(missing[0])}{more}; every file of a source must have the same columns"
            )
        real = {t: ids for t, ids in types.items() if t != "null"}
        if len(real) > 1:
            (t1, f1), (t2, f2) = list(real.items())[:2]
            raise InputError(
                f"source {shown}: column {column!r} is {t1} in {name(f1[0])} but {t2} in "
                f"{name(f2[0])}; rewrite the files with one type per column"
            )
    return rows


def _check_csv_headers(fs, files, shown):
    """Every CSV file of a source has the same header (only first lines are read): Dask reads
    them all through the first one's columns."""
    import csv
    from concurrent.futures import ThreadPoolExecutor

    from fsspec.core import OpenFile
    from fsspec.utils import infer_compression

    if len(files) < 2:
        return

    def header(path):
        try:
            with OpenFile(fs, path, mode="rt", compression=infer_compression(path),
                          newline="") as fh:
                return next(csv.reader([fh.readline()]), [])
        except Exception as exc:
            raise InputError(f"source {shown}: {posixpath.basename(path)} is not a readable CSV "
                             f"file ({one_line(exc)}); replace or remove it") from None

    with ThreadPoolExecutor(8) as pool:
        headers = list(pool.map(header, files))
    root = posixpath.commonpath(files)
    first = posixpath.relpath(files[0], root)
    for path, columns in zip(files[1:], headers[1:]):
        if columns != headers[0]:
            name = posixpath.relpath(path, root)
            missing = [c for c in headers[0] if c not in columns]
            extra = [c for c in columns if c not in headers[0]]
            if missing:
                what = f"{name} lacks column(s) {missing} of {first}"
            elif extra:
                what = f"{name} has column(s) {extra} that {first} has not"
            else:
                what = f"{name} has the columns of {first} in another order"
            raise InputError(
                f"source {shown}: {what}; every file of a source must have the same header"
            )


def _open_files(url, storage_options):
    fs, path = filesystem(url, storage_options)
    local = _is_local_fs(fs)
    shown = _local_path(url) if local else url
    try:
        if _glob.has_magic(path):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not found:
                raise InputError(f"source {shown} matches no file; check the pattern")
            kinds = {"csv" if _is_csv(f) else "parquet" for f in found}
            if len(kinds) > 1:
                raise InputError(f"source {shown} matches both CSV and Parquet files; narrow the pattern")
            files = tuple(_url(fs, f) for f in found)
            fmt = kinds.pop()
            rows = _check_schemas(fs, found, shown) if fmt == "parquet" else None
            if fmt == "csv":
                _check_csv_headers(fs, found, shown)
            return FileSource(shown, fmt, files, "", tuple(map(tuple, _fingerprint(fs, found, ""))),
                              dict(storage_options or {}), rows=rows)
        if not fs.exists(path):
            raise InputError(
                f"source {shown} does not exist; give a Parquet dataset (directory or .parquet "
                "file), a .csv file, an Iceberg or Delta table, or a postgresql:// URL"
            )
        if fs.isdir(path):
            if fs.exists(posixpath.join(path, "_delta_log")):
                return _open_delta(url, None, storage_options)
            listing = fs.find(path, withdirs=False, detail=True)
            found = sorted(p for p in listing if not _hidden(posixpath.relpath(p, path)))
            if not any(not posixpath.basename(f).startswith("_") for f in found):
                raise InputError(f"source {shown} is an empty directory; it holds no Parquet file")
            if any(_is_csv(f) for f in found):
                raise InputError(
                    f"source {shown} is a directory of CSV files; give a glob such as "
                    f"'{posixpath.join(str(shown), '*.csv')}'"
                )
            rows = _check_schemas(fs, found, shown)
            return FileSource(shown, "parquet", tuple(_url(fs, f) for f in found), path,
                              tuple(map(tuple, _fingerprint(fs, found, path, listing))),
                              dict(storage_options or {}), rows=rows)
        fmt = "csv" if _is_csv(path) else "parquet"
        rows = None
        if fmt == "parquet":
            with fs.open(path, "rb") as fh:
                if fh.read(4) != b"PAR1":
                    raise InputError(
                        f"source {shown} is neither a Parquet file nor a .csv file; convert it or "
                        "give the right path"
                    )
            rows = _check_schemas(fs, [path], shown)
        return FileSource(shown, fmt, (_url(fs, path),), "",
                          tuple(map(tuple, _fingerprint(fs, [path], ""))), dict(storage_options or {}),
                          rows=rows)
    except InputError:
        raise
    except PermissionError as exc:
        raise InputError(f"source {shown} is not readable: {one_line(exc)}; check its permissions "
                         "or credentials") from None
    except Exception as exc:  # unreachable endpoint, refused credentials, missing bucket, ...
        raise InputError(f"cannot reach source {shown}: {one_line(exc)}; check the URL, the "
                         "endpoint and the credentials in the environment") from None


# -- Apache Iceberg ---------------------------------------------------------------------


def parse_iceberg_url(url):
    """``iceberg://CATALOG/NAMESPACE.TABLE[@SNAPSHOT_ID]`` as (catalog, namespace, table, snapshot)."""
    parts = urlsplit(str(url))
    catalog = parts.netloc
    name = parts.path.lstrip("/")
    snapshot = None
    m = _AT_VERSION.match(name)
    if m:
        name, snapshot = m["base"], int(m["version"])
    if not catalog or "." not in name or name.startswith(".") or name.endswith("."):
        raise InputError(
            f"{url} is not an Iceberg table URL; write iceberg://CATALOG/NAMESPACE.TABLE "
            "(with @SNAPSHOT_ID to read an older snapshot)"
        )
    namespace, _, table = name.rpartition(".")
    return catalog, namespace, table, snapshot


def load_iceberg_catalog(name, url):
    """The pyiceberg catalog called ``name``, configured by pyiceberg's own configuration."""
    from pyiceberg.catalog import load_catalog

    # pyiceberg reads its environment once, at import: read it again, so that a variable set
    # later (a long-lived worker, a scheduler's job environment) is taken into account
    prefix = f"PYICEBERG_CATALOG__{name.upper().replace('-', '_')}__"
    properties = {
        key[len(prefix):].lower().replace("__", ".").replace("_", "-"): value
        for key, value in os.environ.items() if key.startswith(prefix)
    }
    try:
        return load_catalog(name, **properties)
    except Exception as exc:
        raise InputError(
            f"{url}: cannot load the Iceberg catalog {name!r}: {one_line(exc)}; configure it "
            f"with PYICEBERG_CATALOG__{name.upper()}__URI (and __WAREHOUSE) or ~/.pyiceberg.yaml"
        ) from None


def _read_iceberg_task(task, metadata, io_properties, location):
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io import load_file_io
    from pyiceberg.io.pyarrow import ArrowScan

    io = load_file_io(io_properties, location)
    table = ArrowScan(metadata, io, metadata.schema(), AlwaysTrue()).to_table([task])
    return table.to_pandas()


@dataclass(frozen=True)
class IcebergSource(Source):
    """A snapshot of an Apache Iceberg table, read file by file by the workers."""

    url: str
    catalog: str
    namespace: str
    table: str
    snapshot_id: int
    table_uuid: str
    location: str
    rows: int | None = field(default=None, compare=False)
    kind = "iceberg"

    def load(self):
        catalog = load_iceberg_catalog(self.catalog, self.url)
        return catalog.load_table((self.namespace, self.table))

    def open_table(self):
        import dask.dataframe as dd

        table = self.load()
        scan = table.scan(snapshot_id=self.snapshot_id)
        tasks = sorted(scan.plan_files(), key=lambda t: t.file.file_path)
        metadata = table.metadata
        meta = scan.projection().as_arrow().empty_table().to_pandas()
        if not tasks:
            return dd.from_pandas(meta, npartitions=1)
        return dd.from_map(
            _read_iceberg_task, tasks, metadata=metadata, io_properties=dict(table.io.properties),
            location=table.location(), meta=meta, enforce_metadata=False,
            label="read-iceberg",
        )

    def identity(self):
        return {"table_uuid": self.table_uuid, "snapshot_id": self.snapshot_id}

    def describe(self):
        return {"url": f"iceberg://{self.catalog}/{self.namespace}.{self.table}@{self.snapshot_id}",
                "kind": self.kind, "identity": self.identity()}

    def locations(self):
        return [_location_pair(self.location)]


def _location_pair(url):
    if is_local(url):
        return ("file", _local_path(url))
    return (_protocol(url), str(url).split("://", 1)[1].rstrip("/"))


def _open_iceberg(url):
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    name, namespace, table_name, snapshot = parse_iceberg_url(url)
    catalog = load_iceberg_catalog(name, url)
    try:
        table = catalog.load_table((namespace, table_name))
    except (NoSuchTableError, NoSuchNamespaceError):
        raise InputError(
            f"source {url}: the catalog {name!r} has no table {namespace}.{table_name}; "
            "check the namespace and table name"
        ) from None
    except Exception as exc:
        raise InputError(f"cannot reach source {url}: {one_line(exc)}") from None
    if snapshot is None:
        current = table.current_snapshot()
        if current is None:
            raise InputError(f"source {url} is an empty table (no snapshot); nothing to do")
        snapshot = current.snapshot_id
    elif table.snapshot_by_id(snapshot) is None:
        known = [s.snapshot_id for s in table.snapshots()][-5:]
        raise InputError(f"source {url}: no snapshot {snapshot} in the table; recent snapshots: {known}")
    return IcebergSource(str(url), name, namespace, table_name, int(snapshot),
                         str(table.metadata.table_uuid), table.location(),
                         rows=_snapshot_rows(table.snapshot_by_id(snapshot)))


def _snapshot_rows(snapshot):
    """Rows of an Iceberg snapshot, from its summary (None when it does not say)."""
    try:
        return int(snapshot.summary["total-records"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


# -- Delta Lake -------------------------------------------------------------------------


def delta_storage_options(url, storage_options=None):
    """deltalake's storage options for ``url``: plain HTTP allowed for a local endpoint."""
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if _protocol(url) in ("s3", "s3a") and endpoint and endpoint.startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    for key, value in (storage_options or {}).items():
        if key in ("endpoint_url", "client_kwargs") or isinstance(value, dict):
            continue  # fsspec-only options
        options[str(key)] = str(value)
    if _protocol(url) in ("s3", "s3a"):
        options.setdefault("AWS_CONDITIONAL_PUT", "etag")  # safe concurrent commits on S3
    return options


def _read_delta_file(path, storage_options, columns):
    import pyarrow.parquet as pq

    fs, fs_path = filesystem(path, storage_options)
    with fs.open(fs_path, "rb") as fh:
        table = pq.read_table(fh)
    return table.select(columns).to_pandas() if columns else table.to_pandas()


@dataclass(frozen=True)
class DeltaSource(Source):
    """A version of a Delta Lake table, read file by file by the workers."""

    url: str
    table_uri: str
    version: int
    files: tuple
    columns: tuple
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)
    rows: int | None = field(default=None, compare=False)
    kind = "delta"

    def open_table(self):
        import dask.dataframe as dd
        from deltalake import DeltaTable

        dt = DeltaTable(self.table_uri, version=self.version,
                        storage_options=delta_storage_options(self.table_uri, self.storage_options))
        meta = dt.schema().to_arrow() if hasattr(dt.schema(), "to_arrow") else dt.schema().to_pyarrow()
        import pyarrow as pa

        meta = pa.schema(meta).empty_table().to_pandas()
        if not self.files:
            return dd.from_pandas(meta, npartitions=1)
        return dd.from_map(_read_delta_file, list(self.files),
                           storage_options=dict(self.storage_options), columns=list(self.columns),
                           meta=meta, enforce_metadata=False, label="read-delta")

    def identity(self):
        return {"table": self.table_uri, "version": self.version}

    def locations(self):
        return [_location_pair(self.table_uri)]


def _open_delta(url, version, storage_options):
    from deltalake import DeltaTable

    table_uri = _local_path(url) if is_local(url) else str(url).rstrip("/")
    shown = redact(table_uri)
    try:
        dt = DeltaTable(table_uri, version=version,
                        storage_options=delta_storage_options(table_uri, storage_options))
    except Exception as exc:
        raise InputError(f"cannot read the Delta table {shown}: {one_line(exc)}") from None
    protocol = dt.protocol()
    features = set(getattr(protocol, "reader_features", None) or [])
    unsupported = features & {"deletionVectors", "columnMapping"}
    if unsupported:
        raise InputError(
            f"source {shown} uses Delta reader features {sorted(unsupported)} that emdask does "
            "not read; rewrite the table without them (REORG / a copy)"
        )
    partitions = list(dt.metadata().partition_columns)
    if partitions:
        raise InputError(
            f"source {shown} is partitioned by {partitions}; emdask reads unpartitioned Delta "
            "tables: give a copy without partition columns"
        )
    files = tuple(sorted(dt.file_uris()))
    if not is_local(table_uri):
        files = tuple(f if "://" in f else f"{_protocol(table_uri)}://{f}" for f in files)
    schema = dt.schema()
    arrow = schema.to_arrow() if hasattr(schema, "to_arrow") else schema.to_pyarrow()
    import pyarrow as pa

    columns = tuple(pa.schema(arrow).names)
    return DeltaSource(shown, table_uri, int(dt.version()), files, columns, dict(storage_options or {}),
                       rows=0 if not files else None)


# -- PostgreSQL -------------------------------------------------------------------------

_PG_OPTIONS = ("table", "query", "partition_on", "partitions", "watermark")
_IDENTIFIER = re.compile(r'^("[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)(\.("[^"]+"|[A-Za-z_][A-Za-z0-9_$]*))?$')


def _quote_identifier(name):
    return ".".join(p if p.startswith('"') else f'"{p}"' for p in re.findall(r'"[^"]+"|[^.]+', name))


def _pg_connect(conninfo):
    import adbc_driver_postgresql.dbapi

    return adbc_driver_postgresql.dbapi.connect(conninfo)


def _pg_fetch(conninfo, sql):
    with _pg_connect(conninfo) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


def _arrow_to_pandas(table):
    import pyarrow as pa

    # exact numerics (NUMERIC) arrive as decimals: model them as floats
    fields = []
    for f in table.schema:
        if pa.types.is_decimal(f.type):
            fields.append(pa.field(f.name, pa.float64()))
        else:
            fields.append(f)
    return table.cast(pa.schema(fields)).to_pandas()


def _read_pg_range(bounds, conninfo, base, column):
    lo, hi, last = bounds
    if lo is None:
        where = f"{column} IS NULL"
    else:
        where = f"{column} >= {lo} AND {column} {'<=' if last else '<'} {hi}"
    return _arrow_to_pandas(_pg_fetch(conninfo, f"SELECT * FROM ({base}) AS src WHERE {where} ORDER BY {column}"))


@dataclass(frozen=True)
class PostgresSource(Source):
    """A PostgreSQL table or query, read in parallel ranges of an indexed integer column."""

    url: str
    conninfo: str = field(repr=False)
    base: str = ""
    partition_on: str | None = None
    ranges: tuple = ()
    watermark: str | None = None
    rows: int | None = field(default=None, compare=False)
    kind = "postgresql"

    def open_table(self):
        import dask.dataframe as dd

        meta = _arrow_to_pandas(_pg_fetch(self.conninfo, f"SELECT * FROM ({self.base}) AS src LIMIT 0"))
        if self.partition_on is None:
            return dd.from_map(lambda _: _arrow_to_pandas(_pg_fetch(self.conninfo, self.base)), [0],
                               meta=meta, enforce_metadata=False, label="read-postgresql")
        return dd.from_map(_read_pg_range, list(self.ranges), conninfo=self.conninfo, base=self.base,
                           column=_quote_identifier(self.partition_on), meta=meta,
                           enforce_metadata=False, label="read-postgresql")

    def identity(self):
        return None if self.watermark is None else {"watermark": self.watermark}


def _pg_ranges(lo, hi, partitions, has_null):
    if lo is None:
        return ((None, None, True),)
    lo, hi = int(lo), int(hi)
    n = max(1, min(int(partitions), hi - lo + 1))
    edges = [lo + (hi - lo + 1) * i // n for i in range(n)] + [hi]
    ranges = [(edges[i], edges[i + 1], i == n - 1) for i in range(n)]
    if has_null:
        ranges.append((None, None, True))
    return tuple(ranges)


def _open_postgres(url):
    parts = urlsplit(str(url))
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    ours = {k: query.pop(k) for k in list(query) if k in _PG_OPTIONS}
    query.setdefault("connect_timeout", os.environ.get("PGCONNECT_TIMEOUT", "10"))
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
    shown = redact(urlunsplit(("postgresql", parts.netloc, parts.path,
                               urlencode({k: v for k, v in ours.items()}), "")))
    table, sql = ours.get("table"), ours.get("query")
    if bool(table) == bool(sql):
        raise InputError(
            f"source {shown}: give exactly one of ?table=SCHEMA.TABLE or ?query=SELECT..."
        )
    if table and not _IDENTIFIER.match(table):
        raise InputError(f"source {shown}: table {table!r} is not a table name (SCHEMA.TABLE)")
    base = f"SELECT * FROM {_quote_identifier(table)}" if table else sql
    try:
        partitions = int(ours.get("partitions", "0") or 0)
    except ValueError:
        raise InputError(f"source {shown}: partitions={ours['partitions']!r} is not an integer") from None
    column = ours.get("partition_on")
    try:
        with _pg_connect(conninfo) as conn, conn.cursor() as cur:
            if column is None and table:
                cur.execute(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = "
                    f"'{_quote_identifier(table)}'::regclass AND i.indisprimary"
                )
                keys = [r[0] for r in cur.fetchall()]
                column = keys[0] if len(keys) == 1 else None
            if column is not None and not _IDENTIFIER.match(column):
                raise InputError(f"source {shown}: partition_on={column!r} is not a column name")
            if column is None:
                cur.execute(f"SELECT count(*) FROM ({base}) AS src")
                rows = cur.fetchall()[0][0]
                ranges = ()
            else:
                q = _quote_identifier(column)
                cur.execute(f"SELECT min({q}), max({q}), count(*) - count({q}), count(*) "
                            f"FROM ({base}) AS src")
                lo, hi, nulls, rows = cur.fetchone()
                if lo is not None and not isinstance(lo, int):
                    raise InputError(
                        f"source {shown}: partition_on column {column!r} is not an integer "
                        "column; name an indexed integer column"
                    )
                wanted = partitions or max(1, min(64, int(rows) // 250_000 + 1))
                ranges = _pg_ranges(lo, hi, wanted, bool(nulls))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read source {shown}: {one_line(exc)}") from None
    return PostgresSource(shown, conninfo, base, column, ranges, ours.get("watermark") or None,
                          rows=None if rows is None else int(rows))


# --------------------------------------------------------------------------------------


def open_source(url, storage_options=None):
    """Check the source named by ``url`` and pin what it reads.

    Parameters
    ----------
    url : str or path
        See the module's table of forms.
    storage_options : dict, optional
        fsspec options for object-store URLs (endpoint, region, ...); credentials belong
        in the environment, not here.

    Returns
    -------
    Source

    Raises
    ------
    InputError
        An unknown scheme, nothing at the URL, an unreachable endpoint, refused credentials,
        a missing table: the message names the source and says what to do.
    """
    if isinstance(url, Source):
        return url
    if not isinstance(url, (str, os.PathLike)) or not str(url).strip():
        raise InputError("source is empty; give the path or URL of a table")
    text = str(url).strip()
    protocol = _protocol(text)
    if protocol == "iceberg":
        return _open_iceberg(text)
    if protocol in ("postgresql", "postgres"):
        return _open_postgres(text)
    if text.startswith("delta+"):
        raise InputError(f"{redact(text)}: the delta+ prefix names a new Delta table to create; "
                         "a source must exist")
    m = _AT_VERSION.match(text)
    if m and not _glob.has_magic(text):
        fs, path = filesystem(m["base"], storage_options)
        if fs.exists(posixpath.join(path, "_delta_log")):
            return _open_delta(m["base"], int(m["version"]), storage_options)
    if is_local(text):
        text = _local_path(text)
    return _open_files(text, storage_options)
