"""The column-type rules every model and flow shares: what a column may hold, how it is read
as numbers, and how filled values go back into it.

* **Numbers** (floats, integers, nullable ``Int64``/``Float64``, booleans) are read as they
  are. A value whose square overflows float64 (``|x| > 1e154``) is refused before any model
  work (:func:`check_range`): the second moments of such a column are infinite.
* **Numbers stored as text** (an object or string column holding ``"-0.007"``, ``"1.25"``,
  ...) are parsed when every non-missing value parses as a number. A model that reads the
  column as numbers (GaussianMixture, EMImputer, a ``'gaussian'`` column of MixedMixture)
  refuses any value that does not parse, naming the column and the value
  (:func:`to_float`); the discrete and mixed families keep a text column that is not all
  numbers as a categorical one (:func:`numeric_levels`). A ``category`` column is a
  declared categorical and is never parsed.
* **Booleans** with missing cells come as ``boolean``, or as ``object`` holding
  ``True``/``False`` (pyarrow-written files without pandas metadata); both are read as 0/1.
* **Filled values go back in the column's own type** (:func:`restore`): an integer column
  keeps its dtype (``Int64`` stays ``Int64``, ``int64`` stays ``int64``) with fills rounded to
  the nearest integer (the conditional expectation rounded; a count column of a mixture gets
  its family's own value, rounded the same way); a boolean column gets ``True`` where the
  fill is at least 0.5; a text column of numbers comes back parsed, as float64.

* **A column's family comes from its dtype** (:func:`infer_family`, :func:`holds_labels`,
  :func:`is_numeric`, :func:`table_kind`): every estimator and flow asks these functions, so
  a column is read the same way everywhere.

Breaking a rule raises :class:`DataError`, a ``ValueError`` whose message names the column
and says what to do; a pipeline reports it as bad input.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "MAX_ABS_VALUE",
    "DataError",
    "NonFiniteParameters",
    "NotNumeric",
    "check_range",
    "filled_dtype",
    "holds_labels",
    "infer_family",
    "is_boolean_values",
    "is_integer",
    "is_numeric",
    "is_text_dtype",
    "needs_discrete_family",
    "numeric_levels",
    "parse_numbers",
    "restore",
    "table_kind",
    "to_float",
]

#: Largest magnitude a numeric value may have: squares (second moments) must stay finite.
MAX_ABS_VALUE = 1e154


class DataError(ValueError):
    """A column a model cannot take as it is (its type or its range); the message names the
    column and says what to do."""


class NotNumeric(DataError, TypeError):
    """A column read as numbers holds a value that is not a number."""


class NonFiniteParameters(DataError):
    """An M-step gave a non-finite parameter; the message names the component."""


def is_text_dtype(dtype):
    """Whether a column of this dtype holds text or Python objects (not a ``category``)."""
    if isinstance(dtype, pd.CategoricalDtype):
        return False
    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


# --------------------------------------------------------------------------------------
# A column's family from its dtype
# --------------------------------------------------------------------------------------


def is_numeric(dtype):
    """Whether a column of this dtype can be modelled as numbers (booleans included)."""
    return (
        pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
    ) and not pd.api.types.is_complex_dtype(dtype)


def holds_labels(dtype):
    """Whether a column of this dtype holds labels rather than numbers (category, string,
    object)."""
    if isinstance(dtype, pd.CategoricalDtype):
        return True
    return not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))


def is_integer(dtype):
    """Whether a column of this dtype holds integers (booleans are not integers here)."""
    return pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def infer_family(name, dtype, value_range=None):
    """The mixed-model family of a column from its dtype (and, for integers, its range).

    ====================================== ==============
    dtype                                  family
    ====================================== ==============
    bool, boolean                          ``bernoulli``
    category, string, object               ``categorical``
    integer with values in {0, 1}          ``bernoulli``
    integer with values >= 0               ``poisson``
    other integer, float                   ``gaussian``
    ====================================== ==============

    Raises
    ------
    TypeError
        A date, time or complex column, which no family models; the message names it.
    """
    if pd.api.types.is_bool_dtype(dtype) and not isinstance(dtype, pd.CategoricalDtype):
        return "bernoulli"
    if pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype):
        raise TypeError(
            f"column {name!r} has dtype {dtype}, which no family models; convert it to "
            "numbers (e.g. days since a date) or leave it out of columns="
        )
    if pd.api.types.is_complex_dtype(dtype):
        raise TypeError(f"column {name!r} is complex; only real columns can be modelled")
    if holds_labels(dtype):
        return "categorical"
    if is_integer(dtype):
        lo, hi = value_range if value_range is not None else (0, 2)
        if lo >= 0 and hi <= 1:
            return "bernoulli"
        if lo >= 0:
            return "poisson"
    return "gaussian"


def table_kind(dtype):
    """Which models can take a column of this dtype: ``'numeric'`` (numbers and booleans),
    ``'categorical'`` (strings, objects, categories) or ``None`` (dates, times, nested
    values: nothing models them)."""
    if pd.api.types.is_bool_dtype(dtype) or (
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
    ):
        return "numeric"
    if (
        isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_string_dtype(dtype)
        or pd.api.types.is_object_dtype(dtype)
    ):
        return "categorical"
    return None


def needs_discrete_family(dtype):
    """Whether a column of this dtype needs a discrete family (labels or booleans): a
    Gaussian model cannot take it as it is."""
    return table_kind(dtype) == "categorical" or pd.api.types.is_bool_dtype(dtype)


def filled_dtype(dtype):
    """The dtype of a modelled column once filled (see :func:`restore`)."""
    if is_text_dtype(dtype):
        return np.dtype(np.float64)
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
        return dtype
    return np.dtype(np.float64) if not pd.api.types.is_float_dtype(dtype) else dtype


def is_boolean_values(values):
    """Whether every non-missing value of an object column is a boolean (and one is)."""
    if isinstance(values, pd.Series):
        values = values.to_numpy(dtype=object)
    observed = [v for v in values if not _missing(v)]
    return bool(observed) and all(isinstance(v, (bool, np.bool_)) for v in observed)


def _missing(value):
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def parse_numbers(values):
    """``(floats, bad)``: text values parsed as float64 (NaN where missing), and the first
    non-missing value that is not a number (``None`` when every one parses).

    Booleans count as 0/1; any other non-text object (a list, a date) is not a number.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object))
    objects = series.to_numpy(dtype=object)
    missing = np.asarray(series.isna())
    if is_boolean_values(objects):
        out = np.full(len(objects), np.nan)
        out[~missing] = objects[~missing].astype(np.float64)
        return out, None
    parsed = pd.to_numeric(pd.Series(objects), errors="coerce")
    out = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(out) & ~missing
    # "nan" and "inf" parse: "nan" is a missing cell, "inf" is left to the range check
    if bad.any():
        return out, objects[np.flatnonzero(bad)[0]]
    return out, None


