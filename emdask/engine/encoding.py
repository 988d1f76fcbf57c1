"""Dtype-aware encoding of table columns into float64 blocks, and back.

The discrete and mixed-type models read every column as float64 (NaN for a missing cell),
but users hand them pandas ``category`` columns, strings, booleans, nullable integers. This
module turns those into numbers, checks them, and turns model output back into the user's
values:

* categorical columns become integer codes ``0 .. levels-1``. The levels of every column are
  gathered in **one pass before fitting** (:func:`scan_columns`), so the encoding is the same
  in every partition, including a level that first appears in the last one. A pandas
  ``category`` column keeps the order of its declared categories (including ones no row
  uses); other columns have their observed levels sorted.
* ``binary`` (0/1 or boolean), ``count`` (non-negative integers), ``successes`` and ``trials``
  columns are checked while they are converted, in the task that converts them, so a bad
  value anywhere in a large table stops the fit with an error that names the column.

A level not seen during fit, met later by ``predict`` or ``score``, is an error
(``handle_unknown='error'``) or is treated as a missing cell (``handle_unknown='missing'``).

What a column may hold, how text is parsed as numbers and how fills go back into a column's
own dtype are the rules of :mod:`emdask.engine.columns`, shared with the Gaussian models.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd

import dask.array as da
import dask.dataframe as dd

from ..exceptions import DataWarning
from . import columns as column_rules
from .data import BlockData, check_2d

__all__ = [
    "COLUMN_KINDS",
    "LEVELS_WARNING",
    "FAMILY_OF_KIND",
    "KIND_OF_FAMILY",
    "TableEncoder",
    "kinds_after_scan",
    "mixed_kinds",
    "numbers_as_text",
    "scan_columns",
    "table_columns",
]

#: What a column can be encoded as.
COLUMN_KINDS = ("real", "binary", "count", "categorical", "successes", "trials")
#: A categorical column with more levels than this draws a :class:`DataWarning`.
LEVELS_WARNING = 1000
#: The limit the warning suggests.
LEVELS_SUGGESTED = 100
#: Unseen-level policies.
HANDLE_UNKNOWN = ("error", "missing")


#: The encoder kind of each mixed-model family (:func:`emdask.engine.columns.infer_family`).
KIND_OF_FAMILY = {
    "gaussian": "real",
    "bernoulli": "binary",
    "categorical": "categorical",
    "poisson": "count",
}
#: The mixed-model family of each encoder kind it uses.
FAMILY_OF_KIND = {v: k for k, v in KIND_OF_FAMILY.items()}


# --------------------------------------------------------------------------------------
# The columns to model and their kinds
# --------------------------------------------------------------------------------------


def table_columns(X, columns, default, what):
    """``(names, named, dtypes)`` of the columns of ``X`` to model.

    Parameters
    ----------
    X : pandas or dask DataFrame, array-like or dask Array
    columns : str, int, list or None
        Columns of a frame to model; ``None`` takes every column whose dtype ``default``
        accepts. Arrays take every column, named ``x0, x1, ...``.
    default : callable
        ``default(dtype) -> bool``.
    what : str
        What the columns are (``'numeric'``, ...), for the error when there is none.
    """
    if isinstance(X, (pd.DataFrame, dd.DataFrame)):
        dtypes = X.dtypes
        if columns is None:
            names = [c for c in X.columns if default(dtypes[c])]
            if not names:
                raise TypeError(
                    f"the table has no {what} column (columns: {list(X.columns)}); pass "
                    "columns= to choose them"
                )
        else:
            names = [columns] if isinstance(columns, (str, int)) else list(columns)
            absent = [c for c in names if c not in X.columns]
            if absent:
                raise KeyError(
                    f"column(s) {absent} not in the table; available columns: {list(X.columns)}"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"columns= names a column twice: {names}")
        return names, True, {c: dtypes[c] for c in names}
    if isinstance(X, (pd.Series, dd.Series)):
        raise TypeError("X is a Series; pass a DataFrame (e.g. s.to_frame()) instead")
    if columns is not None:
        raise ValueError("columns= selects columns of a DataFrame; slice the array instead")
    if not isinstance(X, da.Array):
        X = check_2d(X, allow_object=True)
    shape = X.shape
    if len(shape) != 2:
        raise ValueError(
            f"X must be 2-D (rows × columns), got shape {shape}. Reshape your data with "
            "X.reshape(-1, 1) for a single column"
        )
    if np.iscomplexobj(X):
        raise ValueError(f"Complex data not supported: X has dtype {X.dtype}")
    dtype = X.dtype
    names = [f"x{j}" for j in range(shape[1])]
    return names, False, {c: dtype for c in names}


def mixed_kinds(names, dtypes, given=None):
    """``(kinds, to_scan_levels, to_scan_ranges)`` of a mixed table's columns: the family
    ``given`` for a column, else the one its dtype implies; integer columns whose family
    depends on their range are scanned, then :func:`kinds_after_scan` settles them."""
    given = given or {}
    families, ranged = [], []
    for c in names:
        if c in given:
            families.append(given[c])
            continue
        family = column_rules.infer_family(c, dtypes[c])
        if family in ("bernoulli", "poisson") and column_rules.is_integer(dtypes[c]):
            ranged.append(c)  # 0/1, counts or signed integers: the scan will tell
        families.append(family)
    kinds = [KIND_OF_FAMILY[f] for f in families]
    cat = [c for c, k in zip(names, kinds) if k == "categorical"]
    return kinds, cat, ranged


def kinds_after_scan(names, kinds, ranges):
    """``kinds`` with every scanned integer column's kind from its observed range."""
    out = list(kinds)
    for j, c in enumerate(names):
        if c in ranges:
            lo, hi = ranges[c]
            if not np.isfinite(lo):
                raise ValueError(
                    f"column {c!r} has no observed value; drop it from the columns to fit"
                )
            out[j] = KIND_OF_FAMILY[column_rules.infer_family(c, np.dtype(np.int64), (lo, hi))]
    return out


