"""Connecting to Dask: an existing scheduler by address, or a new local cluster on loopback.

A Dask scheduler runs whatever code its clients send it, so anything that can reach its port
can run code on the cluster. Local clusters started here therefore listen on 127.0.0.1 only
(the dashboard included); a remote scheduler should be reached inside a private network or
over TLS (``tls://`` addresses, certificates from ``security=`` or the Dask configuration).

Connecting to a scheduler is bounded in time: a wrong address, a closed port, a firewall that
drops packets or a port held by something that is not a Dask scheduler all end in
:class:`SchedulerUnreachable`, naming the address, within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import threading

import dask

__all__ = ["DEFAULT_TIMEOUT", "SchedulerUnreachable", "connect", "probe"]

#: Seconds allowed to reach a scheduler and hear it answer.
DEFAULT_TIMEOUT = 30.0

#: Loopback interface local clusters bind to.
LOOPBACK = "127.0.0.1"


class SchedulerUnreachable(ConnectionError):
    """No Dask scheduler answered at the given address within the time allowed."""

    def __init__(self, address, timeout, reason):
        self.address = address
        self.timeout = timeout
        self.reason = reason
        super().__init__(
            f"could not reach a Dask scheduler at {address} within {timeout:g} s: {reason}. "
            "Check that the scheduler is running, that the address and port are right and "
            "reachable from this machine, and, for a tls:// address, that the cluster's "
            "certificates are configured (security= or the distributed.comm.tls settings)."
        )


async def _identify(address, timeout, connection_args):
    from distributed.comm import connect as comm_connect
    from distributed.core import send_recv

    comm = await comm_connect(address, timeout=timeout, **connection_args)
    try:
        return await send_recv(comm, op="identity", reply=True)
    finally:
        comm.abort()


def probe(address, *, timeout=DEFAULT_TIMEOUT, security=None):
    """What the Dask server at ``address`` says it is (its ``identity``), within ``timeout``.

    Raises
    ------
    SchedulerUnreachable
        If nothing answers in time, the connection is refused, or the peer does not speak
        the Dask protocol.
    """
    from distributed.security import Security

    security = security if security is not None else Security()
    args = security.get_connection_args("client")
    if address.startswith("tls://") and args.get("ssl_context") is None:
        raise SchedulerUnreachable(
            address, timeout, "a tls:// address needs TLS certificates and none are configured"
        )
    result = {}

    def run():
        try:
            result["identity"] = asyncio.run(
                asyncio.wait_for(_identify(address, timeout, args), timeout)
            )
        except asyncio.TimeoutError:
            result["error"] = "no answer in time"
        except Exception as exc:  # refused, reset, TLS failure, not a Dask server, ...
            result["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    # A thread of its own, so that the deadline holds even if the caller already runs an
    # event loop (asyncio.run refuses to nest) and even if a connection attempt ignores its
    # own timeout (a port that accepts and never answers does).
    thread = threading.Thread(target=run, name="emdask-probe-scheduler", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if "identity" in result:
        return result["identity"]
    raise SchedulerUnreachable(address, timeout, result.get("error", "no answer in time"))


def _local_client(n_workers, threads_per_worker, memory_limit, security, **client_kwargs):
    from distributed import Client, LocalCluster

    class LocalClusterClient(Client):
        """A client that closes the local cluster made for it."""

        def close(self, *args, **kwargs):
            try:
                return super().close(*args, **kwargs)
            finally:
                cluster.close()

    tls = security is not None and getattr(security, "require_encryption", False)
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        processes=True,
        host=LOOPBACK,
        protocol="tls://" if tls else None,
        security=security,
        # the HTTP servers (dashboard, metrics) would otherwise listen on every interface
        dashboard_address=f"{LOOPBACK}:0",
        worker_dashboard_address=f"{LOOPBACK}:0",
    )
    try:
        return LocalClusterClient(cluster, security=security, **client_kwargs)
    except BaseException:
        cluster.close()
        raise


def connect(
    address=None,
    *,
    timeout=DEFAULT_TIMEOUT,
    security=None,
    n_workers=None,
    threads_per_worker=None,
    memory_limit="auto",
    **client_kwargs,
):
    """A ``distributed.Client`` for an existing cluster, or for a new local one.

    Parameters
    ----------
    address : str, cluster object or None
        ``"tcp://host:8786"``, ``"tls://host:8786"`` (or ``"host:8786"``): the scheduler of
        a running cluster (``dask scheduler``, a Kubernetes ``DaskCluster``, ...). A cluster
        object (anything with ``get_client()``: ``KubeCluster``, a Dask Gateway or Coiled
        cluster, ``LocalCluster``) is asked for its client. ``None`` takes Dask's
        ``scheduler-address`` setting (the ``DASK_SCHEDULER_ADDRESS`` environment variable a
        deployment sets) and, without one, starts a local cluster of worker processes that
        listens on 127.0.0.1 only and closes with the client.
    timeout : float
        Seconds allowed to reach the scheduler.
    security : distributed.Security, optional
        TLS certificates; default: from the Dask configuration
        (``distributed.comm.tls.*``, e.g. ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``). For a local
        cluster, a ``Security`` with ``require_encryption=True`` makes it use TLS.
    n_workers, threads_per_worker, memory_limit
        Shape of a local cluster (ignored with an address).
    **client_kwargs
        Passed to ``distributed.Client``.

    Returns
    -------
    distributed.Client
        Close it (or use it as a context manager) when done.

    Raises
    ------
    SchedulerUnreachable
        If no scheduler answers at ``address`` within ``timeout`` seconds; the message names
        the address.
    """
    from distributed import Client

    if address is not None and not isinstance(address, str):
        if hasattr(address, "get_client"):
            return address.get_client()
        raise TypeError(
            f"address={address!r} must be a scheduler address such as 'tcp://host:8786', a "
            "cluster object with get_client(), or None for a local cluster"
        )
    if address is None:  # Dask's own setting, e.g. DASK_SCHEDULER_ADDRESS in a deployment
        address = dask.config.get("scheduler-address", None) or None
    if address is None:
        return _local_client(
            n_workers, threads_per_worker, memory_limit, security, **client_kwargs
        )
    address = address.strip()
    if not address:
        raise ValueError("address is empty; pass a scheduler address or None for a local cluster")
    identity = probe(address, timeout=timeout, security=security)
    if identity.get("type") != "Scheduler":
        raise SchedulerUnreachable(
            address,
            timeout,
            f"the process there is a Dask {identity.get('type', 'server')}, not a scheduler "
            "(a worker or nanny address was given where the scheduler's was expected)",
        )
    return Client(address, timeout=timeout, security=security, **client_kwargs)
