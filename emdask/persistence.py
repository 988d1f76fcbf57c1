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

Reading also checks that the file holds a model, not only that it is intact (a checksum
proves nothing about a file written by someone else): the arguments must be valid
arguments of the class (finite numbers, 64-bit integers); only the fitted attributes the
class declares (``_common_fitted``, ``_fitted_arrays``, ``_fitted_meta``) are accepted;
every array must have the shape the arguments and fitted metadata give it (``weights_``
``(n_components,)``, ``means_`` ``(n_components, n_features_in_)``, covariances by
``covariance_type``, ...), hold finite numbers, and satisfy its constraints: weights on the
simplex, probabilities in [0, 1] (a categorical column's summing to 1 over its levels),
rates >= 0, symmetric positive-definite covariances and upper-triangular precision Cholesky
factors with a positive diagonal. The arrays file is read member by member under a bound
on memory: before anything is decompressed, each member's declared uncompressed size
(``ZipInfo.file_size``) must fit the shape recorded for it, the total must fit
:data:`MAX_ARRAY_BYTES` (or ``load(path, max_bytes=...)``) and a compressed member may not
expand more than :data:`MAX_COMPRESSION_RATIO` times; then each ``.npy`` header must give
that dtype and shape, and exactly that many bytes are read.

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
import inspect
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

from .exceptions import ModelFileError

__all__ = [
    "FORMAT_VERSION",
    "MAX_ARRAY_BYTES",
    "MAX_COMPRESSION_RATIO",
    "MAX_JSON_BYTES",
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

#: Most memory, in bytes, that the arrays of one model file may take once read (all of
#: them together); ``load(path, max_bytes=...)`` sets another bound for one call. Each
#: array is moreover bounded by the shape its estimator's arguments give it.
MAX_ARRAY_BYTES = 4 * 2**30
#: Largest ``model.json`` read, in bytes.
MAX_JSON_BYTES = 64 * 2**20
#: A compressed member of an arrays file (of more than 64 KiB) may expand at most this many
#: times. emdask writes its arrays uncompressed; fitted parameters do not compress 100-fold.
MAX_COMPRESSION_RATIO = 100
_RATIO_FLOOR = 64 * 2**10
#: Room for the header of one ``.npy`` member (numpy keeps it under 64 KiB).
_NPY_HEADER_MAX = 65536 + 16
_READ_CHUNK = 2**20
#: How far from 1 mixing weights, or a categorical column's level probabilities, may sum.
SUM_TOLERANCE = 1e-4
#: Integers in a model file fit in 64 bits.
_INT_LOW, _INT_HIGH = -(2**63), 2**64


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
    """The value ``_encode`` wrote; :class:`ModelFileError` for anything it cannot have written."""
    try:
        return _decode_value(value, where)
    except ModelFileError:
        raise
    except (ValueError, TypeError, RecursionError) as err:
        raise ModelFileError(f"{where}: a value that is not a valid model-file value ({err})") from None


def _decode_value(value, where):
    if isinstance(value, list):
        return [_decode_value(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode_value(v, where) for v in value["__tuple__"])
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
    return {k: _decode_value(v, where) for k, v in value.items()}


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


def _read_document(path):
    """The checked JSON document of a model directory (format, version, checksum, and a
    well-formed description of its arrays)."""
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
    size = json_path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelFileError(
            f"{json_path} is {size} bytes, more than the {MAX_JSON_BYTES} a model file's JSON "
            "may take (emdask.persistence.MAX_JSON_BYTES): it is not a model written by emdask"
        )
    try:
        document = json.loads(json_path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
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
    for key, entry in spec["entries"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < _INT_HIGH for n in shape)
            and isinstance(dtype, str)
        ):
            raise ModelFileError(
                f"{json_path}: array {key} is described without a valid dtype and shape; the "
                "file is corrupted: save the model again"
            )
        try:
            kind = np.dtype(dtype).kind
        except (TypeError, ValueError, SyntaxError):
            kind = None
        if kind is None or kind not in _ARRAY_KINDS:
            raise ModelFileError(
                f"{json_path}: array {key} has dtype {dtype!r}; model files hold arrays of "
                "numbers only"
            )
    return document


class _File:
    """Where the problems of one model file are reported: file, attribute, what to do."""

    def __init__(self, path, document):
        self.dir = Path(path)
        self.json = self.dir / MODEL_JSON
        self.arrays = self.dir / document["arrays"]["file"]
        self.remedy = (
            "fit again with resume=False to write a new checkpoint"
            if document.get("kind") == "checkpoint"
            else "refit and save the model again"
        )

    def error(self, attr, problem, *, arrays=False):
        """``<file>: <attr> <problem>; <remedy>``."""
        where = self.arrays if arrays else self.json
        return ModelFileError(f"{where}: {attr} {problem}; {self.remedy}")


def _nbytes(entry):
    return math.prod(entry["shape"]) * np.dtype(entry["dtype"]).itemsize


def _read_arrays(file, document, max_bytes):
    """The arrays of a model directory, read under a bound on memory.

    The entries of ``document`` (already checked against the estimator) say each array's
    dtype and shape. Before decompressing anything: their total must fit ``max_bytes``,
    the file must not be larger than they need, every member's declared uncompressed size
    must fit its array and a compressed member may not expand more than
    ``MAX_COMPRESSION_RATIO`` times. Then each member's ``.npy`` header must give the
    recorded dtype and shape, and exactly that many bytes are read.
    """
    spec = document["arrays"]
    entries = spec["entries"]
    arrays_path = file.arrays
    if not arrays_path.is_file():
        raise ModelFileError(f"{arrays_path} is missing; the model directory is incomplete")
    need = {key: _nbytes(entry) for key, entry in entries.items()}
    total = sum(need.values())
    if total > max_bytes:
        raise ModelFileError(
            f"{arrays_path}: the arrays recorded in {MODEL_JSON} take {total} bytes, more than "
            f"the limit of {max_bytes} (emdask.persistence.MAX_ARRAY_BYTES, or "
            "emdask.load(path, max_bytes=...) for a model known to be this large)"
        )
    # an uncompressed archive: the arrays, their headers, zip records per member
    room = total + sum(_NPY_HEADER_MAX + 2 * len(key) + 256 for key in entries) + 1024
    size = arrays_path.stat().st_size
    if size > room:
        raise file.error(
            "the arrays file",
            f"is {size} bytes, more than the {room} its arrays recorded in {MODEL_JSON} need",
            arrays=True,
        )
    raw = arrays_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != spec.get("sha256"):
        raise ModelFileError(
            f"{arrays_path} does not match the SHA-256 digest recorded in {MODEL_JSON}: the "
            "file is corrupted or was replaced; save the model again"
        )
    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            members = {}
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if key in members:
                    raise file.error(key, "is stored twice in the arrays file", arrays=True)
                members[key] = info
            if set(members) != set(entries):
                raise ModelFileError(
                    f"{arrays_path} holds arrays {sorted(members)}, but {MODEL_JSON} lists "
                    f"{sorted(entries)}"
                )
            for key, info in members.items():  # every size, before decompressing any
                limit = need[key] + _NPY_HEADER_MAX
                if info.file_size > limit:
                    raise file.error(
                        key,
                        f"declares {info.file_size} bytes uncompressed, but its shape "
                        f"{tuple(entries[key]['shape'])} of {entries[key]['dtype']} needs "
                        f"{need[key]} (+ a header)",
                        arrays=True,
                    )
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > _RATIO_FLOOR and ratio > MAX_COMPRESSION_RATIO:
                    raise file.error(
                        key,
                        f"expands {ratio:.0f} times ({info.compress_size} bytes compressed, "
                        f"{info.file_size} uncompressed), more than the "
                        f"{MAX_COMPRESSION_RATIO} allowed (emdask.persistence.MAX_COMPRESSION_RATIO)",
                        arrays=True,
                    )
            for key, info in members.items():
                arrays[key] = _read_member(zf, info, key, entries[key], need[key], file)
    except ModelFileError:
        raise
    except (
        ValueError,
        OSError,
        zipfile.BadZipFile,
        KeyError,
        EOFError,
        RuntimeError,
        NotImplementedError,
        SyntaxError,
    ) as err:
        raise ModelFileError(f"{arrays_path} cannot be read as plain numpy arrays: {err}") from None
    return arrays


def _read_member(zf, info, key, entry, nbytes, file):
    """One ``.npy`` member: header checked against ``entry``, then exactly its data."""
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=_NPY_HEADER_MAX)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=_NPY_HEADER_MAX)
        else:
            raise file.error(key, f"is in .npy format {version}, not 1.0 or 2.0", arrays=True)
        if (
            dtype.hasobject
            or dtype.kind not in _ARRAY_KINDS
            or dtype.str != entry["dtype"]
            or list(shape) != entry["shape"]
        ):
            raise ModelFileError(
                f"array {key} in {file.arrays} has dtype {dtype} and shape {shape}, not what "
                f"{MODEL_JSON} records ({entry['dtype']}, {tuple(entry['shape'])}); "
                f"{file.remedy}"
            )
        if info.file_size != f.tell() + nbytes:
            raise file.error(
                key,
                f"holds {info.file_size - f.tell()} bytes of data, but its shape "
                f"{tuple(shape)} of {dtype} needs {nbytes}",
                arrays=True,
            )
        out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        flat = memoryview(out.reshape(-1, order="A").view(np.uint8))
        done = 0
        while done < nbytes:  # into the array, a chunk at a time: no second copy
            chunk = f.read(min(nbytes - done, _READ_CHUNK))
            if not chunk:
                break
            flat[done : done + len(chunk)] = chunk
            done += len(chunk)
        if done != nbytes or f.read(1):
            raise file.error(key, f"does not hold the {nbytes} bytes of its shape", arrays=True)
    return out


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


def _number_problem(value):
    """What is wrong with the numbers of a JSON value (NaN, infinities, integers beyond 64
    bits), or ``None``."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, int):
            if not _INT_LOW <= v < _INT_HIGH:
                return f"holds the integer {v}, beyond 64 bits"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"holds {v}: numbers must be finite"
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return None


def _check_arguments(cls, params, file):
    """Argument values as a constructor could have been given them (beyond ``_check_parameters``)."""
    signature = inspect.signature(cls.__init__).parameters
    for name, value in params.items():
        problem = _number_problem(value)
        if problem:
            raise file.error(f"argument {name}", problem)
        if isinstance(signature[name].default, bool) and not isinstance(value, bool):
            raise file.error(f"argument {name}", f"= {value!r} must be true or false")
    seed = params.get("random_state")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise file.error("argument random_state", f"= {seed!r} must be null or a non-negative integer")


def _new_estimator(document, where, file):
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
    _check_arguments(cls, params, file)
    est = cls(**{k: _decode(v, f"{file.json}: argument {k}") for k, v in params.items()})
    try:
        est._check_parameters()
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelFileError(f"{where}: invalid estimator arguments: {err}; {file.remedy}") from None
    family = document.get("family")
    if family is not None and family != _family_name(est):
        raise ModelFileError(
            f"{where}: the file's family {family!r} is not the family {_family_name(est)!r} of "
            f"{cls.__name__} with these arguments"
        )
    return est


def _check_init_arguments(est, file):
    """Starting values among the arguments (``means_init``, ``probabilities_init``...)
    must fit the loaded model, as ``fit`` would require."""
    try:
        est._check_extra_parameters(est.n_features_in_)
        if hasattr(est, "_fitted_encoder"):
            est._check_init_shapes(est._fitted_encoder())
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ModelFileError(f"{file.json}: {err} (an argument of the model); {file.remedy}") from None


def _check_rebuilt(est, where):
    try:
        est._fitted_params()
    except Exception as err:  # the arrays do not make a model
        raise ModelFileError(f"{where}: the fitted arrays do not form a valid model: {err}") from None


# --------------------------------------------------------------------------------------
# What a file may hold: declared attributes, shapes, values
# --------------------------------------------------------------------------------------


def _is_int(v, low=0):
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < 2**63


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_declared(cls, mapping, allowed, section, file):
    """Only attributes ``cls`` declares, and none that could shadow a method."""
    for name in mapping:
        data_attribute = (
            isinstance(name, str)
            and name.isidentifier()
            and not name.startswith("__")
            and not callable(inspect.getattr_static(cls, name, None))
            and not isinstance(inspect.getattr_static(cls, name, None), (property, classmethod, staticmethod))
        )
        if name not in allowed or not data_attribute:
            raise file.error(
                repr(name) if not isinstance(name, str) or not name.isidentifier() else name,
                f"in {section} is not a fitted attribute of {cls.__name__}, which declares "
                f"{list(allowed)}",
            )


def _check_feature_names(names, d, attr, file):
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise file.error(attr, "must be a list of column names (strings)")
    if len(names) != d:
        raise file.error(attr, f"has {len(names)} names but n_features_in_={d}")


def _check_fitted(est, document, file):
    """The decoded common fitted attributes of a saved model (``converged_``, ``n_iter_``...)."""
    cls = type(est)
    fitted = document.get("fitted")
    if not isinstance(fitted, dict):
        raise file.error("fitted", "is missing or not an object")
    allowed = [n for n in cls._common_fitted if n != "lower_bounds_"]
    _check_declared(cls, fitted, allowed, "fitted", file)
    for name in ("converged_", "n_iter_", "lower_bound_", "n_features_in_"):
        if name not in fitted:
            raise file.error(name, "is missing from fitted")
    out = {}
    for name, value in fitted.items():
        if name == "converged_" and not isinstance(value, bool):
            raise file.error(name, f"= {value!r} must be true or false")
        if name in ("n_iter_", "n_passes_") and not _is_int(value):
            raise file.error(name, f"= {value!r} must be a non-negative integer")
        if name == "n_features_in_" and not _is_int(value, low=1):
            raise file.error(name, f"= {value!r} must be a positive integer")
        if name == "lower_bound_" and not (_is_number(value) and value == value and value != math.inf):
            raise file.error(name, f"= {value!r} must be a number (or -Infinity before any iteration)")
        out[name] = _decode(value, f"{file.json}: {name}")
    d = out["n_features_in_"]
    columns = out.get("_columns")
    if columns is not None:
        _check_feature_names(columns, d, "_columns", file)
    if "feature_names_in_" in out:
        names = out["feature_names_in_"]
        if not (
            isinstance(names, np.ndarray)
            and names.dtype == object
            and columns is not None
            and names.tolist() == columns
        ):
            raise file.error("feature_names_in_", "must be the list of column names of _columns")
    return out


def _check_lower_bounds(values, attr, file):
    if not (isinstance(values, list) and all(_is_number(x) and x == x for x in values)):
        raise file.error(attr, "must be a list of numbers (no NaN)")
    return [float(x) for x in values]


def _check_levels(levels, attr, file):
    if not isinstance(levels, list) or not all(
        isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v))
        for v in levels
    ):
        raise file.error(attr, "must be a list of levels (strings or numbers)")
    if len(set(levels)) != len(levels):
        raise file.error(attr, "names a level twice")


def _check_meta(est, raw, names, section, file):
    """The decoded fitted metadata (``categories_``, ``column_families_``) of one model.

    ``names``: a function giving the model's column names (called once the metadata is
    known to describe a bounded number of columns)."""
    from .estimators.discrete import BinomialMixture, CategoricalMixture, MixedMixture
    from .families.mixed import MIXED_KINDS

    cls = type(est)
    if isinstance(est, BinomialMixture):
        columns = 1 if est.n_trials is not None else 2
        if est.n_features_in_ != columns:
            raise file.error(
                "n_features_in_",
                f"= {est.n_features_in_}, but a BinomialMixture with n_trials={est.n_trials} "
                f"models {columns} column(s) (successes{'' if columns == 1 else ', trials'})",
            )
    if not isinstance(raw, dict):
        raise file.error(section, "must be an object")
    _check_declared(cls, raw, cls._fitted_meta, section, file)
    meta = {k: _decode(v, f"{file.json}: {k}") for k, v in raw.items()}
    for name in cls._fitted_meta:
        if name not in meta and isinstance(est, (CategoricalMixture, MixedMixture)):
            raise file.error(name, f"is missing from {section}")
    if isinstance(est, CategoricalMixture):
        cats = meta["categories_"]
        if not isinstance(cats, list):
            raise file.error("categories_", "must be a list of the levels of every column")
        if len(cats) != est.n_features_in_:
            raise file.error(
                "categories_", f"lists the levels of {len(cats)} columns but n_features_in_={est.n_features_in_}"
            )
        for j, levels in enumerate(cats):
            _check_levels(levels, f"categories_[{j}]", file)
    elif isinstance(est, MixedMixture):
        families, cats = meta["column_families_"], meta["categories_"]
        if not isinstance(families, dict) or len(families) != est.n_features_in_:
            raise file.error(
                "column_families_", f"must map each of the n_features_in_={est.n_features_in_} columns to its family"
            )
        if list(families) != names():
            raise file.error("column_families_", f"names columns {list(families)}, not the model's {names()}")
        bad = {c: f for c, f in families.items() if f not in MIXED_KINDS}
        if bad:
            raise file.error("column_families_", f"gives unknown families {bad} (known: {list(MIXED_KINDS)})")
        categorical = [c for c, f in families.items() if f == "categorical"]
        if not isinstance(cats, dict) or list(cats) != categorical:
            raise file.error("categories_", f"must give the levels of the categorical columns {categorical}")
        for c, levels in cats.items():
            _check_levels(levels, f"categories_[{c!r}]", file)
    return meta


# -- shapes and constraints of the fitted arrays, by estimator ------------------------------


def _weights_problem(w, arrays):
    if np.any(w < 0):
        return f"holds the negative weight {w.min():g}: weights must be >= 0"
    total = float(w.sum())
    if abs(total - 1.0) > SUM_TOLERANCE:
        return f"sums to {total:.6g}: weights must sum to 1"
    return None


def _probabilities_problem(p, arrays):
    bad = p[(p < 0) | (p > 1)]
    if bad.size:
        return f"holds {bad[0]:g}: probabilities must be in [0, 1]"
    return None


def _rates_problem(r, arrays):
    if np.any(r < 0):
        return f"holds the rate {r.min():g}: rates must be >= 0"
    return None


def _levels_problem(n_levels):
    def problem(p, arrays):
        found = _probabilities_problem(p, arrays)
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


def _covariances_problem(covariance_type):
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


def _precisions_cholesky_problem(covariance_type):
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


def _precisions_problem(covariance_type, cholesky_key):
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


def _expected_arrays(est, meta, prefix=""):
    """``{entry: (shape, why, problem)}`` of the fitted arrays of one model of ``est`` (whose
    ``n_components`` and ``n_features_in_`` are known), ``None`` for a class without known
    rules (registered from outside emdask, not deriving from an emdask estimator).

    ``why`` says what gives the shape; ``problem(array, arrays)`` says what is wrong with a
    value (``None`` when nothing is).
    """
    from .estimators.discrete import (
        BernoulliMixture,
        BinomialMixture,
        CategoricalMixture,
        MixedMixture,
        PoissonMixture,
    )
    from .estimators.gaussian import GaussianMixture

    k, d = est.n_components, est.n_features_in_
    kd = f"n_components={k} and n_features_in_={d}"
    rules = {"weights_": ((k,), f"n_components={k}", _weights_problem)}
    if isinstance(est, GaussianMixture):
        ct = est.covariance_type
        cov = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[ct]
        why = f"n_components={k}, n_features_in_={d} and covariance_type={ct!r}"
        rules["means_"] = ((k, d), kd, None)
        rules["covariances_"] = (cov, why, _covariances_problem(ct))
        rules["precisions_cholesky_"] = (cov, why, _precisions_cholesky_problem(ct))
        rules["precisions_"] = (cov, why, _precisions_problem(ct, prefix + "precisions_cholesky_"))
    elif isinstance(est, (BernoulliMixture, PoissonMixture)):
        name, problem = (
            ("probabilities_", _probabilities_problem)
            if isinstance(est, BernoulliMixture)
            else ("rates_", _rates_problem)
        )
        rules[name] = ((k, d), kd, problem)
    elif isinstance(est, BinomialMixture):
        rules["probabilities_"] = ((k,), f"n_components={k}", _probabilities_problem)
    elif isinstance(est, CategoricalMixture):
        n_levels = [len(levels) for levels in meta["categories_"]]
        lmax = max(n_levels, default=0)
        why = f"n_components={k} and categories_ ({d} columns, at most {lmax} levels)"
        rules["probabilities_"] = ((k, d, lmax), why, _levels_problem(n_levels))
    elif isinstance(est, MixedMixture):
        families, ct = list(meta["column_families_"].values()), est.covariance_type
        g, b, p = (families.count(f) for f in ("gaussian", "bernoulli", "poisson"))
        n_levels = [len(levels) for levels in meta["categories_"].values()]
        lmax = max(n_levels, default=0)
        cov = (k, g, g) if ct == "full" else (k, g)
        per = f"n_components={k} and column_families_"
        rules["means_"] = ((k, g), f"{per} ({g} gaussian columns)", None)
        why = f"{per} ({g} gaussian columns) and covariance_type={ct!r}"
        rules["covariances_"] = (cov, why, _covariances_problem(ct))
        rules["precisions_cholesky_"] = (cov, why, _precisions_cholesky_problem(ct))
        rules["binary_probabilities_"] = ((k, b), f"{per} ({b} bernoulli columns)", _probabilities_problem)
        rules["category_probabilities_"] = (
            (k, len(n_levels), lmax),
            f"{per} and categories_ ({len(n_levels)} categorical columns, at most {lmax} levels)",
            _levels_problem(n_levels),
        )
        rules["rates_"] = ((k, p), f"{per} ({p} poisson columns)", _rates_problem)
    else:
        return None
    return {prefix + name: rule for name, rule in rules.items()}


def _check_entries(est, entries, expected, extra, file):
    """The arrays recorded in ``model.json`` against what the model needs, before any is read.

    ``expected``: ``{entry: (shape, why, problem)}`` (shape ``None``: not known);
    ``extra``: ``{entry: most elements}`` of other 1-D arrays allowed (accelerator state).
    """
    cls = type(est)
    for key, entry in entries.items():
        shape = tuple(entry["shape"])
        if key in extra:
            if len(shape) != 1 or shape[0] > extra[key] or np.dtype(entry["dtype"]).kind != "f":
                raise file.error(
                    key,
                    f"has dtype {entry['dtype']} and shape {shape}, but the accelerator state is a "
                    f"vector of at most {extra[key]} floats",
                    arrays=True,
                )
            continue
        if key not in expected:
            raise file.error(
                key,
                f"is not a fitted array of {cls.__name__}, which declares {list(cls._fitted_arrays)}",
                arrays=True,
            )
        want, why, _ = expected[key]
        if want is None:
            continue
        if np.dtype(entry["dtype"]).kind != "f":
            raise file.error(key, f"has dtype {entry['dtype']}, not a float dtype", arrays=True)
        if shape != want:
            raise file.error(key, f"has shape {shape} but {why} need {want}", arrays=True)
    missing = [key for key, (want, _, _) in expected.items() if want is not None and key not in entries]
    if missing:
        raise file.error(missing[0], "is missing from the arrays file", arrays=True)


def _check_values(arrays, expected, file):
    """Finite floats everywhere, then each array's constraints."""
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise file.error(key, "holds NaN or infinite values: fitted parameters are finite", arrays=True)
    for key, (want, _, problem) in expected.items():
        if problem is not None and key in arrays:
            found = problem(arrays[key], arrays)
            if found:
                raise file.error(key, found, arrays=True)


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


