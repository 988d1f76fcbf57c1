"""Model files and checkpoints: a directory of JSON metadata and one ``.npz`` of arrays.

A model directory holds two files::

    model.json               what the model is, readable by anyone
    arrays-<digest>.npz      the fitted numpy arrays (numpy's own format, no pickle)

``model.json`` records the format and its version, the emdask version that wrote it, the
estimator class, the model family, the constructor arguments (arrays as nested lists, a
``Generator``/``RandomState`` ``random_state`` as ``null``), the fitted metadata (category
levels, column maps, ...), the feature names, the history of the fit (the mean
log-likelihood at every iteration, iterations, convergence, passes over the data), the name,
shape, dtype and SHA-256 digest of the arrays file, and a SHA-256 checksum of its own
content.

Reading never runs code from the file: JSON is parsed as data, arrays are read with
``allow_pickle=False``, the estimator class is looked up by name among the estimators
emdask knows (its own, and those given to :func:`register_estimator`), never imported from
a name in the file. A file from a newer format version, a checksum that does not match
(corruption or an edit) or anything else unexpected raises :class:`ModelFileError` naming
the file and what to do.

Writing is atomic. A new model is written to a temporary directory beside ``path`` and
renamed into place. Over an existing model (and for checkpoints, rewritten after every
iteration) the new arrays file is written first under its own digest-named file, then
``model.json`` is replaced by an atomic rename — the switch — and the old arrays file
removed: a crash at any moment leaves a whole model, old or new.

Checkpoints (``fit(X, checkpoint=path)``) use the same layout with ``"kind": "checkpoint"``:
every restart's current parameters and history, the seed and a fingerprint of the data, so
that ``fit(X, checkpoint=path, resume=True)`` continues exactly where the fit stopped.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "ModelFileError",
    "CheckpointWriter",
    "load",
    "read_checkpoint",
    "register_estimator",
    "save",
]

#: Written in every file; readers accept this version and older.
FORMAT_VERSION = 1
FORMAT_NAME = "emdask-model"
MODEL_JSON = "model.json"
_ARRAYS_FILE = re.compile(r"^arrays-[0-9a-f]{16}\.npz$")
_ARRAY_KINDS = "biuf"  # bool, integers, floats: what an .npz holds without pickle
#: Arguments that may differ between an interrupted fit and the one resuming it.
_RESUME_FREE = ("verbose", "persist", "max_iter", "warm_start")


class ModelFileError(ValueError):
    """A model file or checkpoint that cannot be read: corrupted, edited, of an unknown
    estimator, or written by a newer emdask."""


# --------------------------------------------------------------------------------------
# Known estimator classes
# --------------------------------------------------------------------------------------

_REGISTERED = {}


def register_estimator(cls):
    """Let :func:`load` rebuild ``cls`` (a :class:`~emdask.estimators.BaseMixture`
    subclass defined outside emdask). Usable as a class decorator; returns ``cls``."""
    from .estimators.base import BaseMixture

    if not (isinstance(cls, type) and issubclass(cls, BaseMixture)):
        raise TypeError(f"{cls!r} is not a subclass of emdask's BaseMixture")
    _REGISTERED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _emdask_estimators():
    from . import estimators  # noqa: F401  (defines the classes)
    from .estimators.base import BaseMixture

    found, stack = {}, list(BaseMixture.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("emdask.") and not cls.__name__.startswith("_"):
            found.setdefault(cls.__name__, cls)
    return found


def _known_estimators():
    known = _emdask_estimators()
    known.update(_REGISTERED)
    return known


def _class_name(cls):
    if _emdask_estimators().get(cls.__name__) is cls:
        return cls.__name__
    name = f"{cls.__module__}.{cls.__qualname__}"
    if _REGISTERED.get(name) is not cls:
        raise TypeError(
            f"{cls.__name__} is not an emdask estimator; call "
            f"emdask.register_estimator({cls.__name__}) before saving so that load can find it"
        )
    return name


def _family_name(est):
    family = est._make_family()
    return getattr(family, "name", type(family).__name__)


# --------------------------------------------------------------------------------------
# JSON values
# --------------------------------------------------------------------------------------


def _encode(value, where):
    """A JSON value for ``value``: arrays and tuples are tagged so they come back as such."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind in _ARRAY_KINDS:
            return {"__ndarray__": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
        if value.dtype.kind in "OU":
            items = [_encode(v, where) for v in value.ravel().tolist()]
            if any(isinstance(v, (dict, list)) for v in items):
                raise TypeError(f"{where}: an array of nested values cannot be written to a model file")
            kind = "str" if value.dtype.kind == "U" else "object"
            return {"__ndarray__": items, "dtype": kind, "shape": list(value.shape)}
        raise TypeError(f"{where}: arrays of dtype {value.dtype} cannot be written to a model file")
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict key {key!r} is not a string; model files keep str keys")
            if key.startswith("__") and key.endswith("__"):
                raise TypeError(f"{where}: dict key {key!r} is reserved by the model file format")
            out[key] = _encode(item, where)
        return out
    raise TypeError(
        f"{where} = {value!r} cannot be written to a model file: only numbers, strings, "
        "lists, tuples, dicts and numpy arrays of numbers or strings are kept"
    )


def _decode(value, where):
    if isinstance(value, list):
        return [_decode(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v, where) for v in value["__tuple__"])
    if "__ndarray__" in value:
        dtype, shape = value.get("dtype"), value.get("shape")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ModelFileError(f"{where}: an array without a valid shape")
        if dtype == "object":
            out = np.empty(len(value["__ndarray__"]), dtype=object)
            out[:] = value["__ndarray__"]
            return out.reshape(shape)
        if dtype == "str":
            return np.asarray(value["__ndarray__"], dtype=str).reshape(shape)
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise ModelFileError(f"{where}: unknown array dtype {dtype!r}") from None
        if dt.kind not in _ARRAY_KINDS:
            raise ModelFileError(f"{where}: arrays of dtype {dtype!r} are not allowed")
        return np.asarray(value["__ndarray__"], dtype=dt).reshape(shape)
    return {k: _decode(v, where) for k, v in value.items()}


def _canonical(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _checksum(document):
    body = {k: v for k, v in document.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


# --------------------------------------------------------------------------------------
# Atomic writing and checked reading of a model directory
# --------------------------------------------------------------------------------------


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_file_atomic(path, data):
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (whole or not at all)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _npz_bytes(arrays):
    for name, a in arrays.items():
        if a.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"fitted array {name} has dtype {a.dtype}; model files keep numbers only")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _write_model_dir(path, document, arrays):
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another path for the model")
    if path.is_dir() and any(path.iterdir()) and not (path / MODEL_JSON).is_file():
        raise FileExistsError(
            f"{path} is a directory that holds no {MODEL_JSON}: not overwriting it; choose a new "
            "or empty directory for the model"
        )
    raw = _npz_bytes(arrays)
    digest = hashlib.sha256(raw).hexdigest()
    arrays_name = f"arrays-{digest[:16]}.npz"
    document = dict(document)
    document["arrays"] = {
        "file": arrays_name,
        "sha256": digest,
        "entries": {n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()},
    }
    document["checksum"] = _checksum(document)
    text = json.dumps(document, indent=1, allow_nan=True).encode()

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_dir() or not any(path.iterdir()):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            write_file_atomic(tmp / arrays_name, raw)
            write_file_atomic(tmp / MODEL_JSON, text)
            os.rename(tmp, path)  # replaces an empty directory too
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(path.parent)
        return path
    write_file_atomic(path / arrays_name, raw)
    write_file_atomic(path / MODEL_JSON, text)  # the switch
    _fsync_dir(path)
    for old in path.iterdir():
        if _ARRAYS_FILE.match(old.name) and old.name != arrays_name:
            old.unlink(missing_ok=True)
    return path


def _is_model_dir(path):
    return (Path(path) / MODEL_JSON).is_file()


def _read_model_dir(path):
    """The checked JSON document and arrays of a model directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if not path.is_dir():
        raise ModelFileError(
            f"{path} is a file; an emdask model is a directory holding {MODEL_JSON} and an "
            ".npz of arrays (written by model.save(path))"
        )
    json_path = path / MODEL_JSON
    if not json_path.is_file():
        raise ModelFileError(f"{path} holds no {MODEL_JSON}: it is not an emdask model directory")
    try:
        document = json.loads(json_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"{json_path} is not valid JSON ({err}); the file is corrupted: save the model again"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{json_path} is not an emdask model file (no \"format\": \"{FORMAT_NAME}\")")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{json_path} has no valid format_version")
    if version > FORMAT_VERSION:
        from . import __version__

        raise ModelFileError(
            f"{path} was written by emdask {document.get('emdask_version', '?')} in model format "
            f"{version}; this emdask ({__version__}) reads format {FORMAT_VERSION} and older: "
            "upgrade emdask to load it"
        )
    if document.get("checksum") != _checksum(document):
        raise ModelFileError(
            f"{json_path} does not match the checksum recorded in it: the file is corrupted or "
            "was edited; save the model again from the estimator"
        )
    spec = document.get("arrays")
    if not isinstance(spec, dict) or not isinstance(spec.get("entries"), dict):
        raise ModelFileError(f"{json_path} does not describe its arrays")
    name = spec.get("file")
    if not isinstance(name, str) or not _ARRAYS_FILE.match(name):
        raise ModelFileError(f"{json_path} names an unexpected arrays file {name!r}")
    arrays_path = path / name
    if not arrays_path.is_file():
        raise ModelFileError(f"{arrays_path} is missing; the model directory is incomplete")
    raw = arrays_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != spec.get("sha256"):
        raise ModelFileError(
            f"{arrays_path} does not match the SHA-256 digest recorded in {MODEL_JSON}: the "
            "file is corrupted or was replaced; save the model again"
        )
    arrays = {}
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            if set(npz.files) != set(spec["entries"]):
                raise ModelFileError(
                    f"{arrays_path} holds arrays {sorted(npz.files)}, but {MODEL_JSON} lists "
                    f"{sorted(spec['entries'])}"
                )
            for key in npz.files:
                a = npz[key]
                want = spec["entries"][key]
                if a.dtype.kind not in _ARRAY_KINDS or a.dtype.str != want.get("dtype") or list(
                    a.shape
                ) != want.get("shape"):
                    raise ModelFileError(
                        f"array {key} in {arrays_path} has dtype {a.dtype} and shape {a.shape}, "
                        f"not what {MODEL_JSON} records"
                    )
                arrays[key] = a
    except ModelFileError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError) as err:
        raise ModelFileError(f"{arrays_path} cannot be read as plain numpy arrays: {err}") from None
    return document, arrays


# --------------------------------------------------------------------------------------
# Estimator state
# --------------------------------------------------------------------------------------


def _encoded_params(est):
    out = {}
    for name, value in est.get_params().items():
        if name == "random_state" and isinstance(value, (np.random.Generator, np.random.RandomState)):
            value = None  # a generator's state is not kept: the file records no seed
        out[name] = _encode(value, f"argument {name} of {type(est).__name__}")
    return out


def _split_fitted(est):
    """``(arrays, json_values)`` of a subclass's fitted parameters and metadata."""
    arrays, values = {}, {}
    for name in est._fitted_arrays:
        if hasattr(est, name):
            a = np.asarray(getattr(est, name))
            if a.dtype.kind in _ARRAY_KINDS:
                arrays[name] = a
            else:
                values[name] = _encode(a, f"fitted attribute {name}")
    for name in est._fitted_meta:
        if hasattr(est, name):
            values[name] = _encode(getattr(est, name), f"fitted attribute {name}")
    return arrays, values


def _set_attributes(est, values, where):
    for name, value in values.items():
        setattr(est, name, _decode(value, where))


def _new_estimator(document, where):
    name = document.get("estimator")
    known = _known_estimators()
    if not isinstance(name, str) or name not in known:
        raise ModelFileError(
            f"{where} holds an estimator of class {name!r}, which this emdask does not know "
            f"(known: {sorted(known)}); a class defined outside emdask must be registered with "
            "emdask.register_estimator before loading"
        )
    cls = known[name]
    params = document.get("params")
    if not isinstance(params, dict):
        raise ModelFileError(f"{where} has no estimator arguments")
    valid = set(cls._param_names())
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ModelFileError(
            f"{where}: argument(s) {unknown} are not arguments of {cls.__name__} in this emdask; "
            "the file comes from another version: load it with that version"
        )
    est = cls(**{k: _decode(v, where) for k, v in params.items()})
    try:
        est._check_parameters()
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"{where}: invalid estimator arguments: {err}") from None
    family = document.get("family")
    if family is not None and family != _family_name(est):
        raise ModelFileError(
            f"{where}: the file's family {family!r} is not the family {_family_name(est)!r} of "
            f"{cls.__name__} with these arguments"
        )
    return est


def _check_rebuilt(est, where):
    try:
        est._fitted_params()
    except Exception as err:  # the arrays do not make a model
        raise ModelFileError(f"{where}: the fitted arrays do not form a valid model: {err}") from None


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def _header(est, kind):
    from . import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "emdask_version": __version__,
        "estimator": _class_name(type(est)),
        "family": _family_name(est),
        "params": _encoded_params(est),
    }