def numeric_levels(levels):
    """Whether the observed levels of a text column are all numbers stored as text."""
    if not levels:
        return False
    if all(isinstance(v, (bool, np.bool_)) for v in levels):
        return False  # booleans are a binary column, not numbers
    if not all(isinstance(v, str) or isinstance(v, (int, float, np.number)) for v in levels):
        return False
    _, bad = parse_numbers(pd.Series(list(levels), dtype=object))
    return bad is None


def to_float(values, name, model="the model"):
    """A column's values as float64 (NaN for a missing cell), by the rules above.

    Raises
    ------
    NotNumeric
        A text column with a value that is not a number, naming the column and the value.
    """
    if isinstance(values, pd.Series):
        dtype = values.dtype
        if not is_text_dtype(dtype):
            if isinstance(dtype, pd.CategoricalDtype):
                values = values.astype(object)
            else:
                return values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = np.asarray(values)
        if values.dtype.kind in "fiub":
            return values.astype(np.float64)
    out, bad = parse_numbers(values)
    if bad is not None:
        raise NotNumeric(
            f"column {name!r} is not numeric: {model} reads it as numbers, but it holds "
            f"{bad!r}; fix or blank those cells, or leave the column out (a text column "
            "of labels is modelled by CategoricalMixture or MixedMixture)"
        )
    return out


def check_range(names, col_min, col_max):
    """Refuse columns holding values whose squares overflow float64, naming them."""
    with np.errstate(invalid="ignore"):
        big = (np.abs(np.asarray(col_min, dtype=np.float64)) > MAX_ABS_VALUE) | (
            np.abs(np.asarray(col_max, dtype=np.float64)) > MAX_ABS_VALUE
        )
    big &= np.isfinite(col_min) & np.isfinite(col_max)
    if big.any():
        j = int(np.flatnonzero(big)[0])
        worst = col_max[j] if abs(col_max[j]) >= abs(col_min[j]) else col_min[j]
        cols = [names[i] for i in np.flatnonzero(big)]
        raise DataError(
            f"column(s) {cols} hold values too large to model (e.g. {worst:.3g} in "
            f"{names[j]!r}; their squares overflow float64 beyond |x| > {MAX_ABS_VALUE:g}); "
            "rescale the column (e.g. divide it by a power of ten) before fitting"
        )


def restore(series, mask, values):
    """``series`` with the cells where ``mask`` is True set to ``values`` (model values,
    float64), in the column's own type (see the module's rules)."""
    dtype = series.dtype
    values = np.asarray(values)
    if isinstance(dtype, pd.CategoricalDtype):
        new = [v for v in dict.fromkeys(values.tolist()) if v not in set(dtype.categories)]
        if new:
            series = series.cat.add_categories(new)
        out = series.copy()
        out[mask] = values
        return out
    if is_text_dtype(dtype):
        if is_boolean_values(series):  # booleans held as objects stay objects
            out = series.copy()
            fills = np.empty(int(np.count_nonzero(mask)), dtype=object)
            fills[:] = [bool(v) for v in np.asarray(values, dtype=np.float64) >= 0.5]
            out[mask] = fills
            return out
        if values.dtype.kind == "f":  # numbers stored as text: the column comes back parsed
            out = pd.Series(to_float(series, series.name), index=series.index, name=series.name)
            out[mask] = values
            return out
        out = series.copy()
        out[mask] = values
        return out
    if pd.api.types.is_bool_dtype(dtype):
        fills = np.asarray(values, dtype=np.float64) >= 0.5
    elif pd.api.types.is_integer_dtype(dtype):
        fills = np.round(np.asarray(values, dtype=np.float64))
        info = np.iinfo(np.dtype(dtype.numpy_dtype if hasattr(dtype, "numpy_dtype") else dtype))
        fills = np.clip(fills, info.min, info.max).astype(np.int64)
    else:
        fills = values
    out = series.copy()
    out[mask] = fills
    return out