def load(path, *, max_bytes=None):
    """Read a model directory written by ``save`` (or a checkpoint: the best model so far).

    Everything in the file is checked before it becomes part of the estimator: the
    arguments, that only the fitted attributes the estimator declares are present, every
    array's shape against ``n_components``, ``n_features_in_`` and the fitted metadata, its
    values (finite; weights on the simplex; probabilities in [0, 1]; rates >= 0;
    positive-definite covariances and precision Cholesky factors), and, before anything is
    decompressed, the size every array will take.

    Parameters
    ----------
    path : str or path
    max_bytes : int, optional
        Most memory the arrays may take once read, all together (default
        :data:`MAX_ARRAY_BYTES`, 4 GiB).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    ModelFileError
        A corrupted, edited or invalid file (the message names the file, the attribute and
        what is wrong), an unknown estimator class, or a newer format.
    """
    path = Path(path)
    limit = MAX_ARRAY_BYTES if max_bytes is None else int(max_bytes)
    document = _read_document(path)
    file = _File(path, document)
    where = str(path)
    kind = document.get("kind")
    if kind not in ("model", "checkpoint"):
        raise ModelFileError(f"{where}: unknown kind {kind!r} (expected 'model' or 'checkpoint')")
    est = _new_estimator(document, where, file)
    entries = document["arrays"]["entries"]
    if kind == "model":
        fitted = _check_fitted(est, document, file)
        for name, value in fitted.items():
            setattr(est, name, value)
        meta = _check_meta(
            est, document.get("fitted_meta", {}), lambda: _column_names(est), "fitted_meta", file
        )
        history = document.get("history")
        if not isinstance(history, dict):
            raise file.error("history", "is missing or not an object")
        lower_bounds = _check_lower_bounds(history.get("lower_bounds", []), "history.lower_bounds", file)
        for name, value in meta.items():
            setattr(est, name, value)
        expected = _rules_or_declared(est, meta, "")
        _check_entries(est, entries, expected, {}, file)
        arrays = _read_arrays(file, document, limit)
        _check_values(arrays, expected, file)
        for name, a in arrays.items():
            setattr(est, name, a)
        est.lower_bounds_ = lower_bounds
    else:
        models, metas, expected, extra = _check_checkpoint(est, document, file)
        _check_entries(est, entries, expected, extra, file)
        arrays = _read_arrays(file, document, limit)
        _check_values(arrays, expected, file)
        best = max(range(len(models)), key=lambda i: _last(models[i]["lower_bounds"]))
        _restore_model(est, document, arrays, best, metas[best])
        state = models[best]
        est.converged_ = state["converged"]
        est.n_iter_ = state["n_iter"]
        est.lower_bounds_ = list(state["lower_bounds"])
        est.lower_bound_ = _last(est.lower_bounds_)
        est.n_passes_ = 0
    _check_init_arguments(est, file)
    _check_rebuilt(est, where)
    return est


