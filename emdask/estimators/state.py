"""What a fitted state may hold: the checks behind every estimator's ``_set_state``.

An estimator's fitted state is ``(arrays, meta)``: its fitted numpy arrays and its
JSON-able fitted metadata (``converged_``, ``n_features_in_``, column names, category
levels, ...). Before an estimator takes a state it checks that the state is one a fit could
have left: only the attributes the class declares, every array of the shape its arguments
and metadata give it, finite, and within its constraints (weights on the simplex,
probabilities in [0, 1], a categorical column's summing to 1 over its levels, rates >= 0,
symmetric positive-definite covariances, upper-triangular precision Cholesky factors with
a positive diagonal). A problem raises :class:`~emdask.exceptions.StateError` naming the
attribute.

This module holds the rules; each estimator class says which apply to it
(``_state_rules``).
"""

from __future__ import annotations

import math

import numpy as np

from ..engine.modelfile import check_lower_bounds, is_int, is_number
from ..exceptions import StateError

#: How far from 1 mixing weights, or a categorical column's level probabilities, may sum.
SUM_TOLERANCE = 1e-4

#: Common fitted values a state must hold.
REQUIRED = ("converged_", "n_iter_", "lower_bound_", "n_features_in_")


# -- metadata ------------------------------------------------------------------------------


def check_feature_names(names, d, attr):
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise StateError(attr, "must be a list of column names (strings)")
    if len(names) != d:
        raise StateError(attr, f"has {len(names)} names but n_features_in_={d}")


def check_common(meta):
    """The fitted values every mixture has (``converged_``, ``n_iter_``, ...)."""
    for name in REQUIRED:
        if name not in meta:
            raise StateError(name, "is missing from the fitted state")
    for name, value in meta.items():
        if name == "converged_" and not isinstance(value, (bool, np.bool_)):
            raise StateError(name, f"= {value!r} must be true or false")
        if name in ("n_iter_", "n_passes_") and not is_int(value):
            raise StateError(name, f"= {value!r} must be a non-negative integer")
        if name == "n_features_in_" and not is_int(value, low=1):
            raise StateError(name, f"= {value!r} must be a positive integer")
        if name == "lower_bound_" and not (is_number(value) and value == value and value != math.inf):
            raise StateError(name, f"= {value!r} must be a number (or -Infinity before any iteration)")
        if name == "lower_bounds_":
            check_lower_bounds(value, name)
    d = meta["n_features_in_"]
    columns = meta.get("_columns")
    if columns is not None:
        check_feature_names(columns, d, "_columns")
    if "feature_names_in_" in meta:
        names = meta["feature_names_in_"]
        if not (
            isinstance(names, np.ndarray)
            and names.dtype == object
            and columns is not None
            and names.tolist() == columns
        ):
            raise StateError("feature_names_in_", "must be the list of column names of _columns")


def column_names(meta):
    """The model's column names: ``_columns``, or ``x0, x1, ...`` for an array."""
    cols = meta.get("_columns")
    return list(cols) if cols is not None else [f"x{j}" for j in range(meta["n_features_in_"])]


def check_levels(levels, attr):
    if not isinstance(levels, list) or not all(
        isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v))
        for v in levels
    ):
        raise StateError(attr, "must be a list of levels (strings or numbers)")
    if len(set(levels)) != len(levels):
        raise StateError(attr, "names a level twice")


def require(meta, names):
    for name in names:
        if name not in meta:
            raise StateError(name, "is missing from the fitted metadata")


# -- arrays --------------------------------------------------------------------------------


def weights_problem(w, arrays):
    if np.any(w < 0):
        return f"holds the negative weight {w.min():g}: weights must be >= 0"
    total = float(w.sum())
    if abs(total - 1.0) > SUM_TOLERANCE:
        return f"sums to {total:.6g}: weights must sum to 1"
    return None


def probabilities_problem(p, arrays):
    bad = p[(p < 0) | (p > 1)]
    if bad.size:
        return f"holds {bad[0]:g}: probabilities must be in [0, 1]"
    return None


def rates_problem(r, arrays):
    if np.any(r < 0):
        return f"holds the rate {r.min():g}: rates must be >= 0"
    return None


