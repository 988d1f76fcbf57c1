"""Turning user input into blocks of float64 numpy arrays, one per partition.

Accepted input: numpy array, pandas DataFrame, dask DataFrame or dask array. The chosen
columns are converted once per partition to a float64 array (NaN marks a missing cell)
and, when they fit in the cluster's memory, persisted so that EM iterations never convert or
read again. Otherwise every iteration re-reads the source partitions (column projection is
pushed down to Parquet by dask), and the fit needs no more than a few partitions per worker.

Per-row results (``predict`` and friends) are computed partition by partition with the same
index, lazily when the input was lazy.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import threading
import time
import uuid
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial, reduce

import numpy as np
from scipy import sparse
import pandas as pd

from threadpoolctl import threadpool_limits

import dask
import dask.local
import dask.system
import dask.threaded
import dask.array as da
import dask.dataframe as dd

from ..exceptions import WorkersPaused
from . import columns as column_rules
from .resident import Residents, chunk_group, resident_passes, scheduler_workers

__all__ = [
    "BlockData",
    "DataSummary",
    "prepare",
    "map_rows",
    "map_fill",
    "partition_starts",
    "select_columns",
    "current_client",
]

#: In-memory inputs are cut into blocks of about this many bytes.
TARGET_BLOCK_BYTES = 16 * 2**20
#: Persist when the blocks take at most this fraction of the memory available to the workers.
PERSIST_FRACTION = 0.5
#: Times a pass is redone after losing in-memory blocks with a worker (they are sent again).
MAX_RESENDS = 3
#: Seconds a pass may wait while every worker is paused at its memory limit before it is
#: stopped with :class:`~emdask.exceptions.WorkersPaused` (Dask setting
#: ``emdask.paused-timeout``, environment variable ``DASK_EMDASK__PAUSED_TIMEOUT``).
PAUSED_TIMEOUT = 120.0
#: How often a waiting pass looks at the workers' state.
_WATCH_INTERVAL = 2.0
#: Passes over persisted blocks between two looks at which worker holds which block.
PLACEMENT_PASSES = 10
#: Up to this many persisted blocks, a pass runs a task per worker thread (over the blocks
#: its worker holds) and every block's statistics come back to be reduced in this process;
#: more blocks keep a task each and a tree of reduction tasks.
GROUP_MAX_BLOCKS = 512


def current_client():
    """The ``distributed.Client`` that dask computations go to now, else ``None``.

    Follows dask's own choice: a default client, or a client's ``get`` set as the scheduler;
    ``dask.config.set(scheduler='synchronous')`` (or threads) means no client.
    """
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    return owner if isinstance(owner, Client) else None


# --------------------------------------------------------------------------------------
# Column selection and conversion
# --------------------------------------------------------------------------------------


def select_columns(dtypes, columns=None, *, what="numeric"):
    """Names of the columns to model, checked against a frame's ``dtypes``.

    With ``columns=None`` every numeric (or boolean) column is taken. A text column named in
    ``columns`` is read as numbers stored as text (see :mod:`emdask.engine.columns`): every
    value is parsed when the column is converted, and one that is not a number is an error
    naming the column and the value.
    """
    names = list(dtypes.index)
    if columns is None:
        chosen = [c for c in names if column_rules.is_numeric(dtypes[c])]
        if not chosen:
            raise TypeError(
                f"the table has no {what} column (columns: {names}); pass columns= or "
                "encode the columns as numbers"
            )
        return chosen
    if isinstance(columns, (str, int)):
        columns = [columns]
    chosen = list(columns)
    absent = [c for c in chosen if c not in dtypes.index]
    if absent:
        raise KeyError(f"column(s) {absent} not in the table; available columns: {names}")
    bad = [
        c for c in chosen
        if not column_rules.is_numeric(dtypes[c]) and not column_rules.is_text_dtype(dtypes[c])
    ]
    if bad:
        raise TypeError(
            f"column(s) {bad} are not numeric ({', '.join(str(dtypes[c]) for c in bad)}); "
            "encode them as numbers, leave them out of columns=, or model them with "
            "CategoricalMixture or MixedMixture"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"columns= names a column twice: {chosen}")
    return chosen


def frame_to_float(df, columns, *, any_order=False):
    """The chosen columns of a pandas frame as a float64 array: C-contiguous, or with
    ``any_order`` in whichever contiguous layout pandas gives without a copy (a frame of
    float64 columns hands over its column-major block as it is). Text columns are parsed as
    numbers (:func:`emdask.engine.columns.to_float`)."""
    text = [c for c in columns if column_rules.is_text_dtype(df[c].dtype)]
    if text:
        # the layout a frame of float64 columns would give, so results match to the bit
        out = np.empty((len(df), len(columns)), order="F" if any_order else "C")
        for j, c in enumerate(columns):
            out[:, j] = column_rules.to_float(df[c], c)
        return out
    out = df[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    if any_order and (out.flags.c_contiguous or out.flags.f_contiguous):
        return out
    return np.ascontiguousarray(out)


def _array_to_float(a):
    a = np.asarray(a)
    if a.dtype != np.float64:
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def check_2d(X, name="X", *, allow_object=False):
    """``X`` as a 2-D numpy array of real values, or a clear error: sparse matrices and
    complex numbers are refused; an object array of numbers is converted to float64 (kept
    as it is with ``allow_object``: labels of categorical columns)."""
    if sparse.issparse(X):
        raise TypeError(
            f"{name} is a sparse matrix ({type(X).__name__}); sparse input is not supported: "
            "pass X.toarray() (NaN marks a missing cell, so an implicit 0 is not missing)"
        )
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (rows × columns), got shape {X.shape}. Reshape your data "
            "with X.reshape(-1, 1) for a single column or X.reshape(1, -1) for a single row"
        )
    if np.iscomplexobj(X):
        raise ValueError(f"Complex data not supported: {name} has dtype {X.dtype}")
    if X.dtype == object and allow_object:
        if any(isinstance(v, complex) for v in X.flat):
            raise ValueError(f"Complex data not supported: {name} holds complex numbers")
        return X
    if X.dtype == object:
        try:
            X = X.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"{name} has dtype object and a value that is not a number ({exc}); convert "
                "it, or model text columns of a DataFrame with CategoricalMixture or "
                "MixedMixture"
            ) from None
    if not allow_object and not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise TypeError(f"{name} has dtype {X.dtype}; only real numeric arrays can be fitted")
    return X


def _check_numpy(X, name="X"):
    return check_2d(X, name)


def reject_infinite(block, names):
    """``block`` unchanged, or a ValueError naming the columns holding ``±inf`` (per-row
    methods: a missing cell is NaN, an infinite one is an error as in ``fit``)."""
    bad = np.isinf(block).any(axis=0)
    if bad.any():
        cols = [names[j] if names is not None else f"x{j}" for j in np.flatnonzero(bad)]
        raise ValueError(
            f"column(s) {cols} contain infinite values (inf); replace them with finite "
            "values or NaN (missing)"
        )
    return block


# --------------------------------------------------------------------------------------
# Summary of the data (one pass) and the checks made from it
# --------------------------------------------------------------------------------------


@dataclass
class DataSummary:
    """Column-wise facts gathered in one pass, before any model work."""

    n_rows: int
    lengths: tuple
    nan_count: np.ndarray
    inf_count: np.ndarray
    col_sum: np.ndarray
    col_min: np.ndarray
    col_max: np.ndarray
    n_empty_rows: int

    @property
    def col_mean(self):
        observed = self.n_rows - self.nan_count - self.inf_count
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(observed > 0, self.col_sum / np.maximum(observed, 1), 0.0)


def _summarize_block(block, index):
    finite = np.isfinite(block)
    nan = np.isnan(block)
    with np.errstate(invalid="ignore"):
        masked = np.where(finite, block, np.nan)
        if block.shape[0]:
            col_min = np.where(finite.any(0), np.nanmin(np.where(finite, block, np.inf), 0), np.inf)
            col_max = np.where(finite.any(0), np.nanmax(np.where(finite, block, -np.inf), 0), -np.inf)
        else:
            col_min = np.full(block.shape[1], np.inf)
            col_max = np.full(block.shape[1], -np.inf)
    return {
        "lengths": ((index, block.shape[0]),),
        "nan": nan.sum(0),
        "inf": (~finite & ~nan).sum(0),
        "sum": np.nansum(masked, axis=0),
        "min": col_min,
        "max": col_max,
        "empty_rows": int(nan.all(axis=1).sum()) if block.shape[1] else block.shape[0],
    }


def _combine_summaries(*parts):
    return {
        "lengths": sum((p["lengths"] for p in parts), ()),
        "nan": sum(p["nan"] for p in parts),
        "inf": sum(p["inf"] for p in parts),
        "sum": sum(p["sum"] for p in parts),
        "min": reduce(np.minimum, (p["min"] for p in parts)),
        "max": reduce(np.maximum, (p["max"] for p in parts)),
        "empty_rows": sum(p["empty_rows"] for p in parts),
    }


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


def one_blas_thread(func):
    """Run ``func`` with BLAS held to one thread in this process.

    emdask's matrix products are small (d x d factors, row chunks that fit in cache) and
    its parallelism comes from Dask; BLAS threads on top oversubscribe the cores and make
    such products many times slower, most of all on a busy machine.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _one_blas_thread():
            return func(*args, **kwargs)

    return wrapper


