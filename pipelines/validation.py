"""Checks of a flow's data: the input table's columns and ids, and each output against its source.

Inputs are checked before any work, on metadata (:func:`check_table_columns`,
:func:`check_not_empty`), then by :func:`profile_table` in the first pass over the data (rows,
ids present and unique, columns with an observed value, no infinite value, no value whose square
overflows, Parquet data that decodes; :func:`check_components`: no more components than rows);
outputs are checked before the commit, partition by partition on the workers, each output
partition against the source partition it came from: same rows and ids in order, observed cells
unchanged bit for bit, no cell left missing where a fill was asked for.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from emdask.engine import columns as column_rules

from .errors import InputError, ValidationError, one_line
from .sources import FileSource, filesystem, open_source, storage_options_for
from .versions import partition_files

__all__ = [
    "TableProfile",
    "check_components",
    "check_not_empty",
    "check_table_columns",
    "column_kinds",
    "damaged_files_as_input",
    "data_errors_as_input",
    "numbers_as_text",
    "profile_table",
    "validate_filled",
    "validate_segments",
]


def column_kinds(dtypes):
    """Which model family can take each column: ``'numeric'``, ``'categorical'`` or None.

    Booleans and numbers are numeric; strings, objects and categories are categorical;
    anything else (dates, times, nested values) cannot be modelled.
    """
    return {name: column_rules.table_kind(dtype) for name, dtype in dtypes.items()}


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


@contextmanager
def data_errors_as_input():
    """Report a column the model refuses (its type or range: :class:`emdask.engine.columns.DataError`)
    as bad input, so the run stops with its message and is not retried."""
    try:
        yield
    except column_rules.DataError as exc:
        raise InputError(str(exc)) from None


def _decode_file(url, columns, storage_options):
    """None when every row group of the Parquet file at ``url`` decodes (``columns`` only,
    default all), else the error in one line."""
    import pyarrow.parquet as pq

    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            if columns is not None:  # not those of a folder's name (hive partitioning)
                columns = [c for c in columns if c in parquet.schema_arrow.names]
            for i in range(parquet.num_row_groups):
                parquet.read_row_group(i, columns=columns)
    except Exception as exc:
        return "".join(ch if ch.isprintable() else "?" for ch in one_line(exc))
    return None


def _damaged_file(source, columns=None):
    """``(name, error)`` of the first Parquet file of ``source`` whose data does not decode,
    each file checked on a worker; None when they all decode."""
    import dask
    import posixpath

    files = [f for f in source.files if not posixpath.basename(f).startswith("_")]
    errors = dask.compute(*[
        dask.delayed(_decode_file, pure=False)(f, columns, source.storage_options) for f in files
    ])
    for f, error in zip(files, errors):
        if error is not None:
            root = source.root.rstrip("/")
            name = f[len(root) + 1:] if root and f.startswith(root + "/") else posixpath.basename(f)
            return name, error
    return None


@contextmanager
def damaged_files_as_input(source, columns=None):
    """Report a Parquet file of ``source`` whose footer reads but whose data does not decode
    (a damaged page) as bad input naming the file, so the run stops and is not retried.

    When a read fails, each file of the source is decoded (``columns`` only) to find the
    damaged one; when every file decodes, the failure was not the data's and is raised as it
    was (an I/O error is retried).
    """
    try:
        yield
    except (InputError, ValidationError, column_rules.DataError):
        raise
    except Exception:
        if not (isinstance(source, FileSource) and source.format == "parquet"):
            raise
        damaged = _damaged_file(source, columns)
        if damaged is None:
            raise
        name, error = damaged
        raise InputError(
            f"source {source.url}: {name} is damaged: its data cannot be decoded ({error}); "
            "replace or remove it"
        ) from None


def _empty(source):
    return InputError(f"source {source.url} is an empty table (0 rows); nothing to do")


def check_not_empty(source):
    """Raise InputError when the source's metadata says it has no row (unknown: no check)."""
    if getattr(source, "rows", None) == 0:
        raise _empty(source)


@dataclass
class TableProfile:
    """Rows, missing cells and types of a table, from one pass."""

    rows: int
    partitions: int
    missing: dict = field(default_factory=dict)  # column -> missing cells
    dtypes: dict = field(default_factory=dict)  # column -> dtype name
    #: text column -> {"observed", "numbers": values that parse as numbers, "bad": one that does not}
    text: dict = field(default_factory=dict)
    #: rows with at least one observed cell among the columns (the rows a model learns from)
    observed_rows: int = 0

    def missing_rate(self):
        return {c: (n / self.rows if self.rows else 0.0) for c, n in self.missing.items()}

    def to_dict(self):
        return asdict(self)


