"""The Dask cluster a flow run drives: an existing scheduler, or a local one for the run.

:func:`check_scheduler` tells, before any service starts, whether the scheduler a run would use
answers. A local cluster's worker processes ignore the terminal's Ctrl-C (the flow process
closes the cluster when interrupted) and die with the flow process when it is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["ADDRESS_ENV", "check_scheduler", "dask_client", "scheduler_address"]

#: Environment variable naming a Dask scheduler when the flow's parameter is not given.
ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
#: Local clusters listen on loopback only: a Dask scheduler runs any code sent to it.
LOOPBACK = "127.0.0.1"


def scheduler_address(dask_address=None):
    """The scheduler to use: the parameter, else ``$DASK_SCHEDULER_ADDRESS``, else None (local)."""
    address = (dask_address or os.environ.get(ADDRESS_ENV) or "").strip()
    return address or None


def check_scheduler(dask_address=None, timeout=None):
    """Check that the scheduler a run would use answers, in bounded time; no address, no check.

    Raises
    ------
    InputError
        Nothing answers at the address as a Dask scheduler within ``timeout`` seconds (the
        library's connection timeout by default); the message names the address.
    """
    from .errors import InputError

    address = scheduler_address(dask_address)
    if address is None:
        return None
    try:
        from emdask.engine.cluster import DEFAULT_TIMEOUT, SchedulerUnreachable, probe
    except ImportError:  # older library: the run's own connection reports it
        return None
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    where = "" if dask_address else f" (from ${ADDRESS_ENV})"

    def unreachable(reason):
        return InputError(
            f"no Dask scheduler answers at {address}{where}: {reason}; check that it runs and "
            "that the address and port are right, or leave the address out to run on a local "
            "cluster"
        )

    try:
        _refused_at_once(address, timeout)
        return probe(address, timeout=timeout)
    except SchedulerUnreachable as exc:
        raise unreachable(f"{exc.reason} (waited up to {timeout:g} s)") from None
    except ConnectionRefusedError:
        raise unreachable("connection refused") from None
    except ValueError as exc:  # not an address at all
        raise InputError(f"Dask scheduler address {address!r}{where} is not valid: {exc}") from None


def _refused_at_once(address, timeout):
    """Raise ConnectionRefusedError when a TCP address refuses connections (Dask's own connect
    tries again until its timeout); anything else is left to the Dask handshake."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    host, port = parse_host_port(location)
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    except ConnectionRefusedError:
        raise
    except OSError:  # unresolved name, no route, slow network: the handshake reports it
        pass


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


class _SchedulerGone(logging.Filter):
    """A local cluster's scheduler lives in the flow process: a worker's heartbeat that finds
    it gone (the flow ending, closing the cluster as it is interrupted) tells nothing."""

    def filter(self, record):
        return not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")


def dask_setup(worker):
    """Preload of a local cluster's worker processes (:func:`_local_client`): the terminal's
    Ctrl-C is the flow process's to handle (it closes the cluster), and a heartbeat that finds
    the scheduler gone is not reported."""
    import signal

    logging.getLogger("distributed.worker").addFilter(_SchedulerGone())
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker the nanny started again too
    except ValueError:  # not the main thread
        pass


def _local_client(n_workers=None):
    import dask
    from distributed import Client, LocalCluster

    from .lifecycle import sigint_ignored

    n_workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
    preload = [*(dask.config.get("distributed.worker.preload", None) or []), __name__]
    # worker processes read their log level from the environment they start with, and ignore
    # the terminal's Ctrl-C from their start (this process closes the cluster when
    # interrupted; they die with it when it is killed)
    with _environ(DASK_DISTRIBUTED__LOGGING__DISTRIBUTED="warning"), sigint_ignored():
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host=LOOPBACK,
            dashboard_address=f"{LOOPBACK}:0",
            worker_dashboard_address=f"{LOOPBACK}:0",
            silence_logs=logging.WARNING,
            preload=preload,
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

    from .lifecycle import signals_deferred

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
            # closed whole even when interrupted again meanwhile: workers first, then the
            # scheduler (a worker left without its scheduler logs its failed heartbeats)
            with signals_deferred():
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        quiet.setLevel(level)
