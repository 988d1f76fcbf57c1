"""Warehouse input and output: read a source table, check it, and publish new dataset versions.

Nothing here imports Prefect: the flows call these functions from their tasks, and anyone can
call them directly.

Input
-----
A source is a Parquet dataset (a directory, a ``.parquet`` file, or a glob of them) or CSV
(a ``.csv`` / ``.csv.gz`` file or a glob of them). It is read lazily with Dask and never
modified.

Output layout
-------------
Every run writes a new *version* of its destination directory ``DEST``::

    DEST/
      CURRENT                     one line: the name of the published version
      versions/
        20250101T020000123456Z-3f2a9c1d/
          manifest.json           what was run on what, and what came out (written last)
          data/part.N.parquet     the output table (per flow: data/, segments/, labels.npy ...)
          model/                  the fitted model (JSON + .npz, readable by emdask.load)
          convergence.png         mean log-likelihood per EM iteration
      .staging/                   versions being written; never read
      .checkpoints/<run key>/     the EM state of a run still fitting (see below)

A version is written under ``.staging/``, validated there, moved into ``versions/`` by one
``rename`` and published by atomically replacing ``CURRENT`` (write a temporary file, then
``os.replace``). Readers resolve ``CURRENT`` once (:func:`published_path`) and read an
immutable directory, so they see the previous version or the new one, never a mix. A run that
fails removes its staging directory; ``CURRENT`` and every published version stay as they were.
A process killed outright may leave a directory under ``.staging/``: it is never read, and can
be deleted when no run is writing to ``DEST``.

While a run fits its model, the EM state is checkpointed after every iteration under
``.checkpoints/<run key>``. A run killed mid-fit and started again with the same parameters on
the same source resumes from there and reaches the model an uninterrupted run would have. A run
that ends, published or failed, removes its checkpoint; only a process killed outright leaves
one behind (like its staging directory), for the next run to resume from.

A version's name is its UTC creation time and the first characters of its *run key*, a digest
of the flow, its parameters, the emdask version and the source's files (names, sizes and
modification times). Re-running a flow with the same parameters on an unchanged source finds
the run key in the published manifest and does nothing (``force=True`` recomputes and
publishes a new version, identical in content for the same ``random_state``). The newest
``keep_versions`` versions are kept; older ones are removed after a publish.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "InputError",
    "SourceInfo",
    "TableProfile",
    "check_destination",
    "check_source",
    "check_table_columns",
    "column_kinds",
    "discard_staging",
    "find_published",
    "list_versions",
    "new_staging",
    "open_table",
    "partition_files",
    "profile_table",
    "publish",
    "published_path",
    "read_manifest",
    "run_key",
    "write_manifest",
]

CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING = ".staging"
CHECKPOINTS = ".checkpoints"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "emdask-dataset-version"
_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz")
_VERSION_NAME = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{8}$")


class InputError(ValueError):
    """Bad input to a pipeline (a path, a column, a parameter); the message says what to do."""


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceInfo:
    """Where a source table is and how to read it."""

    path: str
    format: str  # "parquet" or "csv"
    files: tuple

    def fingerprint(self):
        """Names, sizes and modification times of the source's files."""
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append([f, st.st_size, st.st_mtime_ns])
        return out


def _is_csv(name):
    return str(name).lower().endswith(_CSV_SUFFIXES)


def _data_files(directory):
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for n in sorted(names):
            if not n.startswith((".", "_")) or n in ("_metadata", "_common_metadata"):
                files.append(os.path.join(root, n))
    return files


