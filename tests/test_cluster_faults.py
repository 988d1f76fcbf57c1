"""Worker processes die in the middle of a fit; the fit completes with the same model.

Each test starts its own cluster (a ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1), lets EM run a few iterations, and kills a worker while a pass is running:

* during the E-step: a whole worker machine (nanny and worker) is SIGKILLed while an E-step
  task, or a resident pass over its blocks, is starting on it (the worker holds it until the
  kill); the fit finishes on the other worker;
* during the reduction: the worker process SIGKILLs itself the moment a combine task starts
  on it (its nanny starts a new one);
* with in-memory (numpy) input, whose blocks were scattered from the client and cannot be
  recomputed by Dask: they are sent again.

Persisted blocks read from Parquet are recomputed by Dask from the files; partial statistics
lost with the worker are recomputed; the reduction order is fixed by the graph, not by where
tasks ran, so the result equals an uninterrupted fit's to rounding.
"""

import os
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pytest

from cluster_helpers import (
    KillWhenRunning,
    ProcessCluster,
    _arm,
    group_alive,
    mixture_table,
    self_kill_plugin,
    worker_addresses_by_name,
    write_parquet_parts,
)
from emdask import ConvergenceWarning, GaussianMixture

COLUMNS = [f"x{j}" for j in range(6)]
N_PARTS = 32
KILL_AFTER = 2  # iterations completed before the kill is armed
MAX_ITER = 12  # passes enough after the kill is armed for the killer to catch one on a loaded machine
E_STEP = "_em_chunk"  # tasks of one EM pass: E-step statistics of the blocks a worker holds
REDUCE = "_combine_with"  # ... and one node of the tree reduction of a pass that re-reads


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    frame = mixture_table(N_PARTS * 6000, n_features=6, k=3, seed=21)
    path = write_parquet_parts(frame, tmp_path_factory.mktemp("faults") / "t", N_PARTS)
    return frame, path


@pytest.fixture
def cluster(tmp_path):
    with ProcessCluster(tmp_path / "cluster", n_workers=2, memory_limit="1GiB") as c:
        yield c
    assert not c.leftovers()  # restarted workers included


def make_model():
    return GaussianMixture(3, random_state=7, max_iter=MAX_ITER, tol=0)


def fit(model, X, callbacks=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, columns=COLUMNS if hasattr(X, "columns") else None, callbacks=callbacks)


@pytest.fixture(scope="module")
def reference(table):
    """Uninterrupted fits, in this process, of the Parquet table and of its numpy copy."""
    frame, path = table
    with dask.config.set(scheduler="synchronous"):
        return {
            "parquet": fit(make_model().set_params(persist=True), dd.read_parquet(path)),
            "numpy": fit(make_model(), frame[COLUMNS].to_numpy()),
        }


def assert_same_model(a, b, tol=1e-10):
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=tol, atol=tol)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=tol, atol=tol)
    assert a.n_iter_ == b.n_iter_ == MAX_ITER


def _arm_after(iteration, action):
    def callback(info):
        if info.iteration == iteration:
            action()

    return callback


def _fit_with_node_killed_in_e_step(cluster, X, persist):
    killer = KillWhenRunning(cluster, "w1", E_STEP)
    killer.start()
    try:
        with cluster.client() as client:
            assert len(client.scheduler_info()["workers"]) == 2
            model = fit(
                make_model().set_params(persist=persist),
                X,
                callbacks=[_arm_after(KILL_AFTER, lambda: killer.arm(client))],
            )
            survivors = worker_addresses_by_name(client)
    finally:
        killer.armed.set()
        killer.done.wait(30)
    assert killer.error is None, killer.error
    # the kill landed while E-step tasks of a later pass were running on that worker
    assert any(str(k).startswith(E_STEP) for k in killer.seen), killer.seen
    assert not group_alive(cluster.workers["w1"].pid)
    assert set(survivors) == {"w0"}
    return model


@pytest.mark.parametrize("resident", [True, False], ids=["resident-pass", "task-pass"])
def test_worker_machine_lost_during_the_e_step(cluster, table, reference, resident):
    _, path = table
    with dask.config.set({"emdask.resident-passes": resident}):
        model = _fit_with_node_killed_in_e_step(cluster, dd.read_parquet(path), persist=True)
    assert_same_model(model, reference["parquet"])


def test_worker_lost_with_blocks_scattered_from_the_client(cluster, table, reference):
    frame, _ = table
    model = _fit_with_node_killed_in_e_step(cluster, frame[COLUMNS].to_numpy(), persist=True)
    assert_same_model(model, reference["numpy"])


def test_worker_process_dies_during_the_reduction(cluster, table, reference):
    _, path = table
    with cluster.client() as client:
        client.register_plugin(self_kill_plugin())
        before = client.run(os.getpid)
        names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
        assert sorted(names.values()) == ["w0", "w1"]
        token = str(cluster.workdir / "killed-once")

        def arm():
            client.run(_arm, REDUCE, token)

        # re-read at every pass: a task per block and a tree of reduction tasks (over
        # persisted blocks the few per-worker results are reduced in the client)
        model = fit(
            make_model().set_params(persist=False),
            dd.read_parquet(path),
            callbacks=[_arm_after(KILL_AFTER, arm)],
        )
        # exactly one worker process died, at the start of a combine task
        with open(token) as f:
            killed_pid, key = f.read().split(" ", 1)
        assert key.startswith(REDUCE)
        victim = next(addr for addr, pid in before.items() if pid == int(killed_pid))
        # its nanny started a new worker process under the same name
        client.wait_for_workers(2, timeout=60)
        after = worker_addresses_by_name(client)
        pids_after = client.run(os.getpid)
    assert int(killed_pid) not in pids_after.values()
    assert set(after) == {"w0", "w1"}
    assert after[names[victim]] != victim
    assert_same_model(model, reference["parquet"])