def _py(value):
    """A level as a plain Python value (JSON-able for numbers, strings and booleans)."""
    return value.item() if isinstance(value, np.generic) else value


def _sorted_levels(levels):
    try:
        return sorted(levels)
    except TypeError:  # mixed types: order by type name, then value
        return sorted(levels, key=lambda v: (type(v).__name__, str(v)))


# --------------------------------------------------------------------------------------
# The scan: levels of categorical columns and ranges of integer columns, in one pass
# --------------------------------------------------------------------------------------


def _column(part, name, position):
    if isinstance(part, pd.DataFrame):
        return part[name]
    return part[:, position]


def _value_counts(values):
    if isinstance(values, pd.Series):
        vc = values.value_counts(dropna=True, sort=False)
        return {_py(k): int(v) for k, v in vc.items()}
    values = np.asarray(values)
    if values.dtype.kind in "fiub":
        keep = values[~np.isnan(values)] if values.dtype.kind == "f" else values
        levels, counts = np.unique(keep, return_counts=True)
        return {_py(k): int(v) for k, v in zip(levels, counts)}
    return _value_counts(pd.Series(values, dtype=object))


def _range(values):
    if isinstance(values, pd.Series):
        values = values.to_numpy(dtype=np.float64, na_value=np.nan)
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        return (np.inf, -np.inf)
    return (float(np.nanmin(values)), float(np.nanmax(values)))


def _scan_part(part, index, categorical, ranged):
    return {
        "counts": {name: _value_counts(_column(part, name, pos)) for name, pos in categorical},
        "ranges": {name: _range(_column(part, name, pos)) for name, pos in ranged},
    }


def _combine_scans(a, b):
    counts = {}
    for name in a["counts"]:
        merged = dict(a["counts"][name])
        for level, n in b["counts"][name].items():
            merged[level] = merged.get(level, 0) + n
        counts[name] = merged
    ranges = {
        name: (min(a["ranges"][name][0], b["ranges"][name][0]),
               max(a["ranges"][name][1], b["ranges"][name][1]))
        for name in a["ranges"]
    }
    return {"counts": counts, "ranges": ranges}