def check_source(source):
    """Check that ``source`` names a readable Parquet dataset or CSV file(s).

    Returns
    -------
    SourceInfo

    Raises
    ------
    InputError
        Nothing at the path, an empty directory, or files of an unknown kind.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise InputError("source is empty; give the path of a Parquet dataset or a CSV file")
    text = os.path.expanduser(str(source))
    if _glob.has_magic(text):
        files = sorted(p for p in _glob.glob(text) if os.path.isfile(p))
        if not files:
            raise InputError(f"source {source} matches no file; check the pattern")
        kinds = {"csv" if _is_csv(f) else "parquet" for f in files}
        if len(kinds) > 1:
            raise InputError(f"source {source} matches both CSV and Parquet files; narrow the pattern")
        fmt = kinds.pop()
        return SourceInfo(text, fmt, tuple(os.path.abspath(f) for f in files))
    path = Path(text)
    if not path.exists():
        raise InputError(
            f"source {source} does not exist; give the path of a Parquet dataset (directory or "
            ".parquet file) or a .csv file"
        )
    if path.is_dir():
        files = _data_files(path)
        if not any(not os.path.basename(f).startswith("_") for f in files):
            raise InputError(f"source {source} is an empty directory; it holds no Parquet file")
        csv = [f for f in files if _is_csv(f)]
        if csv:
            raise InputError(
                f"source {source} is a directory of CSV files; give a glob such as "
                f"'{os.path.join(str(source), '*.csv')}'"
            )
        return SourceInfo(str(path.resolve()), "parquet", tuple(files))
    if not os.access(path, os.R_OK):
        raise InputError(f"source {source} is not readable; check its permissions")
    fmt = "csv" if _is_csv(path) else "parquet"
    if fmt == "parquet":
        with open(path, "rb") as fh:
            if fh.read(4) != b"PAR1":
                raise InputError(
                    f"source {source} is neither a Parquet file nor a .csv file; convert it or "
                    "give the right path"
                )
    return SourceInfo(str(path.resolve()), fmt, (str(path.resolve()),))


def open_table(source):
    """The source as a lazy Dask DataFrame (same partitions every time it is opened)."""
    import dask.dataframe as dd

    info = source if isinstance(source, SourceInfo) else check_source(source)
    try:
        if info.format == "csv":
            paths = list(info.files)
            # nullable dtypes: an integer column keeps its type when a later block has gaps
            return dd.read_csv(paths if len(paths) > 1 else paths[0], blocksize="64MB",
                               dtype_backend="numpy_nullable")
        return dd.read_parquet(info.path)
    except InputError:
        raise
    except Exception as exc:  # unreadable or corrupt file
        raise InputError(
            f"cannot read source {info.path} as {info.format}: {_one_line(exc)}"
        ) from exc


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def column_kinds(dtypes):
    """Which model family can take each column: ``'numeric'``, ``'categorical'`` or None.

    Booleans and numbers are numeric; strings, objects and categories are categorical;
    anything else (dates, times, nested values) cannot be modelled.
    """
    kinds = {}
    for name, dtype in dtypes.items():
        if pd.api.types.is_bool_dtype(dtype) or (
            pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
        ):
            kinds[name] = "numeric"
        elif (
            isinstance(dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(dtype)
            or pd.api.types.is_object_dtype(dtype)
        ):
            kinds[name] = "categorical"
        else:
            kinds[name] = None
    return kinds


def check_table_columns(dtypes, id_column, columns=None, *, what="columns"):
    """Check the id column and the chosen columns against the table's columns.

    Parameters
    ----------
    dtypes : pandas.Series
        The table's dtypes (``frame.dtypes``), from metadata only.
    id_column : str
    columns : list of str, optional
        Columns to model; default: every column a family can model except the id column.
    what : str
        The parameter's name, for messages.

    Returns
    -------
    list of str
        The columns to model, in table order for the default.
    """
    names = [str(c) for c in dtypes.index]
    if id_column not in names:
        raise InputError(
            f"id column {id_column!r} is not in the table; available columns: {names}"
        )
    kinds = column_kinds(dtypes)
    if columns is None:
        chosen = [c for c in names if c != id_column and kinds[c] is not None]
        if not chosen:
            raise InputError(
                f"the table has no column to model besides the id column {id_column!r}; "
                f"columns: {names}"
            )
        return chosen
    chosen = list(columns)
    if not chosen:
        raise InputError(f"{what} is empty; name at least one column, or leave it out for all")
    absent = [c for c in chosen if c not in names]
    if absent:
        raise InputError(f"{what}: column(s) {absent} not in the table; available columns: {names}")
    if id_column in chosen:
        raise InputError(f"{what} names the id column {id_column!r}; ids are not modelled")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"{what} names a column twice: {chosen}")
    bad = [c for c in chosen if kinds[c] is None]
    if bad:
        raise InputError(
            f"{what}: column(s) {bad} have types no model takes "
            f"({', '.join(str(dtypes[c]) for c in bad)}); leave them out"
        )
    return chosen


@dataclass
class TableProfile:
    """Rows, missing cells and types of a table, from one pass."""

    rows: int
    partitions: int
    missing: dict = field(default_factory=dict)  # column -> missing cells
    dtypes: dict = field(default_factory=dict)  # column -> dtype name

    def missing_rate(self):
        return {c: (n / self.rows if self.rows else 0.0) for c, n in self.missing.items()}

    def to_dict(self):
        return asdict(self)


def _profile_part(part, id_column, columns):
    return {
        "rows": len(part),
        "missing": {c: int(part[c].isna().sum()) for c in columns},
        "id_missing": int(part[id_column].isna().sum()),
    }


def profile_table(source, id_column, columns):
    """Count rows and missing cells, and check the ids, in one pass over the table.

    Ids are checked for uniqueness by hash-partitioned counting, so no single process holds
    them all.

    Raises
    ------
    InputError
        An empty table, missing ids, or ids that are not unique.
    """
    import dask

    ddf = open_table(source)
    parts = ddf[[id_column, *columns]].to_delayed()
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        counts = ddf[id_column].value_counts(split_out=max(1, ddf.npartitions // 4))
        repeated = counts[counts > 1]
        *results, n_repeated = dask.compute(
            *[dask.delayed(_profile_part)(p, id_column, columns) for p in parts],
            repeated.size.to_delayed(),
        )
    rows = sum(r["rows"] for r in results)
    if rows == 0:
        raise InputError(f"source {_source_name(source)} is an empty table (0 rows); nothing to do")
    id_missing = sum(r["id_missing"] for r in results)
    if id_missing:
        raise InputError(
            f"id column {id_column!r} has {id_missing} missing value(s); every row needs an id"
        )
    if n_repeated:
        examples = repeated.head(3, npartitions=-1).index.tolist()
        raise InputError(
            f"id column {id_column!r} is not unique ({int(n_repeated)} value(s) repeated, "
            f"e.g. {examples}); choose a column that identifies rows"
        )
    missing = {c: sum(r["missing"][c] for r in results) for c in columns}
    return TableProfile(
        rows=int(rows),
        partitions=ddf.npartitions,
        missing=missing,
        dtypes={c: str(ddf.dtypes[c]) for c in columns},
    )


def _source_name(source):
    return source.path if isinstance(source, SourceInfo) else str(source)


# --------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------


def _inside(a, b):
    """Whether path ``a`` is ``b`` or lies inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_destination(dest, source=None):
    """Check that ``dest`` can receive versions without touching the source or other data.

    ``dest`` must differ from the source (and neither may contain the other), be creatable
    and writable, and, when it exists and is not empty, be an emdask output directory.
    Nothing is written.

    Returns
    -------
    pathlib.Path
        ``dest``, absolute.
    """
    if not isinstance(dest, (str, os.PathLike)) or not str(dest).strip():
        raise InputError("destination is empty; give a directory to publish versions in")
    path = Path(os.path.expanduser(str(dest))).resolve()
    if source is not None:
        src_paths = source.files if isinstance(source, SourceInfo) else (str(source),)
        roots = {Path(p).resolve() for p in src_paths}
        if isinstance(source, SourceInfo) and source.format == "parquet" and Path(source.path).is_dir():
            roots.add(Path(source.path).resolve())
        for root in roots:
            if path == root or _inside(path, root) or _inside(root, path):
                raise InputError(
                    f"destination {dest} is the source or overlaps it ({root}); choose a "
                    "separate directory, the source is never modified"
                )
    if path.exists():
        if not path.is_dir():
            raise InputError(f"destination {dest} exists and is not a directory; choose a directory")
        # a first run killed outright leaves only its working directories behind
        entries = [e for e in os.listdir(path) if e not in (STAGING, CHECKPOINTS)]
        if entries and not (path / CURRENT).exists() and not (path / VERSIONS).is_dir():
            raise InputError(
                f"destination {dest} is a non-empty directory that holds no emdask output; "
                "choose a new or empty directory"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"destination {dest} is not writable; check its permissions")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(
            f"destination {dest} cannot be created: {parent} is a file, not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"destination {dest} cannot be created: {parent} is not writable; check its permissions"
        )
    return path