def _text_part(values):
    observed = int(values.notna().sum())
    if column_rules.is_boolean_values(values):
        return {"observed": observed, "numbers": 0, "bad": None, "booleans": observed}
    parsed, bad = column_rules.parse_numbers(values)
    numbers = int((~np.isnan(parsed)).sum())
    return {"observed": observed, "numbers": numbers, "bad": bad, "booleans": 0}


def _number_part(values):
    """Infinite cells and the finite range of a column read as numbers (None: not numbers)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return None
    if column_rules.is_text_dtype(values.dtype):
        if column_rules.is_boolean_values(values):
            return None
        x, bad = column_rules.parse_numbers(values)
        if bad is not None:
            return None
    else:
        x = values.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = x[np.isfinite(x)]
    return {"inf": int(np.isinf(x).sum()),
            "min": float(finite.min()) if finite.size else np.nan,
            "max": float(finite.max()) if finite.size else np.nan}


def _profile_part(part, id_column, columns):
    return {
        "rows": len(part),
        "observed_rows": int(part[columns].notna().any(axis=1).sum()) if columns else 0,
        "missing": {c: int(part[c].isna().sum()) for c in columns},
        "id_missing": int(part[id_column].isna().sum()),
        "text": {c: _text_part(part[c]) for c in columns if column_rules.is_text_dtype(part[c].dtype)},
        "numbers": {c: _number_part(part[c]) for c in columns},
    }


def _check_values(results, columns, rows, missing):
    """Refuse, naming the column, one that no model can take: no observed cell, an infinite
    value, values whose squares overflow float64."""
    empty = [c for c in columns if missing[c] == rows]
    if empty:
        raise InputError(
            f"column(s) {empty} have no observed value (all {rows:,} cells missing); "
            "leave them out of the modelled columns"
        )
    numbers = {}
    for c in columns:
        parts = [r["numbers"][c] for r in results if r["numbers"][c] is not None]
        if len(parts) == len(results):  # read as numbers in every partition
            numbers[c] = parts
    inf = {c: sum(p["inf"] for p in parts) for c, parts in numbers.items()}
    inf = {c: n for c, n in inf.items() if n}
    if inf:
        c, n = next(iter(inf.items()))
        raise InputError(
            f"column {c!r} holds {n} infinite value(s)"
            + (f" (and column(s) {list(inf)[1:]} too)" if len(inf) > 1 else "")
            + "; replace them with finite values, or blank them (a missing cell is filled)"
        )
    names = list(numbers)
    lo = [np.nanmin([p["min"] for p in numbers[c]] + [np.inf]) for c in names]
    hi = [np.nanmax([p["max"] for p in numbers[c]] + [-np.inf]) for c in names]
    with data_errors_as_input():
        column_rules.check_range(names, np.array(lo), np.array(hi))


def check_components(profile, largest, what="n_components"):
    """Refuse more components than the table has rows to learn them from (first pass)."""
    if largest > profile.observed_rows:
        raise InputError(
            f"{what}={largest} is more than the {profile.observed_rows:,} row(s) with an "
            f"observed value in the modelled columns; ask for at most {profile.observed_rows}"
        )


def _combine_text(results, columns):
    text = {}
    for c in columns:
        parts = [r["text"][c] for r in results if c in r["text"]]
        if not parts:
            continue
        bad = next((p["bad"] for p in parts if p["bad"] is not None), None)
        text[c] = {
            "observed": sum(p["observed"] for p in parts),
            "numbers": sum(p["numbers"] for p in parts),
            "booleans": sum(p["booleans"] for p in parts),
            "bad": None if bad is None else str(bad),
        }
    return text


def numbers_as_text(profile):
    """Text columns of a profile that hold numbers stored as text (every observed value
    parses as a number).

    Raises
    ------
    InputError
        A text column of which most observed values are numbers but one is not, naming the
        column and the value: the column was meant as numbers, and a model would otherwise
        take it for a column of labels.
    """
    parsed = []
    for c, t in profile.text.items():
        if t["observed"] == 0 or t["booleans"]:
            continue
        if t["bad"] is None:
            parsed.append(c)
        elif t["numbers"] * 2 > t["observed"]:
            raise InputError(
                f"column {c!r} holds numbers stored as text, but {t['bad']!r} is not a number "
                f"({t['observed'] - t['numbers']} of {t['observed']} values are not); fix or "
                "blank those cells, or store the column as a category to model it as labels"
            )
    return parsed


def profile_table(source, id_column, columns):
    """Count rows and missing cells, and check the ids, in one pass over the table.

    Ids are checked for uniqueness by hash-partitioned counting, so no single process holds
    them all.

    Raises
    ------
    InputError
        An empty table, missing ids, ids that are not unique, or a column with no observed
        value, an infinite value or values whose squares overflow float64.
    """
    import dask

    ddf = open_source(source).open_table()
    parts = ddf[[id_column, *columns]].to_delayed()
    with dask.config.set({"dataframe.shuffle.method": "tasks"}), \
            damaged_files_as_input(source, [id_column, *columns]):
        counts = ddf[id_column].value_counts(split_out=max(1, ddf.npartitions // 4))
        repeated = counts[counts > 1]
        *results, n_repeated = dask.compute(
            *[dask.delayed(_profile_part)(p, id_column, columns) for p in parts],
            repeated.size.to_delayed(),
        )
    rows = sum(r["rows"] for r in results)
    if rows == 0:
        raise _empty(open_source(source))
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
    _check_values(results, columns, rows, missing)
    return TableProfile(
        rows=int(rows),
        observed_rows=int(sum(r["observed_rows"] for r in results)),
        partitions=ddf.npartitions,
        missing=missing,
        dtypes={c: str(ddf.dtypes[c]) for c in columns},
        text=_combine_text(results, columns),
    )


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


def _read(url, storage_options):
    return pd.read_parquet(url, storage_options=storage_options_for(url, storage_options) or None)


def _check_filled_part(src, out_path, mask_path, id_column, fill_columns, number, storage_options=None):
    out = _read(out_path, storage_options)
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
        before = src[c]
        if c in fill_columns and column_rules.is_text_dtype(before.dtype) and (
            pd.api.types.is_float_dtype(out[c].dtype)
        ):  # numbers stored as text are published parsed
            before = pd.Series(column_rules.to_float(before, c), index=before.index)
        if not _same_cells(_values(before)[observed], _values(out[c])[observed]):
            problems.append(f"{where}: observed cells of column {c!r} changed")
    missing_after = {c: int(out[c].isna().sum()) for c in fill_columns}
    if mask_path is not None:
        mask = _read(mask_path, storage_options)
        if len(mask) != len(src) or not _same_cells(_values(src[id_column]), _values(mask[id_column])):
            problems.append(f"{where}: the filled-cell marks do not match the source's rows")
        else:
            for c in fill_columns:
                if not np.array_equal(mask[c].to_numpy(dtype=bool), src[c].isna().to_numpy()):
                    problems.append(f"{where}: filled-cell marks of column {c!r} are wrong")
    return {"rows": len(out), "problems": problems, "missing_after": missing_after}


def validate_filled(source, out_dir, id_column, fill_columns, mask_dir=None, storage_options=None):
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

    ddf = open_source(source).open_table()
    parts = ddf.to_delayed()
    files = partition_files(str(out_dir), storage_options)
    masks = (partition_files(str(mask_dir), storage_options) if mask_dir is not None
             else [None] * len(files))
    if len(files) != len(parts) or len(masks) != len(parts):
        raise ValidationError(
            f"{out_dir} has {len(files)} partition files for {len(parts)} source partitions"
        )
    results = dask.compute(*[
        dask.delayed(_check_filled_part)(p, str(f), None if m is None else str(m), id_column,
                                         list(fill_columns), i, storage_options)
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


def _check_segments_part(src_ids, out_path, id_column, n_components, number, storage_options=None):
    out = _read(out_path, storage_options)
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


def validate_segments(source, out_dir, id_column, n_components, storage_options=None):
    """Check a segment table against its source: same ids in order, labels and probabilities valid.

    Returns
    -------
    dict
        ``rows`` and ``counts`` (rows per segment).
    """
    import dask

    ddf = open_source(source).open_table()
    # whole partitions: a column projection lets Dask fuse Parquet partitions, and the
    # check pairs each source partition with the output file written from it
    parts = ddf.to_delayed()
    files = partition_files(str(out_dir), storage_options)
    if len(files) != len(parts):
        raise ValidationError(
            f"{out_dir} has {len(files)} partition files for {len(parts)} source partitions"
        )
    results = dask.compute(*[
        dask.delayed(_check_segments_part)(p, str(f), id_column, n_components, i, storage_options)
        for i, (p, f) in enumerate(zip(parts, files))
    ])
    problems = [msg for r in results for msg in r["problems"]]
    if problems:
        raise ValidationError(f"{out_dir} fails validation: {'; '.join(problems[:3])}")
    counts = sum(r["counts"] for r in results)
    return {"rows": int(sum(r["rows"] for r in results)), "counts": [int(c) for c in counts]}