def save(estimator, path):
    """Write a fitted estimator to the directory ``path`` (created, or replaced atomically
    when it holds a model already).

    Returns
    -------
    pathlib.Path
    """
    estimator._check_fitted()
    arrays, values = _split_fitted(estimator)
    fitted = {}
    for name in estimator._common_fitted:
        if name != "lower_bounds_" and hasattr(estimator, name):
            fitted[name] = _encode(getattr(estimator, name), f"fitted attribute {name}")
    names = getattr(estimator, "_columns", None)
    document = _header(estimator, "model")
    document.update(
        {
            "feature_names": list(names) if names is not None else None,
            "fitted": fitted,
            "fitted_meta": values,
            "history": {
                "lower_bounds": [float(x) for x in getattr(estimator, "lower_bounds_", [])],
                "n_iter": int(estimator.n_iter_),
                "converged": bool(estimator.converged_),
                "n_passes": fitted.get("n_passes_"),
            },
        }
    )
    return _write_model_dir(path, document, arrays)


def load(path):
    """Read a model directory written by ``save`` (or a checkpoint: the best model so far).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    ModelFileError
        A corrupted or edited file, an unknown estimator class, or a newer format.
    """
    document, arrays = _read_model_dir(path)
    where = str(path)
    est = _new_estimator(document, where)
    kind = document.get("kind")
    if kind == "model":
        _set_attributes(est, document.get("fitted", {}), where)
        _set_attributes(est, document.get("fitted_meta", {}), where)
        for name, a in arrays.items():
            setattr(est, name, a)
        est.lower_bounds_ = [float(x) for x in document.get("history", {}).get("lower_bounds", [])]
    elif kind == "checkpoint":
        models = document.get("models") or []
        if not models:
            raise ModelFileError(f"{where}: the checkpoint holds no model")
        best = max(range(len(models)), key=lambda i: _last(models[i]["lower_bounds"]))
        _restore_model(est, document, arrays, best, where)
        state = models[best]
        est.converged_ = bool(state["converged"])
        est.n_iter_ = int(state["n_iter"])
        est.lower_bounds_ = [float(x) for x in state["lower_bounds"]]
        est.lower_bound_ = _last(est.lower_bounds_)
        est.n_passes_ = 0
    else:
        raise ModelFileError(f"{where}: unknown kind {kind!r} (expected 'model' or 'checkpoint')")
    _check_rebuilt(est, where)
    return est