def run_key(flow_name, parameters, source_fingerprint, library_version):
    """Digest of everything that determines a run's output."""
    document = {
        "flow": flow_name,
        "parameters": parameters,
        "source": source_fingerprint,
        "emdask": library_version,
    }
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _version_name(key):
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%f}Z-{key[:8]}"


def checkpoint_path(dest, key):
    """Where a run's EM state is checkpointed while it fits: ``DEST/.checkpoints/<run key>``."""
    return Path(dest) / CHECKPOINTS / key


def drop_checkpoint(dest, key):
    """Remove a run's checkpoint (once its version is published)."""
    root = Path(dest) / CHECKPOINTS
    shutil.rmtree(root / key, ignore_errors=True)
    try:
        root.rmdir()  # only when empty
    except OSError:
        pass


def new_staging(dest, key):
    """Create ``DEST/.staging/<version>`` for a new version and return it."""
    dest = Path(dest)
    staging_root = dest / STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    while True:
        staged = staging_root / _version_name(key)
        try:
            staged.mkdir()
            return staged
        except FileExistsError:  # two runs in the same microsecond
            continue


def discard_staging(staged):
    """Remove a staging directory (after a failure); the published versions are untouched."""
    staged = Path(staged)
    if staged.parent.name != STAGING:
        raise ValueError(f"{staged} is not a staging directory")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        staged.parent.rmdir()  # only when empty
    except OSError:
        pass


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