_blas_held = 0  # how many calls in this process hold BLAS to one thread now
_blas_lock = threading.Lock()


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS held to one thread in this process while in the block. Inside a call that holds
    it already (a fit holds it for all of its passes) this costs nothing: looking up the
    process's BLAS libraries takes about half a millisecond, more than a pass over a small
    table."""
    global _blas_held
    with _blas_lock:
        held = _blas_held > 0
        _blas_held += 1
    try:
        if held:
            yield
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        with _blas_lock:
            _blas_held -= 1


def _compute(value, keep=None):
    """Compute on the current scheduler (``keep``: a list that holds the cluster's futures
    of the result until the next call, see :func:`_compute_watched`). Without a distributed
    cluster, dask's threads already use every core, so BLAS is held to one thread for the
    pass: its own threads would oversubscribe the cores and make the small per-chunk
    products many times slower. (Dask workers start with one BLAS thread each already.)"""
    client = current_client()
    if client is not None:
        return _compute_watched(client, value, keep)
    with _one_blas_thread():
        return value.compute()


_local_pools = {}  # thread pools of passes over blocks held in this process, by size
_local_pool_lock = threading.Lock()


def _local_threads():
    """Threads for a pass over blocks held in this process, as Dask's local scheduler
    would use (``None``: a scheduler that is not one of its threads or the synchronous
    one, which the pass then goes through)."""
    scheduler = dask.base.get_scheduler()
    if scheduler is None or scheduler is dask.threaded.get:
        return int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT)
    if scheduler is dask.local.get_sync:
        return 1
    return None


def _local_map(chunk, values, shared, threads):
    """``[chunk(value, index, *shared) ...]`` over blocks held in this process, on up to
    ``threads`` threads (the kernels release the GIL), the first error raised."""
    if threads <= 1 or len(values) <= 1:
        return [chunk(v, i, *shared) for i, v in enumerate(values)]
    with _local_pool_lock:
        pool = _local_pools.get(threads)
        if pool is None:
            pool = _local_pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="emdask-pass")
    futures = [pool.submit(chunk, v, i, *shared) for i, v in enumerate(values)]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()


def _compute_watched(client, value, keep=None):
    """``value.compute()`` on a cluster, stopped with a clear error if every worker stays
    paused (process memory above Dask's pause threshold) for ``emdask.paused-timeout``
    seconds: Dask would otherwise wait for ever for a worker to free memory."""
    many = isinstance(value, list)
    futures = client.compute(value) if many else [client.compute(value)]
    results = _gather_watched(client, futures, keep)
    return results if many else results[0]


def _gather_watched(client, futures, keep=None):
    """The results of ``futures`` (a list), with the watch of :func:`_compute_watched`.

    The results (a pass's statistics: small) are fetched in one request once every future
    is done, or at once from a future that failed: each fetch is a round trip through the
    scheduler, and fetching the first result while the others compute gains nothing (the
    last fetch comes after the last task whichever way), while two fetches of tasks that end
    close together cost two round trips in a row."""
    from distributed import TimeoutError as DaskTimeoutError
    from distributed import wait

    limit = float(dask.config.get("emdask.paused-timeout", PAUSED_TIMEOUT))
    # The previous pass's results are released only now, after this pass was submitted:
    # the client batches its messages to the scheduler, and a release sent just before
    # would hold this pass's submission back until the batch interval (10 ms) has passed.
    if keep is not None:
        keep[:] = futures
    running = list(futures)
    paused_since = None
    try:
        while running:
            try:
                done = wait(running, timeout=_WATCH_INTERVAL, return_when="FIRST_COMPLETED").done
            except (DaskTimeoutError, TimeoutError):
                done = ()
            if done:
                paused_since = None
                failed = [f for f in done if f.status != "finished"]
                if failed:
                    client.gather(failed)  # raises the task's error
                running = [f for f in running if f not in done]
                continue
            paused = _paused_workers(client)
            if paused is None:
                paused_since = None
                continue
            now = time.monotonic()
            paused_since = paused_since or now
            if now - paused_since >= limit:
                raise WorkersPaused(
                    f"every Dask worker has been paused for {now - paused_since:.0f} s at its "
                    f"memory limit ({paused}), so the pass cannot go on: give the workers more "
                    "memory (memory_limit=, or fewer threads per worker), use more "
                    "partitions, or raise distributed.worker.memory.pause if the memory is "
                    "not the data's"
                )
        return client.gather(list(futures))
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)


def _paused_workers(client):
    """``"addr: used of limit, ..."`` when every worker is paused, else ``None``."""
    try:
        workers = scheduler_workers(client)
    except Exception:  # the scheduler is unreachable: the pass itself will say so
        return None
    if not workers or any(w.get("status") != "paused" for w in workers.values()):
        return None
    return ", ".join(
        f"{address}: {_mib(w.get('metrics', {}).get('memory', 0))} of "
        f"{_mib(w.get('memory_limit', 0))}"
        for address, w in sorted(workers.items())
    )


def _mib(n):
    return f"{int(n) >> 20} MiB"


#: Arguments of a pass up to this size (their arrays) travel inside each block's task; larger
#: ones become one task of their own that the block tasks depend on.
INLINE_ARGS_BYTES = 256 * 1024


def _nbytes(obj, depth=0):
    """Bytes of the arrays in ``obj`` (containers and objects' attributes, a few levels
    deep), about what it costs to send."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if depth > 6:
        return 0
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_nbytes(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x, depth + 1) for x in obj.values())
    attributes = getattr(obj, "__dict__", None)
    if attributes is not None and not callable(obj):
        return sum(_nbytes(x, depth + 1) for x in attributes.values())
    slots = getattr(type(obj), "__slots__", ())
    if slots and not callable(obj):
        return sum(_nbytes(getattr(obj, name, None), depth + 1) for name in slots)
    return 0


def _pass_args(args):
    """A pass's arguments as its block tasks take them. Small ones (the parameters) are
    bound into each task: a task of their own would cost a pass one more scheduler round
    trip and a transfer between workers before any block starts. Large ones are held once,
    by a task of their own that the block tasks depend on."""
    if _nbytes(args) <= INLINE_ARGS_BYTES:
        return tuple(args)
    return tuple(dask.delayed(a, traverse=False) for a in args)


def _group_task(chunk, shared):
    """``task(indices, blocks)`` -> the delayed tuple of ``chunk(block, index, *shared)``
    over the blocks, in one task (``shared``: from :func:`_pass_args`)."""
    call = dask.delayed(chunk_group, pure=False)
    name = getattr(chunk, "__name__", "chunk")  # keys read like a task per block's

    def task(indices, blocks):
        return call(chunk, tuple(indices), blocks, shared,
                    dask_key_name=f"{name}-{uuid.uuid4().hex}")

    return task


def _block_future(block):
    """The cluster's future of a persisted block (a future, or a persisted delayed value),
    or ``None``."""
    from distributed import Future, futures_of

    if isinstance(block, Future):
        return block
    found = [f for f in futures_of(block) if f.key == block.key]
    return found[0] if found else None


def _submit_groups(chunk, shared, groups, blocks, keep):
    """The results of :func:`_group_task`'s tasks over persisted blocks, the tasks handed
    to the cluster directly, in one submission (no graph to build and optimise: that is
    most of what the client spends on a pass), or ``None`` when some argument is a lazy
    value or some block has no future (then the caller builds the graph)."""
    client = current_client()
    if client is None or any(dask.is_dask_collection(a) for a in shared):
        return None
    futures = [_block_future(b) for b in blocks]
    if any(f is None for f in futures):
        return None
    name = getattr(chunk, "__name__", "chunk")  # keys read like a task per block's
    tasks = client.map(
        chunk_group, [chunk] * len(groups), [tuple(g) for g in groups],
        [[futures[i] for i in g] for g in groups], [shared] * len(groups),
        key=[f"{name}-{uuid.uuid4().hex}" for _ in groups], pure=False,
    )
    return _gather_watched(client, tasks, keep)


def _tree_reduce(combine, split_every, groups, *parts):
    """The per-block results of every group, reduced by the same tree of ``combine`` calls
    (fan-in ``split_every``, in block order) as a graph with a task per block: the result
    is the same to the last bit whichever worker held which block."""
    level = [None] * sum(len(g) for g in groups)
    for indices, results in zip(groups, parts):
        for index, result in zip(indices, results):
            level[index] = result
    return _reduce_tree(level, split_every, lambda *node: reduce(combine, node))


def _reduce_tree(level, split_every, node):
    """``level`` reduced by a tree of ``node(*parts)`` calls with fan-in ``split_every``, in
    order: the same tree whether the nodes are Dask tasks or run here."""
    while len(level) > 1:
        level = [node(*level[i : i + split_every]) for i in range(0, len(level), split_every)]
    return level[0]


def _combine_with(combine, *parts):
    return reduce(combine, parts)


class BlockData:
    """A table as a list of lazy (or persisted) float64 blocks, with its summary.

    Attributes
    ----------
    blocks : list
        One ``dask.delayed`` value (or future) per partition, computing an
        ndarray of shape (rows_in_partition, n_features).
    feature_names : list of str
    has_names : bool
        Whether the column names came from the input (a frame) rather than positions.
    summary : DataSummary
    persisted : bool
    """

    def __init__(self, blocks, feature_names, has_names, split_every=8):
        self.blocks = list(blocks)
        self.feature_names = list(feature_names)
        self.has_names = has_names
        self.split_every = int(split_every)
        self.summary = None
        self.persisted = False
        self.n_passes = 0
        self._scattered_from = None  # in-memory arrays sent to the workers, kept to resend
        # (client, valid until pass, groups of blocks by holder, the worker taking each group)
        self._placement = None
        self._last_results = []  # futures of the last pass, released after the next starts
        self._residents = None  # the resident helpers of persisted blocks (see resident.py)
        self._residents_after = 0  # no helpers made before this pass (after a failure)
        self._values = None  # the blocks' arrays, when persisted in this process

    @property
    def n_features(self):
        return len(self.feature_names)

    @property
    def n_rows(self):
        return self.summary.n_rows

    @property
    def npartitions(self):
        return len(self.blocks)

    @property
    def row_starts(self):
        """Global position of every block's first row (known after the summary pass)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.summary.lengths[:-1]))

    def map_reduce(self, chunk, *args, combine=operator.add, split_every=None):
        """``combine``-reduce ``chunk(block, block_index, *args)`` over all blocks.

        One Dask graph: a task per block, a tree of ``combine`` tasks with fan-in
        ``split_every``, and one small result brought back to the client. ``args`` travel
        inside the graph (they should be small: parameters, not data).

        Over blocks persisted on a cluster (up to :data:`GROUP_MAX_BLOCKS`), a pass is asked
        of a resident helper on each worker holding blocks (see
        :mod:`emdask.engine.resident`): one request per worker, each worker's blocks worked
        on by its task threads. Where that cannot be (turned off, a worker paused or lost),
        it runs a task per worker thread instead, each over the blocks its worker holds,
        handed to the cluster in one submission without a graph (see
        :func:`_submit_groups`), their per-block results fetched in one request once every
        task is done. Either way the per-block results are reduced here by the same tree:
        the same result to the last bit. Without a cluster, over blocks held in this
        process, ``chunk`` is called on each block directly on Dask's threads (see
        :meth:`_local_pass`), and the results are reduced by that tree too.
        """
        split_every = split_every or self.split_every
        if split_every < 2:
            raise ValueError(f"split_every must be at least 2, got {split_every}")
        result = self._local_pass(chunk, args, combine, split_every)
        if result is not None:
            self.n_passes += 1
            return result[0]
        call = dask.delayed(chunk, pure=False)
        shared = _pass_args(args)
        combine_task = partial(dask.delayed(_combine_with), combine)
        for attempt in range(MAX_RESENDS + 1):
            groups = self._groups_by_holder()
            try:
                if groups is None:
                    blocks = [call(b, i, *shared) for i, b in enumerate(self.blocks)]
                    root = _reduce_tree(blocks, split_every, combine_task)
                    # blocks read at each pass: reading, conversion and statistics of a
                    # block fused into one task (a chain of three tasks per block otherwise)
                    with dask.config.set({"optimization.fuse.delayed": not self.persisted}):
                        result = _compute(root, self._last_results)
                else:  # a few small results: reduced here, without one more task hop
                    parts = self._resident_pass(chunk, shared, groups)
                    if parts is None:
                        parts = _submit_groups(chunk, shared, groups, self.blocks,
                                               self._last_results)
                    if parts is None:
                        group_task = _group_task(chunk, shared)
                        tasks = [group_task(g, [self.blocks[i] for i in g]) for g in groups]
                        parts = _compute(tasks, self._last_results)
                    result = _tree_reduce(combine, split_every, groups, *parts)
                break
            except CancelledError:
                # A worker holding blocks scattered from this process died: Dask cannot
                # recompute them (it has no recipe), so send them again and redo the pass.
                if attempt == MAX_RESENDS or not self._resend_lost_blocks():
                    raise
        self.n_passes += 1
        return result

    def _local_pass(self, chunk, args, combine, split_every):
        """``(result,)`` of a pass over blocks persisted in this process, run here without a
        graph (building and scheduling one costs a millisecond or more per pass, many times
        a pass over a small table), or ``None`` when the pass goes through Dask: a cluster is
        in use, some argument is a lazy value, or the scheduler is neither Dask's threads
        nor its synchronous one. The blocks are reduced by the same tree as the graph's."""
        if self._values is None or current_client() is not None:
            return None
        if any(dask.is_dask_collection(a) for a in args):
            return None
        threads = _local_threads()
        if threads is None:
            return None
        with _one_blas_thread():
            parts = _local_map(chunk, self._values, args, threads)
        return (_reduce_tree(parts, split_every, lambda *node: reduce(combine, node)),)

    def _resident_pass(self, chunk, shared, groups):
        """The per-group results of a pass asked of the blocks' resident helpers (made at
        the first pass over these groups; see :mod:`emdask.engine.resident`), or ``None``
        when the pass is to run as tasks: resident passes turned off, an argument too large
        to travel with the request, a worker paused or lost."""
        if not resident_passes() or any(dask.is_dask_collection(a) for a in shared):
            return None
        residents = self._residents
        if residents is None or residents.groups != groups:
            if self.n_passes < self._residents_after:
                return None
            futures = [_block_future(b) for b in self.blocks]
            if any(f is None for f in futures):
                return None
            from distributed import TimeoutError as DaskTimeoutError

            self._residents = None  # the former helpers are released with their handles
            try:
                workers = self._placement[3]  # the placement these groups come from
                residents = Residents(current_client(), futures, groups, workers)
            except (LookupError, OSError, CancelledError, TimeoutError, DaskTimeoutError):
                # tasks meanwhile; tried again after the next look at where the blocks are
                self._placement = None
                self._residents_after = self.n_passes + PLACEMENT_PASSES
                return None
            self._residents = residents
        parts = residents.run(chunk, shared)
        if residents.lost:
            self._residents = self._placement = None
        elif parts is not None:
            self._last_results[:] = []  # the last task pass's results, if any, are done with
        return parts

    def _groups_by_holder(self):
        """Block indices grouped by the worker thread that holds them in memory, or
        ``None`` to give every block a task of its own.

        A pass over persisted blocks then runs one task per worker thread, each over the
        blocks its worker holds, instead of one task per block: the scheduler places each
        group where its blocks are (it moves no data), and a pass costs a handful of task
        round trips instead of one per block. Blocks read from their source at each pass
        keep a task each (Dask balances those across workers as they finish)."""
        client = current_client()
        if not self.persisted or client is None or len(self.blocks) <= 1:
            return None
        # placement changes only when workers come and go: asked again every few passes
        # (and after blocks were sent again), not at every pass
        cached = self._placement
        if cached is not None and cached[0] is client and self.n_passes < cached[1]:
            return cached[2]
        groups, workers, settled = self._find_groups(client)
        if settled:  # else ask again at the next pass (blocks still being computed)
            self._placement = (client, self.n_passes + PLACEMENT_PASSES, groups, workers)
        return groups

    def _find_groups(self, client):
        """``(groups or None, the worker taking each group, whether the answer holds for
        the next passes)``."""
        if len(self.blocks) > GROUP_MAX_BLOCKS:
            return None, None, True
        try:
            holders = client.who_has(self.blocks)
            threads = client.nthreads()
        except Exception:  # placement is an optimisation: without it, one task per block
            return None, None, False
        where = []
        for b in self.blocks:
            on = sorted(w for w in holders.get(b.key, ()) if w in threads)
            if not on:  # not in memory (yet): Dask computes, recomputes or resends it
                return None, None, False
            where.append(on)
        # a block held by several workers (a copy Dask made) goes to the one with the fewest
        # blocks so far, per thread, after the blocks held once: no worker left idle
        load = {w: 0 for on in where for w in on}
        owner = {}
        for i in sorted(range(len(where)), key=lambda i: len(where[i])):
            owner[i] = min(where[i], key=lambda w: (load[w] / max(1, int(threads[w])), w))
            load[owner[i]] += 1
        by_worker = {}
        for i in range(len(where)):
            by_worker.setdefault(owner[i], []).append(i)
        groups = []
        for worker, indices in by_worker.items():
            n = max(1, min(int(threads[worker]), len(indices)))
            groups += [indices[j::n] for j in range(n)]
        if len(groups) >= len(self.blocks):
            return None, None, True
        groups.sort()
        return groups, [owner[g[0]] for g in groups], True

    def _resend_lost_blocks(self):
        """Scatter again the in-memory blocks whose only copy was lost; whether any was."""
        client = current_client()
        if self._scattered_from is None or client is None:
            return False
        lost = [i for i, b in enumerate(self.blocks) if b.status != "finished"]
        if not lost:  # the client may not have heard yet: ask the scheduler
            try:
                holders = client.who_has(self.blocks)
            except CancelledError:
                holders = {}
            lost = [i for i, b in enumerate(self.blocks) if not holders.get(b.key)]
        if not lost:
            return False
        self._placement = self._residents = None  # the helpers knew the lost blocks' keys
        again = client.scatter([self._scattered_from[i] for i in lost], hash=False)
        for i, future in zip(lost, again):
            self.blocks[i] = future
        return True

    def summarize(self):
        s = self.map_reduce(_summarize_block, combine=_combine_summaries)
        lengths = tuple(n for _, n in sorted(s["lengths"]))
        self.summary = DataSummary(
            n_rows=int(sum(lengths)),
            lengths=lengths,
            nan_count=s["nan"],
            inf_count=s["inf"],
            col_sum=s["sum"],
            col_min=s["min"],
            col_max=s["max"],
            n_empty_rows=s["empty_rows"],
        )
        return self.summary

    def persist(self):
        """Keep the converted blocks in the cluster's (or this process's) memory."""
        client = current_client()
        self._placement = None
        if client is not None:
            if all(dask.is_dask_collection(b) for b in self.blocks):
                self.blocks = client.persist(self.blocks)
            else:  # in-memory arrays: ship them to the workers once
                # hash=False: keys of their own. Content-hashed keys would be shared with a
                # table of the same values fitted just before, whose release may reach the
                # scheduler after this scatter and take the blocks away from under it.
                self._scattered_from = list(self.blocks)
                self.blocks = client.scatter(self.blocks, hash=False)
        else:
            self._hold(dask.compute(*self.blocks))
        self.persisted = True

    def _hold(self, arrays):
        """Keep ``arrays`` (one per block) in this process as the blocks."""
        self._values = list(arrays)
        self.blocks = [dask.delayed(a, name=f"block-{uuid.uuid4().hex}") for a in self._values]

    def check(self, *, allow_nan):
        """Clear errors for an empty table, infinite values, all-missing columns and (when
        the model cannot take them) missing values, each naming the column."""
        s = self.summary
        names = self.feature_names
        if s.n_rows == 0:
            raise ValueError("the table is empty (0 rows); nothing to fit")
        if self.n_features == 0:
            raise ValueError(
                f"no column to fit: X has 0 feature(s) (shape=({s.n_rows}, 0)) while a "
                "minimum of 1 is required."
            )
        inf = [names[j] for j in np.flatnonzero(s.inf_count)]
        if inf:
            raise ValueError(
                f"column(s) {inf} contain infinite values; replace them with finite "
                "values or NaN (missing) before fitting"
            )
        column_rules.check_range(names, s.col_min, s.col_max)
        empty = [names[j] for j in np.flatnonzero(s.nan_count == s.n_rows)]
        if empty:
            raise ValueError(
                f"column(s) {empty} have no observed value; drop them from the columns to fit"
            )
        if not allow_nan and s.nan_count.any():
            bad = {names[j]: int(s.nan_count[j]) for j in np.flatnonzero(s.nan_count)}
            raise ValueError(
                f"missing values (NaN) in column(s) {bad} (column: count); this model needs "
                "complete rows: drop or impute them first"
            )

    def constant_columns(self):
        s = self.summary
        return [self.feature_names[j] for j in np.flatnonzero(s.col_min == s.col_max)]


