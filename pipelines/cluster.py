"""The Dask cluster a flow run drives: an existing scheduler, or a local one for the run."""

from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["ADDRESS_ENV", "dask_client", "scheduler_address"]

#: Environment variable naming a Dask scheduler when the flow's parameter is not given.
ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
#: Local clusters listen on loopback only: a Dask scheduler runs any code sent to it.
LOOPBACK = "127.0.0.1"


def scheduler_address(dask_address=None):
    """The scheduler to use: the parameter, else ``$DASK_SCHEDULER_ADDRESS``, else None (local)."""
    address = (dask_address or os.environ.get(ADDRESS_ENV) or "").strip()
    return address or None


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local_client(n_workers=None):
    from distributed import Client, LocalCluster

    n_workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
    # worker processes read their log level from the environment they start with
    with _environ(DASK_DISTRIBUTED__LOGGING__DISTRIBUTED="warning"):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host=LOOPBACK,
            dashboard_address=f"{LOOPBACK}:0",
            worker_dashboard_address=f"{LOOPBACK}:0",
            silence_logs=logging.WARNING,
        )
    return Client(cluster), cluster


def _remote_client(address):
    try:
        from emdask.engine.cluster import connect
    except ImportError:  # older library: plain client with a bounded wait
        from distributed import Client

        return Client(address, timeout="30s")
    return connect(address)


@contextlib.contextmanager
def dask_client(dask_address=None, n_workers=None):
    """A ``distributed.Client`` for the run, set as Dask's default, closed afterwards.

    With no address (parameter or ``$DASK_SCHEDULER_ADDRESS``) a local cluster of worker
    processes bound to 127.0.0.1 is started for the run and closed after it.
    """
    import distributed  # noqa: F401  (importing it sets its loggers' levels: quiet them after)

    address = scheduler_address(dask_address)
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the run's log is about the run, not the cluster's start
    try:
        if address is None:
            client, cluster = _local_client(n_workers)
        else:
            client, cluster = _remote_client(address), None
        try:
            with client.as_current():
                yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    finally:
        quiet.setLevel(level)