def _write_text_atomic(path, text):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def write_manifest(staged, manifest):
    """Write ``manifest.json`` into a staged version (the last file written)."""
    document = {"format": MANIFEST_FORMAT, "version": Path(staged).name, **manifest}
    _write_text_atomic(Path(staged) / MANIFEST, json.dumps(document, indent=2, default=_json_default) + "\n")
    return Path(staged) / MANIFEST


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_manifest(version_dir):
    with open(Path(version_dir) / MANIFEST) as fh:
        return json.load(fh)


def published_version(dest):
    """Name of the published version of ``dest``, or None."""
    pointer = Path(dest) / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not _VERSION_NAME.match(name):
        raise InputError(f"{pointer} does not name a version ({name!r}); it was edited by hand")
    return name


def published_path(dest):
    """Directory of the published version of ``dest`` (resolve once, then read from it), or None."""
    name = published_version(dest)
    return None if name is None else Path(dest) / VERSIONS / name


def list_versions(dest):
    """Names of the complete versions under ``dest``, oldest first."""
    root = Path(dest) / VERSIONS
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if _VERSION_NAME.match(p.name) and (p / MANIFEST).exists()
    )


def find_published(dest, key):
    """The published version's directory when its run key is ``key`` (nothing to do), else None."""
    path = published_path(dest) if Path(dest).is_dir() else None
    if path is None or not (path / MANIFEST).exists():
        return None
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        return None
    return path if manifest.get("run_key") == key else None