def _column_names(est):
    cols = getattr(est, "_columns", None)
    return list(cols) if cols is not None else [f"x{j}" for j in range(est.n_features_in_)]


def _rules_or_declared(est, meta, prefix):
    """Shape rules of one model's arrays; for a class without rules, its declared names."""
    rules = _expected_arrays(est, meta, prefix)
    if rules is None:
        rules = {prefix + name: (None, None, None) for name in type(est)._fitted_arrays}
    return rules


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


_SQUAREM_VECTORS = ("base", "first", "pending")


def _check_checkpoint(est, document, file):
    """Check a checkpoint's description of its fit and models.

    Returns ``(models, metas, expected, extra)``: the checked model states (``n_iter``,
    ``converged``, ``lower_bounds``, ``squarem``), each model's decoded fitted metadata,
    the rules of every model's arrays (``model<i>.<name>``) and the bound on the size of
    the accelerator vectors (``squarem<i>.<name>``).
    """
    data = document.get("data")
    if not isinstance(data, dict):
        raise file.error("data", "is missing or not an object")
    names = data.get("feature_names")
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise file.error("data.feature_names", "must be a non-empty list of column names")
    d = len(names)
    if not _is_int(data.get("n_rows")):
        raise file.error("data.n_rows", "must be a non-negative integer")
    counts, sums = data.get("nan_count"), data.get("col_sum")
    if not (isinstance(counts, list) and len(counts) == d and all(_is_int(x) for x in counts)):
        raise file.error("data.nan_count", f"must be a list of {d} non-negative integers")
    if not (isinstance(sums, list) and len(sums) == d and all(_is_number(x) for x in sums)):
        raise file.error("data.col_sum", f"must be a list of {d} numbers")
    if not isinstance(document.get("has_names"), bool):
        raise file.error("has_names", "must be true or false")
    if not _is_int(document.get("seed")):
        raise file.error("seed", "must be a non-negative integer")
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise file.error("models", "must be a non-empty list (the checkpoint holds no model)")
    if len(models) > max(est.n_init, 1):
        raise file.error("models", f"holds {len(models)} models but n_init={est.n_init}")
    est._set_data_attributes(d, names if document["has_names"] else None)
    metas, expected, extra = [], {}, {}
    for i, state in enumerate(models):
        at = f"models[{i}]"
        if not isinstance(state, dict):
            raise file.error(at, "must be an object")
        if not _is_int(state.get("n_iter")):
            raise file.error(f"{at}.n_iter", "must be a non-negative integer")
        if not isinstance(state.get("converged"), bool):
            raise file.error(f"{at}.converged", "must be true or false")
        state_bounds = _check_lower_bounds(state.get("lower_bounds"), f"{at}.lower_bounds", file)
        meta = _check_meta(est, state.get("fitted_meta", {}), lambda: list(names), f"{at}.fitted_meta", file)
        for name, value in meta.items():  # rules of this model's arrays read them
            setattr(est, name, value)
        rules = _rules_or_declared(est, meta, f"model{i}.")
        expected.update(rules)
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
        models[i] = {**state, "lower_bounds": state_bounds}
    return models, metas, expected, extra