def scan_columns(X, names, categorical=(), ranged=(), *, split_every=8, parse_text=False):
    """Levels (with counts) of categorical columns and value ranges of others, in one pass.

    Parameters
    ----------
    X : pandas or dask DataFrame, ndarray or dask Array
    names : list of str
        Names of the model's columns (``x0, x1, ...`` for arrays).
    categorical, ranged : sequence of str
        Columns whose levels, and columns whose (min, max), are wanted.
    parse_text : bool
        Whether text columns of numbers will be read as numbers (:func:`numbers_as_text`),
        so their many levels draw no warning.

    Returns
    -------
    levels : dict of str to list
        Ordered levels of each categorical column (declared categories first for a pandas
        ``category`` column).
    counts : dict of str to ndarray
        Rows holding each level, aligned with ``levels``.
    ranges : dict of str to (float, float)
    n_passes : int
        Passes made over ``X`` (0 or 1).
    """
    if not categorical and not ranged:
        return {}, {}, {}, 0
    pos = {name: j for j, name in enumerate(names)}
    cat = [(c, pos[c]) for c in categorical]
    rng = [(c, pos[c]) for c in ranged]
    n_passes = 0
    if isinstance(X, dd.DataFrame):
        needed = list(dict.fromkeys([c for c, _ in cat] + [c for c, _ in rng]))
        data = BlockData(X[needed].to_delayed(), needed, True, split_every=split_every)
        scan = data.map_reduce(_scan_part, cat, rng, combine=_combine_scans)
        n_passes = 1
        dtypes = X.dtypes
    elif isinstance(X, da.Array):
        arr = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X
        data = BlockData(arr.to_delayed().ravel(), names, False, split_every=split_every)
        scan = data.map_reduce(_scan_part, cat, rng, combine=_combine_scans)
        n_passes = 1
        dtypes = None
    else:
        scan = _scan_part(X, 0, cat, rng)
        dtypes = X.dtypes if isinstance(X, pd.DataFrame) else None
    levels, counts = {}, {}
    for name in categorical:
        seen = scan["counts"][name]
        dtype = None if dtypes is None else dtypes[name]
        if isinstance(dtype, pd.CategoricalDtype) and dtype.categories is not None and (
            not isinstance(X, dd.DataFrame) or X[name].cat.known
        ):
            declared = [_py(v) for v in dtype.categories]
            extra = _sorted_levels([v for v in seen if v not in set(declared)])
            ordered = declared + extra
        else:
            ordered = _sorted_levels(seen)
        if not seen:
            raise ValueError(
                f"column {name!r} has no observed value; drop it from the columns to fit"
            )
        numbers = parse_text and (dtype is None or column_rules.is_text_dtype(dtype)) and (
            len(ordered) > LEVELS_WARNING and column_rules.numeric_levels(ordered)
        )
        if len(ordered) > LEVELS_WARNING and not numbers:
            warnings.warn(
                f"column {name!r} has {len(ordered)} levels; a categorical model estimates "
                f"n_components × (levels - 1) probabilities for it. Keep its "
                f"{LEVELS_SUGGESTED} most frequent levels and group the rest (e.g. as "
                "'other'), or model it as a numeric column.",
                DataWarning,
                stacklevel=3,
            )
        levels[name] = ordered
        counts[name] = np.array([seen.get(v, 0) for v in ordered], dtype=np.float64)
    return levels, counts, dict(scan["ranges"]), n_passes


def numbers_as_text(names, kinds, levels, dtypes, given=None):
    """``kinds`` with every text column whose observed levels all parse as numbers read as
    ``'real'`` (numbers stored as text); columns whose kind the user gave (``given``) and
    ``category`` columns are kept as they are."""
    given = given or {}
    out = list(kinds)
    for j, name in enumerate(names):
        if (
            out[j] == "categorical"
            and name not in given
            and column_rules.is_text_dtype(dtypes[name])
            and column_rules.numeric_levels(levels.get(name, []))
        ):
            out[j] = "real"
    return out


# --------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------


def _examples(values, limit=3):
    shown = list(dict.fromkeys(_py(v) for v in values[: 1000]))[:limit]
    return ", ".join(repr(v) for v in shown)