def publish(dest, staged, keep_versions=5):
    """Move a validated staged version into ``versions/`` and point ``CURRENT`` at it.

    The move is one ``rename`` within ``dest``; the switch is one atomic ``os.replace`` of
    ``CURRENT``. Versions beyond the newest ``keep_versions`` (never the published one) are
    removed afterwards.

    Returns
    -------
    pathlib.Path
        The published version's directory.
    """
    dest, staged = Path(dest), Path(staged)
    if not (staged / MANIFEST).exists():
        raise RuntimeError(f"{staged} has no manifest; only complete versions are published")
    versions = dest / VERSIONS
    versions.mkdir(exist_ok=True)
    final = versions / staged.name
    os.rename(staged, final)
    _fsync_dir(versions)
    _write_text_atomic(dest / CURRENT, staged.name + "\n")
    try:
        staged.parent.rmdir()
    except OSError:
        pass
    _prune(dest, keep_versions, keep=staged.name)
    return final


def _prune(dest, keep_versions, keep):
    names = list_versions(dest)
    old = [n for n in names[: max(0, len(names) - max(1, int(keep_versions)))] if n != keep]
    for name in old:
        shutil.rmtree(Path(dest) / VERSIONS / name, ignore_errors=True)


def partition_files(directory):
    """The ``part.N.parquet`` files Dask wrote to ``directory``, in partition order."""
    files = []
    for p in Path(directory).iterdir():
        m = re.match(r"^part\.(\d+)\.parquet$", p.name)
        if m:
            files.append((int(m.group(1)), p))
    return [p for _, p in sorted(files)]


# --------------------------------------------------------------------------------------
# Validation of a staged version against its source
# --------------------------------------------------------------------------------------


class ValidationError(RuntimeError):
    """A staged version does not meet the data contract; it is not published."""


def _same_cells(a, b):
    """Whether two arrays of observed cells are identical (bit for bit for floats)."""
    if a.shape != b.shape:
        return False
    if a.dtype == np.float64 and b.dtype == np.float64:
        return np.array_equal(a.view(np.int64), b.view(np.int64))
    try:
        return bool(np.all(np.asarray(a == b, dtype=bool)))
    except (TypeError, ValueError):
        return False


def _values(series):
    if pd.api.types.is_float_dtype(series.dtype) and isinstance(series.dtype, np.dtype):
        return series.to_numpy()
    return series.to_numpy(dtype=object)


def _check_filled_part(src, out_path, mask_path, id_column, fill_columns, number):
    out = pd.read_parquet(out_path)
    problems = []
    where = f"partition {number}"
    if len(out) != len(src):
        return {"rows": len(out), "problems": [f"{where}: {len(out)} rows, the source has {len(src)}"],
                "missing_after": {}}
    if list(out.columns) != list(src.columns):
        problems.append(f"{where}: columns {list(out.columns)} differ from the source's {list(src.columns)}")
        return {"rows": len(out), "problems": problems, "missing_after": {}}
    if not _same_cells(_values(src[id_column]), _values(out[id_column])):
        problems.append(f"{where}: ids differ from the source's")
    if not src.index.equals(out.index) and src.index.name is not None:
        problems.append(f"{where}: the index differs from the source's")
    for c in src.columns:
        observed = src[c].notna().to_numpy()
        if not _same_cells(_values(src[c])[observed], _values(out[c])[observed]):
            problems.append(f"{where}: observed cells of column {c!r} changed")
    missing_after = {c: int(out[c].isna().sum()) for c in fill_columns}
    if mask_path is not None:
        mask = pd.read_parquet(mask_path)
        if len(mask) != len(src) or not _same_cells(_values(src[id_column]), _values(mask[id_column])):
            problems.append(f"{where}: the filled-cell marks do not match the source's rows")
        else:
            for c in fill_columns:
                if not np.array_equal(mask[c].to_numpy(dtype=bool), src[c].isna().to_numpy()):
                    problems.append(f"{where}: filled-cell marks of column {c!r} are wrong")
    return {"rows": len(out), "problems": problems, "missing_after": missing_after}