def levels_problem(n_levels):
    def problem(p, arrays):
        found = probabilities_problem(p, arrays)
        if found:
            return found
        for j, L in enumerate(n_levels):
            sums = p[:, j, :L].sum(axis=1)
            if L and np.any(np.abs(sums - 1.0) > SUM_TOLERANCE):
                return f"of column {j} sums to {sums[np.argmax(np.abs(sums - 1.0))]:.6g} over its {L} levels, not 1"
            if np.any(p[:, j, L:] != 0):
                return f"of column {j} is not 0 beyond its {L} levels"
        return None

    return problem


def _matrices(a, covariance_type):
    """The stack of matrices of a full or tied layout, and what to call matrix ``i``."""
    if covariance_type == "full":
        return a, (lambda i: f"component {i}")
    return a[None], (lambda i: "the tied matrix")


def covariances_problem(covariance_type):
    def problem(c, arrays):
        if covariance_type not in ("full", "tied"):
            if np.any(c <= 0):
                return f"holds the variance {c.min():g}: variances must be > 0"
            return None
        mats, which = _matrices(c, covariance_type)
        if mats.size == 0:
            return None
        scale = np.abs(mats).max(axis=(1, 2), keepdims=True)
        asym = np.abs(mats - np.swapaxes(mats, 1, 2)) > 1e-8 * scale
        if asym.any():
            return f"is not symmetric ({which(int(np.flatnonzero(asym.any(axis=(1, 2)))[0]))})"
        try:
            np.linalg.cholesky(mats)
        except np.linalg.LinAlgError:
            for i, m in enumerate(mats):
                try:
                    np.linalg.cholesky(m)
                except np.linalg.LinAlgError:
                    return f"is not positive definite ({which(i)})"
        return None

    return problem


def precisions_cholesky_problem(covariance_type):
    def problem(u, arrays):
        if covariance_type not in ("full", "tied"):
            if np.any(u <= 0):
                return f"holds {u.min():g}: the Cholesky factors of positive precisions are > 0"
            return None
        mats, which = _matrices(u, covariance_type)
        if mats.size == 0:
            return None
        diag = np.diagonal(mats, axis1=1, axis2=2)
        if np.any(diag <= 0):
            i = int(np.flatnonzero((diag <= 0).any(axis=1))[0])
            return (
                f"has a diagonal entry <= 0 ({which(i)}): the Cholesky factor of a "
                "positive-definite precision has a positive diagonal"
            )
        scale = np.abs(mats).max(axis=(1, 2), keepdims=True)
        lower = np.abs(np.tril(mats, -1)) > 1e-10 * scale
        if lower.any():
            i = int(np.flatnonzero(lower.any(axis=(1, 2)))[0])
            return f"is not upper triangular ({which(i)}; precision = U Uᵀ with U upper triangular)"
        return None

    return problem


def precisions_problem(covariance_type, cholesky_key="precisions_cholesky_"):
    def problem(p, arrays):
        u = arrays[cholesky_key]
        if covariance_type in ("full", "tied"):
            expected = u @ np.swapaxes(u, -1, -2)
        else:
            expected = u**2
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        if not np.allclose(p, expected, rtol=1e-6, atol=1e-9 * scale):
            return f"is not the precision U Uᵀ of {cholesky_key}"
        return None

    return problem


def check_arrays(cls, arrays, rules):
    """``arrays`` against ``rules`` (``{name: (shape, why, problem)}``, shape ``None``: not
    known): only declared names, float dtype and shape, finite values, then each array's
    constraints."""
    for name, a in arrays.items():
        if name not in rules:
            raise StateError(
                name,
                f"is not a fitted array of {cls.__name__}, which declares {list(cls._fitted_arrays)}",
                in_arrays=True,
            )
        want, why, _ = rules[name]
        if want is None:
            continue
        if a.dtype.kind != "f":
            raise StateError(name, f"has dtype {a.dtype.str}, not a float dtype", in_arrays=True)
        if a.shape != want:
            raise StateError(name, f"has shape {a.shape} but {why} need {want}", in_arrays=True)
    missing = [name for name, (want, _, _) in rules.items() if want is not None and name not in arrays]
    if missing:
        raise StateError(missing[0], "is missing from the arrays file", in_arrays=True)
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise StateError(name, "holds NaN or infinite values: fitted parameters are finite", in_arrays=True)
    for name, (_, _, problem) in rules.items():
        if problem is not None and name in arrays:
            found = problem(arrays[name], arrays)
            if found:
                raise StateError(name, found, in_arrays=True)
