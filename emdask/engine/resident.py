"""Resident passes: the passes over a table's persisted blocks asked of one helper per
worker, which holds that worker's blocks for as long as the table is in use.

A pass run as tasks costs three trips through the scheduler besides the work itself: the
submission, the news that the tasks are done, and the fetch of their results (on two
cores, about 10 ms a pass, a tenth of a pass over a million rows). A resident helper is a
Dask actor (:class:`BlockRunner`) created once, on the worker that holds the blocks: each
pass is then one request to each worker, answered with the statistics.

The work of a pass still runs on the worker's task threads (at most one group of blocks per
thread, as the tasks would), the per-block results are reduced by the same tree as the
tasks', so the result is the same to the last bit. A pass goes through tasks instead when
a worker is paused at its memory limit (Dask's own pause then holds it back), when some
argument is too large to travel with the request, or when a worker holding a helper was
lost (the tasks recompute or resend its blocks); the helpers are made again at the next
look at where the blocks are.

Resident passes are not tasks: the dashboard's task stream does not show them. The Dask
setting ``emdask.resident-passes`` (environment variable ``DASK_EMDASK__RESIDENT_PASSES``)
set to false runs every pass as tasks.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import CancelledError
from functools import partial, update_wrapper

import dask

from ..families.base import block_memo

__all__ = ["BlockRunner", "Residents", "chunk_group", "resident_passes", "scheduler_workers"]

#: The Dask setting that turns resident passes on or off (on by default).
CONFIG_KEY = "emdask.resident-passes"
#: Seconds to wait for the helpers to start (a worker whose threads are all busy starts its
#: helper when one is free): past this, the passes run as tasks.
START_TIMEOUT = 10.0
#: While a pass waits, how often it looks whether the workers it asked are still there (a
#: request to a worker that left would go unanswered).
WATCH_INTERVAL = 2.0


def resident_passes():
    """Whether passes over persisted blocks go to resident helpers (the Dask setting
    :data:`CONFIG_KEY`, true unless set otherwise)."""
    value = dask.config.get(CONFIG_KEY, True)
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


#: Seconds a question to the scheduler about its workers may take.
ASK_TIMEOUT = 30.0


def scheduler_workers(client, timeout=ASK_TIMEOUT):
    """The scheduler's ``{address: info}`` of every worker (all of them, not a sample),
    asked now (not the client's cached copy, which stays as it was when the scheduler does
    not answer). Raises ``OSError`` or ``TimeoutError`` when no answer comes within
    ``timeout`` seconds."""
    try:
        info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=timeout)
    except TypeError:  # older distributed: no n_workers argument
        info = client.sync(client.scheduler.identity, callback_timeout=timeout)
    return info["workers"]


def chunk_group(chunk, indices, blocks, args):
    """``chunk(block, index, *args)`` for each block of a group, in order."""
    return tuple(chunk(block, index, *args) for index, block in zip(indices, blocks))


def _remembering(chunk, memos, block, index, *args):
    """``chunk(block, index, *args)`` with the block's memo set (see
    :data:`emdask.families.base.block_memo`)."""
    token = block_memo.set(memos[index])
    try:
        return chunk(block, index, *args)
    finally:
        block_memo.reset(token)


class BlockRunner:
    """Dask actor: the passes over the blocks one worker holds.

    The helper keeps the blocks' keys, not the arrays: at each pass it takes them from the
    worker's store (on the worker's event loop, where that store changes), so the blocks
    stay the worker's to spill, and the helper's task depends on none of them. It keeps a
    memo per block, in which the kernels keep what they derive from the block alone (a
    Gaussian block's missingness patterns: two integers per row, or nothing when no cell
    is missing) instead of deriving it again at every pass.

    Parameters
    ----------
    keys : dict
        Block index in the table -> the block's Dask key.
    """

    def __init__(self, keys):
        self.keys = dict(keys)
        # what kernels derive from each block alone, kept while the helper holds it
        self.memos = {i: {} for i in self.keys}

    async def run(self, chunk, groups, args):
        """``("done", [chunk_group(chunk, g, blocks of g, args) for g in groups])``, each
        group on one of the worker's task threads; ``("paused", None)`` when the worker is
        paused at its memory limit (the caller then runs the pass as tasks, which wait for
        the pause to end), ``("missing", None)`` when the worker no longer holds a block."""
        from distributed import get_worker
        from distributed.core import Status

        worker = get_worker()
        if worker.status == Status.paused:
            return "paused", None
        try:
            blocks = {i: worker.data[key] for g in groups for i in g for key in [self.keys[i]]}
        except KeyError:
            return "missing", None
        loop = asyncio.get_running_loop()
        executor = worker.executors["default"]
        # the chunk with its block's memo set, under the chunk's own name
        remembering = update_wrapper(partial(_remembering, chunk, self.memos), chunk)
        jobs = [
            loop.run_in_executor(executor, chunk_group, remembering, tuple(g),
                                 [blocks[i] for i in g], args)
            for g in groups
        ]
        return "done", list(await asyncio.gather(*jobs))


class Residents:
    """The resident helpers of a table's persisted blocks: one :class:`BlockRunner` per
    worker holding some of them.

    Raises ``TimeoutError`` when the helpers did not start within :data:`START_TIMEOUT`
    seconds, ``LookupError`` when ``client`` is not the default client (Dask binds a
    helper's handle to the default client).

    Parameters
    ----------
    client : distributed.Client
    futures : list of distributed.Future
        The table's blocks, in order.
    groups : list of list of int
        Block indices by worker thread (as ``BlockData._groups_by_holder`` finds them).
    workers : list of str
        The worker that holds each group's blocks and takes it (a helper that finds a block
        gone at a pass says so, and the pass runs as tasks).
    """

    def __init__(self, client, futures, groups, workers):
        from distributed import default_client

        try:
            default = default_client()
        except ValueError:
            default = None
        if default is not client:
            raise LookupError("resident passes go through the default client only")
        self.client = client
        self.groups = [list(g) for g in groups]
        self.lost = False  # whether a worker holding a helper was lost
        by_worker = {}  # worker -> positions of its groups in self.groups
        for position, worker in enumerate(workers):
            by_worker.setdefault(worker, []).append(position)
        pending = []  # (future of the helper, its worker, positions of its groups)
        for worker, positions in by_worker.items():
            keys = {i: futures[i].key for p in positions for i in self.groups[p]}
            future = client.submit(
                BlockRunner, keys, actor=True, workers=[worker], allow_other_workers=False,
                pure=False, key=f"emdask-blocks-{uuid.uuid4().hex}",
            )
            pending.append((future, worker, positions))
        try:
            self._runners = [(future.result(timeout=START_TIMEOUT), worker, positions)
                             for future, worker, positions in pending]
        except BaseException:
            client.cancel([future for future, _, _ in pending])
            raise

    def run(self, chunk, args):
        """The per-group results of a pass (in the order of ``groups``), or ``None`` when
        some worker is paused, was lost or no longer holds a block (then the pass is to run
        as tasks; :attr:`lost` tells the last two cases, after which the helpers are of no
        more use). An error of ``chunk`` itself is raised as it was raised on the worker."""
        calls = []
        for actor, worker, positions in self._runners:
            try:
                call = actor.run(chunk, [self.groups[p] for p in positions], args)
            except RuntimeError:  # the worker holding this helper was lost
                call = None
            calls.append((call, worker, positions))
        parts, refused, error = [None] * len(self.groups), False, None
        for call, worker, positions in calls:  # every call answered before acting on any
            try:
                status, results = self._answer(call, worker)
            except (OSError, CancelledError, LookupError):
                self.lost = True
                continue
            except Exception as exc:
                error = error or exc
                continue
            if status != "done":  # paused, or the block gone with its worker's memory
                self.lost = self.lost or status == "missing"
                refused = True
                continue
            for position, result in zip(positions, results):
                parts[position] = result
        if error is not None:
            raise error
        return None if self.lost or refused else parts

    def _answer(self, call, worker):
        """The answer to ``call``, a request to ``worker``; ``LookupError`` when the worker
        left the cluster before answering (Dask would leave the request waiting)."""
        from distributed import TimeoutError as DaskTimeoutError

        if call is None:
            raise LookupError(f"worker {worker} was lost")
        while True:
            try:
                return call.result(timeout=WATCH_INTERVAL)
            except (DaskTimeoutError, TimeoutError):
                pass
            try:
                present = worker in scheduler_workers(self.client)
            except (OSError, TimeoutError) as exc:  # tasks then, which report a lost scheduler
                raise LookupError(f"no answer from the scheduler about worker {worker}") from exc
            if not present:
                raise LookupError(f"worker {worker} was lost")