class TableEncoder:
    """Turns the model's columns of any table into a checked float64 block, and back.

    Parameters
    ----------
    columns : list of str
        Column names (``x0, x1, ...`` for arrays, whose columns are taken by position).
    kinds : list of str
        One of :data:`COLUMN_KINDS` per column.
    categories : dict of str to list
        Levels of every ``categorical`` column.
    named : bool
        Whether columns are taken from a frame by name (else by position).
    n_trials : int, optional
        Fixed number of trials that every ``successes`` value must not exceed.
    handle_unknown : {'error', 'missing'}
        What a categorical level not in ``categories`` becomes.
    model : str
        Name used in error messages.
    """

    def __init__(self, columns, kinds, categories=None, *, named=True, n_trials=None,
                 handle_unknown="error", model="the model"):
        if handle_unknown not in HANDLE_UNKNOWN:
            raise ValueError(
                f"handle_unknown={handle_unknown!r} is not one of {list(HANDLE_UNKNOWN)}"
            )
        self.columns = list(columns)
        self.kinds = list(kinds)
        bad = set(self.kinds) - set(COLUMN_KINDS)
        if bad:
            raise ValueError(f"unknown column kind(s) {sorted(bad)}")
        self.categories = {c: list(v) for c, v in (categories or {}).items()}
        self.named = named
        self.n_trials = n_trials
        self.handle_unknown = handle_unknown
        self.model = model
        self._index = {c: pd.Index(v) for c, v in self.categories.items()}

    @property
    def n_levels(self):
        """Levels of each categorical column, in column order."""
        return [len(self.categories[c]) for c, k in zip(self.columns, self.kinds) if k == "categorical"]

    # -- encoding -----------------------------------------------------------------------------

    def _encode_categorical(self, values, name):
        index = self._index[name]
        if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
            mapping = index.get_indexer(values.cat.categories)
            raw = values.cat.codes.to_numpy()
            missing = raw < 0
            codes = np.where(missing, -1, mapping[np.where(missing, 0, raw)])
        else:
            missing = np.asarray(pd.isna(values))
            codes = index.get_indexer(values)
        unseen = (codes < 0) & ~missing
        if unseen.any():
            if self.handle_unknown == "error":
                vals = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
                raise ValueError(
                    f"column {name!r} holds level(s) not seen during fit "
                    f"({_examples(vals[unseen])}); refit on data that includes them, or "
                    "create the model with handle_unknown='missing' to treat them as missing"
                )
        out = codes.astype(np.float64)
        out[codes < 0] = np.nan
        return out

    def _to_float(self, values, name, kind):
        if isinstance(values, pd.Series) and column_rules.is_text_dtype(values.dtype):
            return column_rules.to_float(values, name, self.model)
        try:
            if isinstance(values, pd.Series):
                return values.to_numpy(dtype=np.float64, na_value=np.nan)
            return np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            dtype = values.dtype
            raise TypeError(
                f"column {name!r} (dtype {dtype}) is not numeric, but {self.model} reads it "
                f"as a {kind} column; encode it as numbers, or model it as a categorical "
                "column"
            ) from None

    def _check(self, x, name, kind):
        obs = x[~np.isnan(x)]
        if kind == "binary":
            bad = obs[(obs != 0) & (obs != 1)]
            if bad.size:
                raise ValueError(
                    f"column {name!r} must hold 0/1 or booleans for {self.model}, but holds "
                    f"{_examples(bad)}; recode it to 0/1, or model it as a categorical or "
                    "count column"
                )
        elif kind in ("count", "successes", "trials"):
            bad = obs[(obs < 0) | (obs != np.floor(obs))]
            bad = bad[np.isfinite(bad) | (bad < 0)]
            if bad.size:
                raise ValueError(
                    f"column {name!r} must hold non-negative whole numbers (counts) for "
                    f"{self.model}, but holds {_examples(bad)}; fix or drop those rows, or "
                    "model the column as Gaussian"
                )
            if kind == "successes" and self.n_trials is not None:
                over = obs[obs > self.n_trials]
                if over.size:
                    raise ValueError(
                        f"column {name!r} holds successes greater than n_trials="
                        f"{self.n_trials} ({_examples(over)}); check n_trials or the column"
                    )

    def transform_block(self, part):
        """The model's columns of one partition (frame or 2-D array) as float64, checked."""
        if isinstance(part, pd.DataFrame) and not self.named:
            part = part.to_numpy()
        if not isinstance(part, pd.DataFrame):
            part = np.asarray(part)
            if part.ndim != 2 or part.shape[1] != len(self.columns):
                raise ValueError(
                    f"X has shape {part.shape}, but {self.model} expects "
                    f"{len(self.columns)} columns"
                )
        out = np.empty((len(part), len(self.columns)))
        for j, (name, kind) in enumerate(zip(self.columns, self.kinds)):
            values = _column(part, name, j)
            if kind == "categorical":
                out[:, j] = self._encode_categorical(values, name)
            else:
                out[:, j] = self._to_float(values, name, kind)
                self._check(out[:, j], name, kind)
        if "successes" in self.kinds and "trials" in self.kinds:
            js, jt = self.kinds.index("successes"), self.kinds.index("trials")
            # successes without trials (or trials without successes) tell nothing
            lone = np.isnan(out[:, js]) | np.isnan(out[:, jt])
            out[lone, js] = np.nan
            out[lone, jt] = np.nan
            with np.errstate(invalid="ignore"):
                over = out[:, js] > out[:, jt]
            if over.any():
                row = int(np.flatnonzero(over)[0])
                raise ValueError(
                    f"column {self.columns[js]!r} holds more successes than column "
                    f"{self.columns[jt]!r} holds trials (e.g. {out[row, js]:g} > "
                    f"{out[row, jt]:g}); fix those rows or swap the columns"
                )
        return np.ascontiguousarray(out)

    def transform_frame(self, part):
        """A pandas partition as a float64 frame with the model's columns (same index)."""
        # copy=False: the frame wraps the row-major block (the categorical kernel reads rows)
        return pd.DataFrame(
            self.transform_block(part), index=part.index, columns=self.columns, copy=False
        )

    def transform(self, X):
        """``X`` with the model's columns encoded as float64, of the same kind as ``X``
        (lazily for dask input)."""
        if isinstance(X, (dd.DataFrame, pd.DataFrame)) and self.named:
            absent = [c for c in self.columns if c not in X.columns]
            if absent:
                raise KeyError(f"column(s) {absent} seen during fit are not in X")
        if isinstance(X, dd.DataFrame):
            meta = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in self.columns})
            part = X[self.columns] if self.named else X
            return part.map_partitions(self.transform_frame, meta=meta)
        if isinstance(X, da.Array):
            arr = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X
            return arr.map_blocks(
                self.transform_block,
                chunks=(arr.chunks[0], (len(self.columns),)),
                dtype=np.float64,
            )
        if isinstance(X, pd.DataFrame):
            if not self.named:
                return self.transform_block(X)
            return self.transform_frame(X[self.columns])
        if isinstance(X, (pd.Series, dd.Series)):
            raise TypeError("X is a Series; pass a DataFrame (e.g. s.to_frame()) instead")
        return self.transform_block(X)

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, j, codes):
        """Values of column ``j`` from model values: levels for a categorical column."""
        name, kind = self.columns[j], self.kinds[j]
        if kind != "categorical":
            return np.asarray(codes, dtype=np.float64)
        levels = np.empty(len(self.categories[name]), dtype=object)
        levels[:] = self.categories[name]
        return levels[np.asarray(codes, dtype=np.intp)]

    def decoded_frame(self, block, index=None):
        """A frame of decoded values (categorical columns as pandas ``category``)."""
        data = {}
        for j, (name, kind) in enumerate(zip(self.columns, self.kinds)):
            if kind == "categorical":
                data[name] = pd.Categorical.from_codes(
                    block[:, j].astype(np.intp), categories=self.categories[name]
                )
            elif kind in ("binary", "count", "successes", "trials"):
                data[name] = block[:, j].astype(np.int64)
            else:
                data[name] = block[:, j]
        return pd.DataFrame(data, index=index)

    def decoded_array(self, block):
        """An array of decoded values: float64, or object when some level is not a number."""
        numeric = all(
            isinstance(v, numbers.Real)
            for c, k in zip(self.columns, self.kinds)
            if k == "categorical"
            for v in self.categories[c]
        )
        out = np.empty(block.shape, dtype=np.float64 if numeric else object)
        for j in range(block.shape[1]):
            out[:, j] = self.decode(j, block[:, j])
        return out

    def _parsed(self, j, dtype):
        return self.kinds[j] not in ("categorical", "binary") and column_rules.is_text_dtype(dtype)

    def filled_meta(self, meta):
        """The empty frame (dask ``meta``) of :meth:`fill`'s output for a frame like ``meta``:
        text columns of numbers become float64; everything else keeps its dtype."""
        if not (isinstance(meta, pd.DataFrame) and self.named):
            return meta
        out = meta.copy()
        for j, name in enumerate(self.columns):
            if self._parsed(j, meta[name].dtype):
                out[name] = out[name].astype(np.float64)
        return out

    def fill(self, part, filled):
        """``part`` with its missing model cells set from ``filled`` (model values, one column
        per model column); observed cells, index, other columns and dtypes are kept."""
        if isinstance(part, pd.DataFrame) and self.named:
            out = part.copy()
            for j, name in enumerate(self.columns):
                s = part[name]
                mask = np.asarray(s.isna())
                if not mask.any():
                    if self._parsed(j, s.dtype):  # numbers stored as text come back parsed
                        out[name] = column_rules.to_float(s, name, self.model)
                    continue
                out[name] = _fill_series(s, mask, self.decode(j, filled[mask, j]), self.kinds[j])
            return out
        if isinstance(part, pd.DataFrame):
            out = part.copy()
            for j in range(len(self.columns)):
                s = part.iloc[:, j]
                mask = np.asarray(s.isna())
                if mask.any():
                    out.iloc[:, j] = _fill_series(
                        s, mask, self.decode(j, filled[mask, j]), self.kinds[j]
                    )
            return out
        arr = np.asarray(part)
        out = arr.copy()
        mask = np.asarray(pd.isna(arr))
        for j in range(len(self.columns)):
            m = mask[:, j]
            if m.any():
                out[m, j] = self.decode(j, filled[m, j])
        return out


def _fill_series(s, mask, values, kind):
    return column_rules.restore(s, mask, values)
