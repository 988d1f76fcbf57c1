"""Fits on a real multi-process cluster started as a deployment starts one, and connecting.

The cluster is a ``dask scheduler`` process and two ``dask worker`` processes (under nannies,
one thread and 1 GiB each) on 127.0.0.1, reached through its address.
"""

import os
import socket
import threading
import time
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import psutil
import pytest
from distributed import Client, get_task_stream

from cluster_helpers import ProcessCluster, mixture_table, task_prefix, write_parquet_parts
from emdask import ConvergenceWarning, GaussianMixture
from emdask.engine.cluster import SchedulerUnreachable, connect

N_PARTS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ProcessCluster(tmp_path_factory.mktemp("cluster"), n_workers=2, memory_limit="1GiB") as c:
        yield c
    assert not c.leftovers()  # every process it started is gone


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    frame = mixture_table(12_000, n_features=5, k=3, seed=11, missing=0.02)
    path = write_parquet_parts(frame, tmp_path_factory.mktemp("table") / "t", N_PARTS)
    return frame, path


def fit(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(3, random_state=3, max_iter=5, tol=0, **kw).fit(
            X, columns=[f"x{j}" for j in range(5)] if hasattr(X, "columns") else None
        )


def assert_same_model(a, b, tol=1e-10):
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=tol, atol=tol)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=tol, atol=tol)


def test_fit_through_the_scheduler_address_equals_a_local_fit(cluster, table):
    frame, path = table
    with dask.config.set(scheduler="synchronous"):
        local = fit(dd.read_parquet(path))
        local_numpy = fit(frame.drop(columns="id").to_numpy())
    with Client(cluster.address) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        ddf = dd.read_parquet(path)
        assert ddf.npartitions == N_PARTS
        with get_task_stream(client) as persisted_stream:
            persisted = fit(ddf, persist=True)
        with get_task_stream(client) as reread_stream:
            reread = fit(dd.read_parquet(path), persist=False)
        numpy_blocks = fit(frame.drop(columns="id").to_numpy(), persist=True)
    assert_same_model(persisted, local)
    assert_same_model(reread, local)
    assert_same_model(numpy_blocks, local_numpy)
    # the E-step really ran in both worker processes: over persisted blocks asked of a
    # resident helper on each (started by a task), re-read as tasks
    helpers = {t["worker"] for t in persisted_stream.data
               if str(t["key"]).startswith("emdask-blocks-")}
    assert len(helpers) == 2
    assert not [t for t in persisted_stream.data if task_prefix(t["key"]) == "_em_chunk"]
    workers = {t["worker"] for t in reread_stream.data if task_prefix(t["key"]) == "_em_chunk"}
    assert len(workers) == 2


def _kernels_in_use():
    from emdask.families import _kernels

    return {"gaussian": _kernels._compiled_kernels() is not None,
            "categorical": _kernels.compiled_discrete() is not None}


@pytest.mark.skipif(os.environ.get("EMDASK_COMPILED") == "0",
                    reason="EMDASK_COMPILED=0 runs the numpy reference")
def test_workers_run_the_compiled_kernels_built_with_the_package(cluster):
    """Worker processes find the C kernels of the installation: nothing to compile or warm."""
    with Client(cluster.address) as client:
        in_use = client.run(_kernels_in_use)
    assert len(in_use) == 2
    for worker, kernels in in_use.items():
        assert all(kernels.values()), (worker, kernels)


def test_predict_on_the_cluster_is_lazy_and_matches(cluster, table):
    frame, path = table
    with dask.config.set(scheduler="synchronous"):
        local = fit(dd.read_parquet(path))
    with Client(cluster.address) as client:
        labels = local.predict(dd.read_parquet(path)[[f"x{j}" for j in range(5)]])
        assert dask.is_dask_collection(labels)
        on_cluster = labels.compute().to_numpy()
        assert client.scheduler_info()["workers"]
    np.testing.assert_array_equal(on_cluster, local.predict(frame.drop(columns="id")))


def test_every_process_of_the_cluster_listens_on_loopback_only(cluster):
    found = cluster.listening_addresses()
    ports = {port for _, port in found}
    assert int(cluster.address.rsplit(":", 1)[1]) in ports
    assert len(found) >= 5  # scheduler, its HTTP server, and per worker: nanny, worker, HTTP
    assert {ip for ip, _ in found} == {"127.0.0.1"}, found


def _listening(pids):
    out = set()
    for pid in pids:
        for c in psutil.Process(pid).net_connections("inet"):
            if c.status == psutil.CONN_LISTEN:
                out.add((pid, c.laddr.ip, c.laddr.port))
    return out


def test_a_local_cluster_from_connect_listens_on_loopback_only():
    me = os.getpid()
    before = _listening([me])
    with connect(None, n_workers=1, threads_per_worker=1, memory_limit="1GiB") as client:
        worker_pids = list(client.run(os.getpid).values())
        opened = (_listening([me]) - before) | _listening(worker_pids)
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        model = fit(mixture_table(2000, n_features=5, seed=1).drop(columns="id").to_numpy())
    assert model.n_iter_ == 5
    assert len(opened) >= 3
    assert {ip for _, ip, _ in opened} == {"127.0.0.1"}, opened


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expect_unreachable(address, timeout, **kw):
    start = time.monotonic()
    with pytest.raises(SchedulerUnreachable) as info:
        connect(address, timeout=timeout, **kw)
    elapsed = time.monotonic() - start
    assert address in str(info.value)
    assert info.value.address == address
    assert elapsed < timeout + 2.0, elapsed
    return str(info.value)


def test_unreachable_scheduler_fails_fast_naming_the_address():
    # nothing listens there
    _expect_unreachable(f"tcp://127.0.0.1:{_free_port()}", timeout=2)
    # something accepts connections but never speaks: distributed alone would wait forever
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        message = _expect_unreachable(address, timeout=2)
    assert "no answer" in message
    # a TLS address without certificates
    message = _expect_unreachable(f"tls://127.0.0.1:{_free_port()}", timeout=2)
    assert "certificates" in message


def test_a_worker_address_is_not_taken_for_the_scheduler(cluster):
    with cluster.client(set_as_default=False) as client:
        worker = next(iter(client.scheduler_info()["workers"]))
    message = _expect_unreachable(worker, timeout=5)
    assert "Worker" in message


def test_connect_from_a_thread_that_runs_an_event_loop():
    """Flows may call it from async code: the deadline still holds and it still connects."""
    import asyncio

    result = {}

    async def main():
        try:
            connect(f"tcp://127.0.0.1:{_free_port()}", timeout=1)
        except SchedulerUnreachable as exc:
            result["error"] = exc

    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    thread.join(10)
    assert isinstance(result.get("error"), SchedulerUnreachable)


def test_the_scheduler_address_setting_is_the_default(cluster):
    """A deployment points every flow at its cluster with DASK_SCHEDULER_ADDRESS."""
    with dask.config.set({"scheduler-address": cluster.address}):
        with connect(timeout=10) as client:
            assert client.scheduler.address == cluster.address
            assert len(client.scheduler_info()["workers"]) == 2
