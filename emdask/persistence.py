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
emdask knows (its own, registered as they are defined, and those given to
:func:`register_estimator`), never imported from
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

Checkpoints (``fit(X, checkpoint=path)``) use the same layout with ``"kind": "checkpoint"``
(:mod:`emdask.engine.checkpoint`); :func:`load` reads one as the best model so far.

This module encodes an estimator as (class name, constructor arguments, fitted state) and
decodes it, nothing else: the file layout and its safe reading live in
:mod:`emdask.engine.modelfile`, the fitted state and its checks in each estimator
(``_get_state`` / ``_set_state``, rules in :mod:`emdask.estimators.state`), the classes a
file may name in the registry of :class:`~emdask.estimators.BaseMixture`.
"""

from __future__ import annotations

from pathlib import Path

from .engine.checkpoint import load_best
from .engine.modelfile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_ARRAY_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_BYTES,
    MODEL_JSON,
    File,
    _checksum,
    check_declared,
    check_entries,
    check_lower_bounds,
    decode_meta,
    file_error,
    new_estimator,
    read_arrays,
    read_document,
    state_rules,
    write_file_atomic,
    write_model,
)
from .estimators.base import estimator_class, known_estimators, register_estimator
from .estimators.state import REQUIRED
from .exceptions import ModelFileError, StateError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_ARRAY_BYTES",
    "MAX_COMPRESSION_RATIO",
    "MAX_JSON_BYTES",
    "MODEL_JSON",
    "ModelFileError",
    "load",
    "register_estimator",
    "save",
    "write_file_atomic",
    "_checksum",
]


def save(estimator, path):
    """Write a fitted estimator to the directory ``path`` (created, or replaced atomically
    when it holds a model already).

    Returns
    -------
    pathlib.Path
    """
    return write_model(estimator, path)


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
    document = read_document(path)
    file = File(path, document)
    where = str(path)
    kind = document.get("kind")
    if kind not in ("model", "checkpoint"):
        raise ModelFileError(f"{where}: unknown kind {kind!r} (expected 'model' or 'checkpoint')")
    name = document.get("estimator")
    cls = estimator_class(name)
    if cls is None:
        raise ModelFileError(
            f"{where} holds an estimator of class {name!r}, which this emdask does not know "
            f"(known: {known_estimators()}); a class defined outside emdask must be registered "
            "with emdask.register_estimator before loading"
        )
    est = new_estimator(cls, document, where, file)
    if kind == "model":
        _read_model(est, document, file, limit)
    else:
        load_best(est, document, file, limit)
    try:
        est._check_starting_values()
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ModelFileError(f"{file.json}: {err} (an argument of the model); {file.remedy}") from None
    return est


def _read_model(est, document, file, limit):
    """Give ``est`` the fitted state of the saved model ``document``."""
    cls = type(est)
    fitted = document.get("fitted")
    if not isinstance(fitted, dict):
        raise file.error("fitted", "is missing or not an object")
    raw = document.get("fitted_meta", {})
    if not isinstance(raw, dict):
        raise file.error("fitted_meta", "must be an object")
    history = document.get("history")
    try:
        check_declared(cls, fitted, [n for n in cls._common_fitted if n != "lower_bounds_"], "fitted")
        for name in REQUIRED:
            if name not in fitted:
                raise StateError(name, "is missing from fitted")
        meta = decode_meta(fitted, file)
        check_declared(cls, raw, cls._fitted_meta, "fitted_meta")
        meta.update(decode_meta(raw, file))
        if not isinstance(history, dict):
            raise StateError("history", "is missing or not an object")
        meta["lower_bounds_"] = check_lower_bounds(history.get("lower_bounds", []), "history.lower_bounds")
        expected = state_rules(est, meta)
        check_entries(cls, document["arrays"]["entries"], expected, {}, file)
        arrays = read_arrays(file, document, limit)
        est._set_state(arrays, meta)
    except StateError as err:
        raise file_error(file, err) from None
    return est
