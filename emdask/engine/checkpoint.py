"""Checkpoints of a fit: every restart's parameters and history, after every pass.

``fit(X, checkpoint=path)`` writes, after the initialisation and after every iteration, a
model directory (:mod:`emdask.engine.modelfile`) with ``"kind": "checkpoint"``: the
estimator's class and arguments, the seed, a fingerprint of the data, and for every model
its iterations, convergence, history of mean log-likelihoods, fitted state (the
estimator's ``_get_state`` of its current parameters, arrays stored as ``model<i>.<name>``)
and the state of its SQUAREM accelerator (``squarem<i>.<name>``). Each write is atomic, so
a crash leaves the previous checkpoint whole; ``fit(X, checkpoint=path, resume=True)``
continues exactly where the fit stopped, and :func:`emdask.load` reads a checkpoint as the
best model so far.

The estimator checks its own state (``_set_state``); this module checks the rest of the
file and that a resumed fit has the arguments and data of the interrupted one.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from ..exceptions import ModelFileError, StateError
from .driver import EMModel
from .modelfile import (
    MAX_ARRAY_BYTES,
    File,
    check_declared,
    check_entries,
    check_finite,
    check_lower_bounds,
    decode_meta,
    encode_meta,
    encoded_params,
    file_error,
    header,
    is_int,
    is_model_dir,
    is_number,
    new_estimator,
    read_arrays,
    read_document,
    state_rules,
    write_model_dir,
)
from .squarem import Squarem

__all__ = ["CheckpointWriter", "load_best", "read_checkpoint"]

#: Arguments that may differ between an interrupted fit and the one resuming it.
RESUME_FREE = ("verbose", "persist", "max_iter", "warm_start")
_SQUAREM_VECTORS = ("base", "first", "pending")


def fingerprint(data):
    """What identifies the data of a fit: rows, columns, missing cells, column sums."""
    s = data.summary
    return {
        "n_rows": int(s.n_rows),
        "feature_names": list(data.feature_names),
        "nan_count": [int(x) for x in s.nan_count],
        "col_sum": [float(x) for x in s.col_sum],
    }


def _last(lower_bounds):
    return float(lower_bounds[-1]) if lower_bounds else -math.inf


class CheckpointWriter:
    """Writes the state of every restart of a fit to ``path`` each time it is called
    (``run_em``'s ``after_pass``)."""

    def __init__(self, path, estimator, data, seed, state_of):
        """``state_of(params)``: the ``(arrays, meta)`` of one model's parameters (the
        estimator's fitted state of them, without history)."""
        self.path = Path(path)
        self.state_of = state_of
        self.header = header(estimator, "checkpoint")
        self.header.update(
            {"seed": int(seed), "data": fingerprint(data), "has_names": bool(data.has_names)}
        )
        if self.path.exists() and not is_model_dir(self.path):
            if self.path.is_file() or any(self.path.iterdir()):
                raise FileExistsError(
                    f"checkpoint={str(path)!r} exists and is not an emdask checkpoint; choose a "
                    "new or empty directory"
                )

    def __call__(self, models):
        arrays, states = {}, []
        for i, model in enumerate(models):
            model_arrays, meta = self.state_of(model.params)
            for name, a in model_arrays.items():
                arrays[f"model{i}.{name}"] = a
            state = {
                "n_iter": int(model.n_iter),
                "converged": bool(model.converged),
                "lower_bounds": [float(x) for x in model.lower_bounds],
                "fitted_meta": encode_meta(meta),
            }
            if model.accelerator is not None:
                scalars, vectors = model.accelerator.state(model.family)
                state["squarem"] = scalars
                for name, a in vectors.items():
                    arrays[f"squarem{i}.{name}"] = a
            states.append(state)
        document = dict(self.header)
        document["models"] = states
        write_model_dir(self.path, document, arrays)


def _check_checkpoint(est, document, file):
    """Check a checkpoint's description of its fit and models.

    Returns ``(models, metas, expected, extra)``: the checked model states (``n_iter``,
    ``converged``, ``lower_bounds``, ``squarem``), each model's fitted metadata (its own
    and the common attributes, as ``_set_state`` takes them), the rules of every model's
    arrays (``model<i>.<name>``) and the bound on the size of the accelerator vectors
    (``squarem<i>.<name>``).
    """
    data = document.get("data")
    if not isinstance(data, dict):
        raise file.error("data", "is missing or not an object")
    names = data.get("feature_names")
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise file.error("data.feature_names", "must be a non-empty list of column names")
    d = len(names)
    if not is_int(data.get("n_rows")):
        raise file.error("data.n_rows", "must be a non-negative integer")
    counts, sums = data.get("nan_count"), data.get("col_sum")
    if not (isinstance(counts, list) and len(counts) == d and all(is_int(x) for x in counts)):
        raise file.error("data.nan_count", f"must be a list of {d} non-negative integers")
    if not (isinstance(sums, list) and len(sums) == d and all(is_number(x) for x in sums)):
        raise file.error("data.col_sum", f"must be a list of {d} numbers")
    if not isinstance(document.get("has_names"), bool):
        raise file.error("has_names", "must be true or false")
    if not is_int(document.get("seed")):
        raise file.error("seed", "must be a non-negative integer")
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise file.error("models", "must be a non-empty list (the checkpoint holds no model)")
    if len(models) > max(est.n_init, 1):
        raise file.error("models", f"holds {len(models)} models but n_init={est.n_init}")
    common = {"n_features_in_": d, "_columns": list(names) if document["has_names"] else None}
    if document["has_names"]:
        common["feature_names_in_"] = np.asarray(list(names), dtype=object)
    metas, expected, extra = [], {}, {}
    for i, state in enumerate(models):
        at = f"models[{i}]"
        if not isinstance(state, dict):
            raise file.error(at, "must be an object")
        if not is_int(state.get("n_iter")):
            raise file.error(f"{at}.n_iter", "must be a non-negative integer")
        if not isinstance(state.get("converged"), bool):
            raise file.error(f"{at}.converged", "must be true or false")
        try:
            bounds = check_lower_bounds(state.get("lower_bounds"), f"{at}.lower_bounds")
            raw = state.get("fitted_meta", {})
            if not isinstance(raw, dict):
                raise StateError(f"{at}.fitted_meta", "must be an object")
            check_declared(type(est), raw, type(est)._fitted_meta, f"{at}.fitted_meta")
            meta = {
                **common,
                **decode_meta(raw, file),
                "converged_": state["converged"],
                "n_iter_": state["n_iter"],
                "lower_bounds_": bounds,
                "lower_bound_": _last(bounds),
                "n_passes_": 0,
            }
            expected.update(state_rules(est, meta, f"model{i}."))
        except StateError as err:
            raise file_error(file, err, f"model{i}.") from None
        metas.append(meta)
        squarem = state.get("squarem")
        if squarem is not None:
            _check_squarem(squarem, f"{at}.squarem", i, document["arrays"]["entries"], file)
            size = sum(
                math.prod(e["shape"])
                for k, e in document["arrays"]["entries"].items()
                if k.startswith(f"model{i}.")
            )
            extra.update({f"squarem{i}.{v}": size for v in _SQUAREM_VECTORS})
        models[i] = {**state, "lower_bounds": bounds}
    return models, metas, expected, extra


def _check_squarem(scalars, at, i, entries, file):
    if not isinstance(scalars, dict):
        raise file.error(at, "must be an object")
    phase, step_max, alpha = scalars.get("phase"), scalars.get("step_max"), scalars.get("alpha")
    if phase not in (0, 1, 2) or isinstance(phase, bool):
        raise file.error(f"{at}.phase", f"= {phase!r} must be 0, 1 or 2")
    for name, value in (("step_max", step_max), ("alpha", alpha)):
        if not (is_number(value) and math.isfinite(value) and value > 0):
            raise file.error(f"{at}.{name}", f"= {value!r} must be a finite positive number")
    needed = {0: (), 1: ("base",), 2: ("base", "first", "pending")}[phase]
    absent = [v for v in needed if f"squarem{i}.{v}" not in entries]
    if absent:
        raise file.error(f"squarem{i}.{absent[0]}", f"is missing, but {at}.phase={phase} needs it", arrays=True)


def _model_arrays(arrays, i):
    prefix = f"model{i}."
    return {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}


def _restored(est, arrays, metas, file):
    """One estimator per model of the checkpoint, each given its checked fitted state."""
    out = []
    for i, meta in enumerate(metas):
        scratch = copy.copy(est)
        try:
            scratch._set_state(_model_arrays(arrays, i), meta)
        except StateError as err:
            raise file_error(file, err, f"model{i}.") from None
        out.append(scratch)
    return out


def _read_models(est, document, file, max_bytes):
    models, metas, expected, extra = _check_checkpoint(est, document, file)
    check_entries(type(est), document["arrays"]["entries"], expected, extra, file)
    arrays = read_arrays(file, document, max_bytes)
    check_finite(arrays, file)
    return models, metas, arrays, _restored(est, arrays, metas, file)


def load_best(est, document, file, max_bytes):
    """Give ``est`` (built from the checkpoint's arguments) the state of the checkpoint's
    best model so far; returns it."""
    models, metas, arrays, _ = _read_models(est, document, file, max_bytes)
    best = max(range(len(models)), key=lambda i: _last(models[i]["lower_bounds"]))
    try:
        est._set_state(_model_arrays(arrays, best), metas[best])
    except StateError as err:
        raise file_error(file, err, f"model{best}.") from None
    return est


def read_checkpoint(path, estimator, family, data):
    """The models of the checkpoint at ``path``, ready to go on fitting; ``None`` when
    there is no checkpoint yet."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    document = read_document(path)
    file = File(path, document)
    where = f"checkpoint {path}"
    if document.get("kind") != "checkpoint":
        raise ModelFileError(
            f"{path} is a saved model, not a checkpoint; to go on from it, load it with "
            "emdask.load and fit with warm_start=True"
        )
    if document.get("estimator") != type(estimator)._registry_name():
        raise ValueError(
            f"{where} was written by a {document.get('estimator')}, not a "
            f"{type(estimator).__name__}; pass resume=False to start again"
        )
    own = new_estimator(type(estimator), document, where, file)
    states, metas, expected, extra = _check_checkpoint(own, document, file)
    mine, theirs = encoded_params(estimator), document.get("params", {})
    differ = sorted(
        name
        for name in set(mine) | set(theirs)
        if name not in RESUME_FREE and mine.get(name) != theirs.get(name)
    )
    if differ:
        raise ValueError(
            f"{where} was written with other values of {differ}; resume with the arguments "
            "of the interrupted fit, or pass resume=False to start again"
        )
    recorded, now = document.get("data", {}), fingerprint(data)
    same = (
        recorded.get("n_rows") == now["n_rows"]
        and recorded.get("feature_names") == now["feature_names"]
        and recorded.get("nan_count") == now["nan_count"]
        and np.allclose(recorded.get("col_sum", []), now["col_sum"], rtol=1e-9, atol=1e-12)
    )
    if not same:
        raise ValueError(
            f"{where} was written while fitting other data ({recorded.get('n_rows')} rows, "
            f"columns {recorded.get('feature_names')}); resume on the data the fit began with, "
            "or pass resume=False to start again"
        )
    check_entries(type(own), document["arrays"]["entries"], expected, extra, file)
    arrays = read_arrays(file, document, MAX_ARRAY_BYTES)
    check_finite(arrays, file)
    restored = _restored(own, arrays, metas, file)
    models = []
    for i, (state, scratch) in enumerate(zip(states, restored)):
        params = scratch._fitted_params()
        accelerator = None
        if "squarem" in state:
            prefix = f"squarem{i}."
            vectors = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
            free = family.to_unconstrained(params).size
            for name, vector in vectors.items():
                if vector.size != free:
                    raise file.error(
                        prefix + name,
                        f"has {vector.size} values but model {i} has {free} free parameters",
                        arrays=True,
                    )
            try:
                accelerator = Squarem.from_state(family, state["squarem"], vectors, params)
            except Exception as err:
                raise ModelFileError(
                    f"{where}: the accelerator state of model {i} is not valid: {err}"
                ) from None
        models.append(
            EMModel(
                family,
                params,
                lower_bounds=[float(x) for x in state["lower_bounds"]],
                n_iter=int(state["n_iter"]),
                converged=bool(state["converged"]),
                accelerator=accelerator,
            )
        )
    if not models:
        raise ModelFileError(f"{where} holds no model")
    return models