def validate_filled(source, out_dir, id_column, fill_columns, mask_dir=None):
    """Check a filled table written partition by partition against its source.

    Same row count and ids (in order, partition by partition), same columns, every observed
    cell unchanged, and (when ``mask_dir`` is given) filled-cell marks equal to the source's
    missing cells. Missing cells left in ``fill_columns`` are counted, not judged here.

    Returns
    -------
    dict
        ``rows`` and ``missing_after`` (column -> missing cells in the output).

    Raises
    ------
    ValidationError
        Naming the first problems found.
    """
    import dask

    ddf = open_table(source)
    parts = ddf.to_delayed()
    files = partition_files(out_dir)
    masks = partition_files(mask_dir) if mask_dir is not None else [None] * len(files)
    if len(files) != len(parts) or len(masks) != len(parts):
        raise ValidationError(
            f"{out_dir} has {len(files)} partition files for {len(parts)} source partitions"
        )
    results = dask.compute(*[
        dask.delayed(_check_filled_part)(p, str(f), None if m is None else str(m), id_column,
                                         list(fill_columns), i)
        for i, (p, f, m) in enumerate(zip(parts, files, masks))
    ])
    problems = [msg for r in results for msg in r["problems"]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValidationError(f"{out_dir} fails validation: {'; '.join(problems[:3])}{more}")
    return {
        "rows": int(sum(r["rows"] for r in results)),
        "missing_after": {c: int(sum(r["missing_after"][c] for r in results)) for c in fill_columns},
    }


def _check_segments_part(src_ids, out_path, id_column, n_components, number):
    out = pd.read_parquet(out_path)
    where = f"partition {number}"
    problems = []
    if len(out) != len(src_ids):
        return {"rows": len(out), "counts": np.zeros(n_components, np.int64),
                "problems": [f"{where}: {len(out)} rows, the source has {len(src_ids)}"]}
    if not _same_cells(_values(src_ids[id_column]), _values(out[id_column])):
        problems.append(f"{where}: ids differ from the source's")
    seg = out["segment"].to_numpy()
    if len(seg) and (seg.min() < 0 or seg.max() >= n_components):
        problems.append(f"{where}: segment outside 0..{n_components - 1}")
    proba = out[[f"p_{j}" for j in range(n_components)]].to_numpy()
    if np.isnan(proba).any() or (len(proba) and not np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)):
        problems.append(f"{where}: membership probabilities are missing or do not sum to 1")
    counts = np.bincount(seg[(seg >= 0) & (seg < n_components)], minlength=n_components)
    return {"rows": len(out), "counts": counts, "problems": problems}


def validate_segments(source, out_dir, id_column, n_components):
    """Check a segment table against its source: same ids in order, labels and probabilities valid.

    Returns
    -------
    dict
        ``rows`` and ``counts`` (rows per segment).
    """
    import dask

    ddf = open_table(source)
    # whole partitions: a column projection lets Dask fuse Parquet partitions, and the
    # check pairs each source partition with the output file written from it
    parts = ddf.to_delayed()
    files = partition_files(out_dir)
    if len(files) != len(parts):
        raise ValidationError(
            f"{out_dir} has {len(files)} partition files for {len(parts)} source partitions"
        )
    results = dask.compute(*[
        dask.delayed(_check_segments_part)(p, str(f), id_column, n_components, i)
        for i, (p, f) in enumerate(zip(parts, files))
    ])
    problems = [msg for r in results for msg in r["problems"]]
    if problems:
        raise ValidationError(f"{out_dir} fails validation: {'; '.join(problems[:3])}")
    counts = sum(r["counts"] for r in results)
    return {"rows": int(sum(r["rows"] for r in results)), "counts": [int(c) for c in counts]}