def _last(lower_bounds):
    return float(lower_bounds[-1]) if lower_bounds else -math.inf


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _fingerprint(data):
    s = data.summary
    return {
        "n_rows": int(s.n_rows),
        "feature_names": list(data.feature_names),
        "nan_count": [int(x) for x in s.nan_count],
        "col_sum": [float(x) for x in s.col_sum],
    }


def _restore_model(est, document, arrays, i, where):
    """Set model ``i`` of a checkpoint as ``est``'s fitted parameters."""
    data = document.get("data", {})
    names = data.get("feature_names")
    has_names = bool(document.get("has_names"))
    est._set_data_attributes(len(names), names if has_names else None)
    state = document["models"][i]
    _set_attributes(est, state.get("fitted_meta", {}), where)
    prefix = f"model{i}."
    for key, a in arrays.items():
        if key.startswith(prefix):
            setattr(est, key[len(prefix):], a)


class CheckpointWriter:
    """Writes the state of every restart of a fit to ``path`` each time it is called
    (``run_em``'s ``after_pass``)."""

    def __init__(self, path, estimator, data, seed):
        self.path = Path(path)
        self.estimator = estimator
        self.header = _header(estimator, "checkpoint")
        self.header.update(
            {"seed": int(seed), "data": _fingerprint(data), "has_names": bool(data.has_names)}
        )
        if self.path.exists() and not _is_model_dir(self.path):
            if self.path.is_file() or any(self.path.iterdir()):
                raise FileExistsError(
                    f"checkpoint={str(path)!r} exists and is not an emdask checkpoint; choose a "
                    "new or empty directory"
                )

    def __call__(self, models):
        scratch = copy.copy(self.estimator)
        arrays, states = {}, []
        for i, model in enumerate(models):
            scratch._set_fitted(model.params)
            model_arrays, values = _split_fitted(scratch)
            for name, a in model_arrays.items():
                arrays[f"model{i}.{name}"] = a
            state = {
                "n_iter": int(model.n_iter),
                "converged": bool(model.converged),
                "lower_bounds": [float(x) for x in model.lower_bounds],
                "fitted_meta": values,
            }
            if model.accelerator is not None:
                scalars, vectors = model.accelerator.state(model.family)
                state["squarem"] = scalars
                for name, a in vectors.items():
                    arrays[f"squarem{i}.{name}"] = a
            states.append(state)
        document = dict(self.header)
        document["models"] = states
        _write_model_dir(self.path, document, arrays)