def _check_squarem(scalars, at, i, entries, file):
    if not isinstance(scalars, dict):
        raise file.error(at, "must be an object")
    phase, step_max, alpha = scalars.get("phase"), scalars.get("step_max"), scalars.get("alpha")
    if phase not in (0, 1, 2) or isinstance(phase, bool):
        raise file.error(f"{at}.phase", f"= {phase!r} must be 0, 1 or 2")
    for name, value in (("step_max", step_max), ("alpha", alpha)):
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise file.error(f"{at}.{name}", f"= {value!r} must be a finite positive number")
    needed = {0: (), 1: ("base",), 2: ("base", "first", "pending")}[phase]
    absent = [v for v in needed if f"squarem{i}.{v}" not in entries]
    if absent:
        raise file.error(f"squarem{i}.{absent[0]}", f"is missing, but {at}.phase={phase} needs it", arrays=True)


def _restore_model(est, document, arrays, i, meta):
    """Set model ``i`` of a checkpoint (its arrays and checked metadata) as ``est``'s fitted
    parameters."""
    data = document["data"]
    names = data["feature_names"]
    est._set_data_attributes(len(names), names if document["has_names"] else None)
    for name, value in meta.items():
        setattr(est, name, value)
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
    document = _read_document(path)
    file = _File(path, document)
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
    own = _new_estimator(document, where, file)
    states, metas, expected, extra = _check_checkpoint(own, document, file)
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
    entries = document["arrays"]["entries"]
    _check_entries(own, entries, expected, extra, file)
    arrays = _read_arrays(file, document, MAX_ARRAY_BYTES)
    _check_values(arrays, expected, file)
    models = []
    scratch = copy.copy(estimator)
    for i, state in enumerate(states):
        _restore_model(scratch, document, arrays, i, metas[i])
        try:
            params = scratch._fitted_params()
        except Exception as err:
            raise ModelFileError(f"{where}: model {i} does not form valid parameters: {err}") from None
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
