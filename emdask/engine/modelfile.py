"""Model directories: JSON metadata and one ``.npz`` of arrays, written atomically and read
under bounds.

The format shared by saved models (:mod:`emdask.persistence`) and the checkpoints of a fit
(:mod:`emdask.engine.checkpoint`): a directory holding ``model.json`` (format, version,
checksum, the estimator's class name and arguments, its fitted state's metadata) and
``arrays-<digest>.npz`` (numpy's own format, no pickle). This module knows the layout of
the files and how to write and read them safely; what a fitted state may hold is the
estimator's to check (its ``_set_state``), and reaches a reader as
:class:`~emdask.exceptions.StateError`.
"""

from __future__ import annotations

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

from .._version import __version__
from ..exceptions import ModelFileError, StateError

#: Written in every file; readers accept this version and older.
FORMAT_VERSION = 1
FORMAT_NAME = "emdask-model"
MODEL_JSON = "model.json"
_ARRAYS_FILE = re.compile(r"^arrays-[0-9a-f]{16}\.npz$")
_ARRAY_KINDS = "biuf"  # bool, integers, floats: what an .npz holds without pickle

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
#: Integers in a model file fit in 64 bits.
_INT_LOW, _INT_HIGH = -(2**63), 2**64


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


def write_model_dir(path, document, arrays):
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


def is_model_dir(path):
    return (Path(path) / MODEL_JSON).is_file()


def read_document(path):
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


class File:
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


def read_arrays(file, document, max_bytes):
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
# Estimators in a file: class name, arguments, fitted state
# --------------------------------------------------------------------------------------


def is_int(v, low=0):
    """A JSON integer (not a bool) in ``[low, 2**63)``."""
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < 2**63


def is_number(v):
    """A JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_declared(cls, mapping, allowed, section):
    """Only attributes ``cls`` declares, and none that could shadow a method
    (:class:`~emdask.exceptions.StateError` otherwise)."""
    for name in mapping:
        data_attribute = (
            isinstance(name, str)
            and name.isidentifier()
            and not name.startswith("__")
            and not callable(inspect.getattr_static(cls, name, None))
            and not isinstance(inspect.getattr_static(cls, name, None), (property, classmethod, staticmethod))
        )
        if name not in allowed or not data_attribute:
            raise StateError(
                repr(name) if not isinstance(name, str) or not name.isidentifier() else name,
                f"in {section} is not a fitted attribute of {cls.__name__}, which declares "
                f"{list(allowed)}",
            )


def check_lower_bounds(values, attr):
    """A history of mean log-likelihoods: a list of numbers, no NaN."""
    if not (isinstance(values, list) and all(is_number(x) and x == x for x in values)):
        raise StateError(attr, "must be a list of numbers (no NaN)")
    return [float(x) for x in values]


def family_name(est):
    family = est._make_family()
    return getattr(family, "name", type(family).__name__)


def encoded_params(est):
    """The constructor arguments of ``est`` as JSON values (a generator ``random_state`` as
    ``None``: its state is not kept)."""
    out = {}
    for name, value in est.get_params().items():
        if name == "random_state" and isinstance(value, (np.random.Generator, np.random.RandomState)):
            value = None  # a generator's state is not kept: the file records no seed
        out[name] = _encode(value, f"argument {name} of {type(est).__name__}")
    return out


def header(est, kind):
    """The fields every file of ``est`` starts with: format, kind, versions, class, family,
    arguments."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "emdask_version": __version__,
        "estimator": type(est)._registry_name(),
        "family": family_name(est),
        "params": encoded_params(est),
    }


def encode_meta(meta):
    """JSON values of fitted metadata (``_get_state``'s second half)."""
    return {name: _encode(value, f"fitted attribute {name}") for name, value in meta.items()}


def decode_meta(raw, file):
    return {k: _decode(v, f"{file.json}: {k}") for k, v in raw.items()}


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
    """Argument values as a constructor could have been given them (beyond the class's own
    validation of its parameters)."""
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


def new_estimator(cls, document, where, file):
    """An unfitted ``cls`` built from the file's checked arguments."""
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
        est._validate_params()
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelFileError(f"{where}: invalid estimator arguments: {err}; {file.remedy}") from None
    family = document.get("family")
    if family is not None and family != family_name(est):
        raise ModelFileError(
            f"{where}: the file's family {family!r} is not the family {family_name(est)!r} of "
            f"{cls.__name__} with these arguments"
        )
    return est


def check_entries(cls, entries, expected, extra, file):
    """The arrays recorded in ``model.json`` against what the model needs, before any is read.

    ``expected``: ``{entry: (shape, why, problem)}`` (shape ``None``: not known);
    ``extra``: ``{entry: most elements}`` of other 1-D arrays allowed (accelerator state).
    """
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


def check_finite(arrays, file):
    """Every float array of the file holds finite numbers."""
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise file.error(key, "holds NaN or infinite values: fitted parameters are finite", arrays=True)


def state_rules(est, meta, prefix=""):
    """``{entry: (shape, why, problem)}`` of the arrays of one fitted state of ``est`` with
    metadata ``meta``, keys prefixed by ``prefix`` (see ``_state_rules``)."""
    return {prefix + name: rule for name, rule in est._state_rules(meta).items()}


def file_error(file, err, prefix=""):
    """The :class:`ModelFileError` of a :class:`StateError` found in ``file``."""
    attr = prefix + err.attr if err.in_arrays else err.attr
    return file.error(attr, err.problem, arrays=err.in_arrays)


def write_model(est, path):
    """Write the fitted estimator ``est`` to the model directory ``path`` (created, or
    replaced atomically when it holds a model already); returns the path.

    ``model.json`` holds the class, arguments and family (:func:`header`), the common
    fitted attributes (``fitted``), the class's own fitted metadata (``fitted_meta``), the
    history of the fit and the description of the arrays file; the arrays file holds the
    fitted arrays.
    """
    arrays, meta = est._get_state()
    common = type(est)._common_fitted
    fitted = encode_meta({n: v for n, v in meta.items() if n in common and n != "lower_bounds_"})
    own = encode_meta({n: v for n, v in meta.items() if n not in common})
    names = meta.get("_columns")
    document = header(est, "model")
    document.update(
        {
            "feature_names": list(names) if names is not None else None,
            "fitted": fitted,
            "fitted_meta": own,
            "history": {
                "lower_bounds": [float(x) for x in meta.get("lower_bounds_", [])],
                "n_iter": int(meta["n_iter_"]),
                "converged": bool(meta["converged_"]),
                "n_passes": fitted.get("n_passes_"),
            },
        }
    )
    return write_model_dir(path, document, arrays)