def _available_memory():
    client = current_client()
    if client is not None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return sum(w.get("memory_limit") or 0 for w in workers)
    import psutil

    return psutil.virtual_memory().available


def _n_blocks(n_rows, n_features):
    nbytes = n_rows * max(n_features, 1) * 8
    by_size = math.ceil(nbytes / TARGET_BLOCK_BYTES)
    by_cores = min(os.cpu_count() or 1, max(1, n_rows // 4096))
    return max(1, by_size, by_cores)


def _numpy_blocks(X, npartitions):
    n = X.shape[0]
    n_blocks = npartitions or _n_blocks(n, X.shape[1])
    n_blocks = max(1, min(n_blocks, n)) if n else 1
    bounds = np.linspace(0, n, n_blocks + 1).astype(int)
    return [X[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def prepare(X, columns=None, *, allow_nan=True, persist="auto", npartitions=None, split_every=8):
    """Blocks of the chosen columns, summarized and checked, ready for EM.

    Parameters
    ----------
    X : ndarray, pandas.DataFrame, dask DataFrame or dask Array of shape (n_rows, n_features)
    columns : list of str, optional
        Columns of a frame to use; default: every numeric column.
    allow_nan : bool
        Whether the model handles missing cells.
    persist : {'auto', True, False}
        Keep the converted blocks in memory. ``'auto'`` persists when they take at most half
        of the memory available to the workers (or to this process without a cluster).
    npartitions : int, optional
        Number of blocks for in-memory input (default: about 16 MiB each, at least one per
        core for large inputs). Dask input keeps its partitions.
    split_every : int
        Fan-in of the tree reduction.
    """
    if persist not in ("auto", True, False):
        raise ValueError(f"persist={persist!r} must be 'auto', True or False")
    in_memory = False
    if isinstance(X, dd.DataFrame):
        cols = select_columns(X.dtypes, columns)
        frame = X[cols]
        to_float = partial(frame_to_float, any_order=True)
        blocks = [dask.delayed(to_float)(p, cols) for p in frame.to_delayed()]
        names, has_names = [str(c) for c in cols], True
    elif isinstance(X, da.Array):
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (rows × columns), got shape {X.shape}")
        _check_numpy(np.empty((0, 0), dtype=X.dtype))
        if columns is not None:
            raise ValueError("columns= selects columns of a DataFrame; slice the array instead")
        arr = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X
        blocks = [dask.delayed(_array_to_float)(b) for b in arr.to_delayed().ravel()]
        names, has_names = [f"x{j}" for j in range(X.shape[1])], False
    elif isinstance(X, pd.DataFrame):
        cols = select_columns(X.dtypes, columns)
        arr = frame_to_float(X, cols)
        blocks = _numpy_blocks(arr, npartitions)
        names, has_names, in_memory = [str(c) for c in cols], True, True
    else:
        if isinstance(X, (pd.Series, dd.Series)):
            raise TypeError("X is a Series; pass a DataFrame (e.g. s.to_frame()) instead")
        if columns is not None:
            raise ValueError("columns= selects columns of a DataFrame; slice the array instead")
        arr = _array_to_float(_check_numpy(X))
        blocks = _numpy_blocks(arr, npartitions)
        names, has_names, in_memory = [f"x{j}" for j in range(arr.shape[1])], False, True

    data = BlockData(blocks, names, has_names, split_every=split_every)
    if in_memory:
        if persist is not False and current_client() is not None:
            data.persist()  # ship the blocks to the workers once
        else:
            data._hold(blocks)
            data.persisted = True
        data.summarize()
    else:
        data.summarize()
        nbytes = data.n_rows * data.n_features * 8
        if persist is True or (
            persist == "auto" and nbytes <= PERSIST_FRACTION * _available_memory()
        ):
            data.persist()
    data.check(allow_nan=allow_nan)
    return data


# --------------------------------------------------------------------------------------
# Per-row results
# --------------------------------------------------------------------------------------


def _apply_frame(part, columns, fn, out_columns):
    out = fn(frame_to_float(part, columns))
    if out.ndim == 1:
        return pd.Series(out, index=part.index)
    return pd.DataFrame(out, index=part.index, columns=out_columns)


def map_rows(X, columns, fn, *, n_out=None, dtype=np.float64, out_columns=None):
    """Apply ``fn`` (float64 block -> per-row array) to every row of ``X``.

    numpy or pandas input gives a numpy array; a dask DataFrame gives a dask Series
    (``n_out=None``) or DataFrame aligned with the input's index and divisions; a dask
    array gives a dask array with the input's row chunks. Nothing is computed for lazy
    input.

    Parameters
    ----------
    columns : list or None
        Columns of a frame to take (``None`` for arrays).
    n_out : int or None
        ``None`` when ``fn`` returns one value per row, else the width of its output.
    """
    if isinstance(X, dd.DataFrame):
        missing = [c for c in columns if c not in X.columns]
        if missing:
            raise KeyError(f"column(s) {missing} seen during fit are not in X")
        if n_out is None:
            meta = pd.Series(np.empty(0, dtype=dtype))
        else:
            out_columns = list(out_columns or range(n_out))
            meta = pd.DataFrame(np.empty((0, n_out), dtype=dtype), columns=out_columns)
        return X[columns].map_partitions(_apply_frame, columns, fn, out_columns, meta=meta)
    if isinstance(X, da.Array):
        arr = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X
        def block_fn(b):
            return fn(_array_to_float(b)).astype(dtype, copy=False)
        if n_out is None:
            return arr.map_blocks(block_fn, drop_axis=1, dtype=dtype)
        return arr.map_blocks(block_fn, chunks=(arr.chunks[0], (n_out,)), dtype=dtype)
    if isinstance(X, pd.DataFrame):
        missing = [c for c in columns if c not in X.columns]
        if missing:
            raise KeyError(f"column(s) {missing} seen during fit are not in X")
        return fn(frame_to_float(X, columns)).astype(dtype, copy=False)
    return fn(_array_to_float(_check_numpy(X))).astype(dtype, copy=False)


def _fill_frame(part, columns, fn, partition_info=None):
    block = frame_to_float(part, columns)
    filled = fn(block, partition_info["number"] if partition_info else 0)
    out = part.copy()
    for j, col in enumerate(columns):
        mask = np.isnan(block[:, j])
        if mask.any():
            out[col] = column_rules.restore(part[col], mask, filled[mask, j])
        elif column_rules.is_text_dtype(part[col].dtype):
            out[col] = block[:, j]  # numbers stored as text come back parsed
    return out


def map_fill(X, columns, fn):
    """Apply ``fn(float_block, partition_number) -> float_block`` to the chosen columns of
    every partition and put the result back in place, keeping everything else.

    The output has the input's type: numpy in, numpy out; a pandas frame gives a copy with
    the same index, column order and untouched other columns; a dask DataFrame or array
    gives a lazy one with the same partitions. Modelled columns keep their dtype (integer
    fills rounded, boolean ones thresholded at 0.5); text columns of numbers come back parsed,
    as float64 (see :mod:`emdask.engine.columns`).
    """
    if isinstance(X, dd.DataFrame):
        missing = [c for c in columns if c not in X.columns]
        if missing:
            raise KeyError(f"column(s) {missing} seen during fit are not in X")
        meta = X._meta.copy()
        for col in columns:
            meta[col] = meta[col].astype(column_rules.filled_dtype(meta[col].dtype))
        return X.map_partitions(_fill_frame, columns, fn, meta=meta)
    if isinstance(X, da.Array):
        arr = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X

        def block_fn(b, block_info=None):
            number = block_info[0]["chunk-location"][0] if block_info else 0
            return fn(_array_to_float(b), number)

        return arr.map_blocks(block_fn, dtype=np.float64)
    if isinstance(X, pd.DataFrame):
        missing = [c for c in columns if c not in X.columns]
        if missing:
            raise KeyError(f"column(s) {missing} seen during fit are not in X")
        return _fill_frame(X, columns, fn)
    return fn(_array_to_float(_check_numpy(X)), 0)


def partition_starts(X):
    """Global position of the first row of every partition of ``X``, numbered as
    :func:`map_fill` numbers them (numpy and pandas input: one partition).

    A dask array with known chunk sizes needs no computation; a dask DataFrame (or an array
    with unknown chunk sizes) takes one pass counting the rows of each partition.
    """
    if isinstance(X, dd.DataFrame):
        lengths = [int(n) for n in X.map_partitions(len).compute()]
    elif isinstance(X, da.Array):
        lengths = list(X.chunks[0])
        if any(math.isnan(n) for n in lengths):
            counts = [dask.delayed(len)(b) for b in X.to_delayed()[:, 0]]
            lengths = [int(n) for n in dask.compute(*counts)]
    else:
        return (0,)
    return tuple(int(x) for x in np.cumsum([0] + lengths[:-1]))