def read_checkpoint(path, estimator, family, data):
    """The models of the checkpoint at ``path``, ready to go on fitting; ``None`` when
    there is no checkpoint yet."""
    from .engine.driver import EMModel
    from .engine.squarem import Squarem

    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    document, arrays = _read_model_dir(path)
    where = f"checkpoint {path}"
    if document.get("kind") != "checkpoint":
        raise ModelFileError(
            f"{path} is a saved model, not a checkpoint; to go on from it, load it with "
            "emdask.load and fit with warm_start=True"
        )
    if document.get("estimator") != _class_name(type(estimator)):
        raise ValueError(
            f"{where} was written by a {document.get('estimator')}, not a "
            f"{type(estimator).__name__}; pass resume=False to start again"
        )
    mine, theirs = _encoded_params(estimator), document.get("params", {})
    differ = sorted(
        name
        for name in set(mine) | set(theirs)
        if name not in _RESUME_FREE and mine.get(name) != theirs.get(name)
    )
    if differ:
        raise ValueError(
            f"{where} was written with other values of {differ}; resume with the arguments "
            "of the interrupted fit, or pass resume=False to start again"
        )
    recorded, now = document.get("data", {}), _fingerprint(data)
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
    models = []
    scratch = copy.copy(estimator)
    for i, state in enumerate(document.get("models", [])):
        _restore_model(scratch, document, arrays, i, where)
        try:
            params = scratch._fitted_params()
        except Exception as err:
            raise ModelFileError(f"{where}: model {i} does not form valid parameters: {err}") from None
        accelerator = None
        if "squarem" in state:
            prefix = f"squarem{i}."
            vectors = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
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
