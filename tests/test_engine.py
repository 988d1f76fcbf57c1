"""The map-reduce driver on real schedulers: multi-process cluster, synchronous, re-reading."""

import time
import warnings

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from emdask import ConvergenceWarning, GaussianMixture
from emdask.engine import prepare
from emdask.families.base import Stats


def table(seed=0, n=3000, d=4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, (3, d))
    X = np.vstack([rng.normal(c, 1.0, (n // 3, d)) for c in centers])
    return pd.DataFrame(X, columns=[f"f{j}" for j in range(d)])


@pytest.fixture(scope="module")
def cluster_client():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, memory_limit="2GiB",
    ) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def task_passes():
    """Passes over persisted blocks as tasks, not asked of resident helpers."""
    with dask.config.set({"emdask.resident-passes": False}):
        yield


def fit(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(3, random_state=5, max_iter=10, tol=0, **kw).fit(X)


def test_multiprocess_cluster_equals_synchronous_scheduler(cluster_client, tmp_path):
    df = table(1)
    path = tmp_path / "table.parquet"
    dd.from_pandas(df, npartitions=6).to_parquet(path)
    on_cluster = fit(dd.read_parquet(path))
    on_cluster_numpy = fit(df.to_numpy())  # blocks scattered to the workers once
    with dask.config.set(scheduler="synchronous"):
        local = fit(dd.read_parquet(path))
        local_numpy = fit(df.to_numpy())
    for other, ref in ((on_cluster, local), (on_cluster_numpy, local_numpy)):
        np.testing.assert_allclose(other.means_, ref.means_, rtol=1e-12)
        np.testing.assert_allclose(other.covariances_, ref.covariances_, rtol=1e-12)
    # the per-row methods run on the cluster too, lazily
    labels = on_cluster.predict(dd.read_parquet(path))
    np.testing.assert_array_equal(labels.compute().to_numpy(), local.predict(df))


def test_same_random_state_whatever_the_number_of_workers(cluster_client, tmp_path):
    df = table(2)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=5).to_parquet(path)
    two_workers = fit(dd.read_parquet(path))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as one, Client(one, set_as_default=False) as c1:
        with dask.config.set(scheduler=c1.get):
            one_worker = fit(dd.read_parquet(path))
    np.testing.assert_array_equal(two_workers.means_, one_worker.means_)
    np.testing.assert_array_equal(two_workers.covariances_, one_worker.covariances_)


def test_rereading_when_not_persisted_gives_the_same_model(tmp_path):
    df = table(3)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=4).to_parquet(path)
    persisted = fit(dd.read_parquet(path), persist=True)
    reread = fit(dd.read_parquet(path), persist=False)
    in_memory = fit(df)
    np.testing.assert_allclose(reread.means_, persisted.means_, rtol=1e-12)
    np.testing.assert_allclose(in_memory.means_, persisted.means_, rtol=1e-12)


def test_one_graph_per_iteration_and_counted_passes():
    df = table(4, n=1200)
    data = prepare(dd.from_pandas(df, npartitions=9), persist=False, split_every=2)
    assert data.n_passes == 1  # the summary pass
    assert len(data.summary.lengths) == 9 and sum(data.summary.lengths) == 1200
    assert data.row_starts == tuple(np.cumsum((0,) + data.summary.lengths[:-1]))
    gm = fit(df)
    # summary + k-means|| (1 + 5 rounds + 1 weighting + 2 Lloyd) + 1 initial assignment + 10 EM
    assert gm.n_passes_ == 1 + 9 + 1 + 10


def test_a_pass_over_blocks_held_here_builds_no_graph_and_gives_the_graph_s_bits():
    """Without a cluster, a pass over blocks held in this process calls the E-step on each
    block directly, on Dask's threads (no graph to build and schedule: that costs more than
    the pass itself on a small table); through a graph, as a scheduler of another kind gets
    it, the fit is the same to the bit."""
    import functools

    from dask.callbacks import Callback

    X = da.from_array(table(7, n=3000).to_numpy(), chunks=(300, 4))  # ten blocks
    graphs = []

    class Graphs(Callback):
        def _start(self, dsk):
            graphs.append(len(dsk))

    with Graphs(), dask.config.set(scheduler="threads"):  # not this module's cluster
        direct = fit(X, n_init=2, persist=True)
    # two graphs: the summary pass reads the array, then the blocks are kept here
    assert direct.n_passes_ > 10 and len(graphs) == 2
    graphs.clear()
    with Graphs(), dask.config.set(scheduler=functools.partial(dask.threaded.get)):
        graph = fit(X, n_init=2, persist=True)
    assert len(graphs) == graph.n_passes_ + 1
    np.testing.assert_array_equal(direct.means_, graph.means_)
    np.testing.assert_array_equal(direct.covariances_, graph.covariances_)
    np.testing.assert_array_equal(direct.lower_bounds_, graph.lower_bounds_)


def _count_chunk(block, index):
    return Stats(n_rows=float(block.shape[0]), loglik=float(block.sum()))


@pytest.mark.parametrize("split_every", [2, 3, 8])
def test_tree_reduction_adds_every_block_once(split_every):
    X = np.arange(1000.0).reshape(500, 2)
    data = prepare(X, npartitions=17, split_every=split_every)
    total = data.map_reduce(_count_chunk)
    assert total.n_rows == 500
    assert total.loglik == X.sum()


@pytest.mark.timeout(120)
def test_the_same_array_prepared_again_right_after_gets_blocks_of_its_own(cluster_client):
    """Blocks shipped from memory get keys of their own: keys made from their content would be
    shared with the same table prepared just before, whose release can reach the scheduler
    after the new blocks and leave the pass waiting for ever for blocks that are gone."""
    X = np.arange(1000.0).reshape(500, 2)
    keys = set()
    for _ in range(4):
        data = prepare(X, npartitions=17)
        assert data.persisted and not keys & {b.key for b in data.blocks}
        keys |= {b.key for b in data.blocks}
        assert data.map_reduce(_count_chunk).loglik == X.sum()
        del data


def test_statistics_add_associatively_with_zero_for_an_empty_block():
    from emdask.families.gaussian import GaussianFamily

    X = table(5, n=300).to_numpy()
    fam = GaussianFamily(3, "full")
    gm = fit(X)
    params = gm._fitted_params()
    whole = fam.partial_stats(X, params)
    parts = [fam.partial_stats(X[a:b], params) for a, b in [(0, 0), (0, 100), (100, 250), (250, 300)]]
    assert parts[0].n_rows == 0 and np.all(parts[0].terms["s2"] == 0)
    left = (parts[0] + parts[1]) + (parts[2] + parts[3])
    right = parts[3] + (parts[2] + (parts[1] + parts[0]))
    for s in (left, right):
        assert s.n_rows == whole.n_rows
        assert s.loglik == pytest.approx(whole.loglik, rel=1e-13)
        for key in whole.terms:
            np.testing.assert_allclose(s.terms[key], whole.terms[key], rtol=1e-12, atol=1e-9)


@pytest.mark.usefixtures("task_passes")
def test_persisted_pass_runs_a_task_per_worker_thread_with_the_same_result(
    cluster_client, tmp_path, monkeypatch
):
    """Over persisted blocks a pass runs one E-step task per worker thread (over the blocks
    its worker holds) and reduces by the same tree as a task per block: the same bits."""
    from distributed import get_task_stream

    import emdask.engine.data as engine_data

    df = table(4)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=7).to_parquet(path)
    with get_task_stream(cluster_client) as stream:
        grouped = fit(dd.read_parquet(path), persist=True)
    e_steps = [r for r in stream.data if str(r["key"]).startswith("_em_chunk")]
    threads = sum(cluster_client.nthreads().values())
    assert len(e_steps) == threads * grouped.n_iter_  # not 7 per pass
    monkeypatch.setattr(engine_data, "GROUP_MAX_BLOCKS", 0)
    with get_task_stream(cluster_client) as stream:
        per_block = fit(dd.read_parquet(path), persist=True)
    e_steps = [r for r in stream.data if str(r["key"]).startswith("_em_chunk")]
    assert len(e_steps) == 7 * per_block.n_iter_
    np.testing.assert_array_equal(grouped.means_, per_block.means_)
    np.testing.assert_array_equal(grouped.covariances_, per_block.covariances_)
    np.testing.assert_array_equal(grouped.lower_bounds_, per_block.lower_bounds_)


@pytest.mark.usefixtures("task_passes")
def test_persisted_pass_submitted_without_a_graph_gives_the_graph_s_bits(
    cluster_client, tmp_path, monkeypatch
):
    """The tasks of a pass over persisted blocks go to the cluster directly, one submission
    without a graph to build; with a lazy argument (parameters too large to travel inside
    the tasks) the pass builds its graph instead, and both give the same bits."""
    import emdask.engine.data as engine_data

    df = table(6)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=7).to_parquet(path)
    direct_passes = []
    submit = engine_data._submit_groups

    def watched(*args):
        parts = submit(*args)
        direct_passes.append(parts is not None)
        return parts

    monkeypatch.setattr(engine_data, "_submit_groups", watched)
    direct = fit(dd.read_parquet(path), persist=True)
    assert len(direct_passes) >= direct.n_iter_ and all(direct_passes)
    direct_passes.clear()
    monkeypatch.setattr(engine_data, "INLINE_ARGS_BYTES", 0)
    graph = fit(dd.read_parquet(path), persist=True)
    assert direct_passes and not any(direct_passes)
    np.testing.assert_array_equal(direct.means_, graph.means_)
    np.testing.assert_array_equal(direct.covariances_, graph.covariances_)
    np.testing.assert_array_equal(direct.lower_bounds_, graph.lower_bounds_)


@pytest.mark.usefixtures("task_passes")
def test_a_pass_fetches_its_results_in_one_request(cluster_client, tmp_path, monkeypatch):
    """The results of a pass's tasks (one per worker thread) come back in one request once
    every task is done, not one request per task: each is a round trip through the
    scheduler."""
    import emdask.engine.data as engine_data

    df = table(7)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=6).to_parquet(path)
    passes, fetches = [], []
    watched = engine_data._gather_watched

    def counted_pass(client, futures, keep=None):
        passes.append(len(futures))
        return watched(client, futures, keep)

    gather = cluster_client.gather

    def counted_gather(futures, *args, **kwargs):
        fetches.append(len(futures))
        return gather(futures, *args, **kwargs)

    monkeypatch.setattr(engine_data, "_gather_watched", counted_pass)
    monkeypatch.setattr(cluster_client, "gather", counted_gather)
    fitted = fit(dd.read_parquet(path), persist=True)
    threads = sum(cluster_client.nthreads().values())
    assert threads >= 2
    assert len(passes) >= fitted.n_iter_ and max(passes) >= 2
    assert fetches == passes  # one request per pass, for all of its tasks


def _persisted(frame, npartitions):
    """``frame`` prepared and persisted on the cluster, its blocks in the workers' memory."""
    from distributed import futures_of, wait

    data = prepare(dd.from_pandas(frame, npartitions=npartitions), persist=True)
    wait(futures_of(data.blocks))
    return data


def _counted_resident_passes(monkeypatch):
    """The outcome of every pass asked of resident helpers (True: answered)."""
    import emdask.engine.data as engine_data

    outcomes = []
    run = engine_data.Residents.run

    def counted(self, *args):
        parts = run(self, *args)
        outcomes.append(parts is not None)
        return parts

    monkeypatch.setattr(engine_data.Residents, "run", counted)
    return outcomes


def test_resident_passes_run_no_e_step_task_and_give_the_task_passes_bits(
    cluster_client, tmp_path, monkeypatch
):
    """Over persisted blocks every pass is asked of one resident helper per worker: no
    E-step task reaches the scheduler, and the model is the task passes' to the bit (the
    helpers keep each block's missingness patterns from pass to pass)."""
    from distributed import get_task_stream

    df = table(8)
    df = df.mask(np.random.default_rng(8).random(df.shape) < 0.1)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=7).to_parquet(path)
    outcomes = _counted_resident_passes(monkeypatch)
    with get_task_stream(cluster_client) as stream:
        resident = fit(dd.read_parquet(path), persist=True)
    assert not [r for r in stream.data if str(r["key"]).startswith("_em_chunk")]
    assert len(outcomes) >= resident.n_iter_ and all(outcomes)
    outcomes.clear()
    with dask.config.set({"emdask.resident-passes": False}):
        with get_task_stream(cluster_client) as stream:
            tasks = fit(dd.read_parquet(path), persist=True)
    assert not outcomes
    assert len([r for r in stream.data if str(r["key"]).startswith("_em_chunk")]) >= 2
    np.testing.assert_array_equal(resident.means_, tasks.means_)
    np.testing.assert_array_equal(resident.covariances_, tasks.covariances_)
    np.testing.assert_array_equal(resident.lower_bounds_, tasks.lower_bounds_)


def test_resident_passes_use_every_thread_of_a_worker(tmp_path, monkeypatch):
    """A worker of two threads works on its two groups of blocks at once, each on a task
    thread of its own, and the model is the task passes' to the bit."""
    import time

    df = table(9)
    path = tmp_path / "t.parquet"
    dd.from_pandas(df, npartitions=6).to_parquet(path)
    outcomes = _counted_resident_passes(monkeypatch)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster):
        data = _persisted(dd.read_parquet(path).compute(), 6)
        groups = data._groups_by_holder()
        assert groups == [[0, 2, 4], [1, 3, 5]]

        def spans(block, index):  # the first block of each group takes half a second
            if index > 1:
                return []
            start = time.time()
            time.sleep(0.5)
            return [(start, time.time())]

        (a0, a1), (b0, b1) = sorted(data.map_reduce(spans))
        assert b0 < a1  # the two groups overlapped in time
        assert outcomes == [True]
        resident = fit(dd.read_parquet(path), persist=True)
        with dask.config.set({"emdask.resident-passes": False}):
            tasks = fit(dd.read_parquet(path), persist=True)
    assert len(outcomes) >= resident.n_iter_ and all(outcomes)
    np.testing.assert_array_equal(resident.means_, tasks.means_)
    np.testing.assert_array_equal(resident.lower_bounds_, tasks.lower_bounds_)


def test_an_error_in_a_resident_pass_is_raised_as_it_was(cluster_client, monkeypatch):
    data = _persisted(table(10), 4)
    outcomes = _counted_resident_passes(monkeypatch)
    assert data.map_reduce(lambda block, index: block.shape[0]) == 3000

    def failing(block, index):
        if index == 2:
            raise ValueError(f"block {index} cannot be read: give it another look")
        return block.shape[0]

    with pytest.raises(ValueError, match="block 2 cannot be read"):
        data.map_reduce(failing)
    assert outcomes == [True]  # the failing pass was asked of the helpers, and raised


def test_a_resident_pass_the_scheduler_cannot_vouch_for_goes_to_tasks(cluster_client, monkeypatch):
    """While a resident pass waits, it asks the scheduler whether the workers it asked are
    still there; when the scheduler does not answer, the pass does not wait on (the client's
    cached list of workers would keep a lost worker there for good): it runs as tasks."""
    from emdask.engine import resident

    data = _persisted(table(12), 4)
    outcomes = _counted_resident_passes(monkeypatch)
    assert data.map_reduce(lambda block, index: block.shape[0]) == 3000
    monkeypatch.setattr(resident, "WATCH_INTERVAL", 0.1)

    async def unanswered(**kwargs):
        raise OSError("the scheduler did not answer")

    def slow(block, index):
        time.sleep(0.5)
        return block.shape[0]

    with monkeypatch.context() as m:
        m.setattr(cluster_client.scheduler, "identity", unanswered, raising=False)
        assert data.map_reduce(slow) == 3000
    assert outcomes == [True, False]  # the helpers' answer was not waited for
    assert data._residents is None  # and they are made again at the next look
    assert data.map_reduce(lambda block, index: block.shape[0]) == 3000
    assert outcomes == [True, False, True]


def test_a_resident_pass_waits_for_paused_workers_as_tasks_do(monkeypatch):
    """A worker paused at its memory limit takes no resident pass either: the pass goes to
    tasks, which Dask holds back, and stops with WorkersPaused when no worker resumes.
    (Workers without a memory limit: no memory monitor resumes them behind the test.)"""
    from distributed.core import Status

    from emdask import WorkersPaused

    def set_status(status, dask_worker=None):
        dask_worker.status = status

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=0) as cluster, Client(cluster) as c:
        data = _persisted(table(11), 4)
        outcomes = _counted_resident_passes(monkeypatch)
        assert data.map_reduce(lambda block, index: block.shape[0]) == 3000
        c.run(set_status, Status.paused)
        try:
            with dask.config.set({"emdask.paused-timeout": 1}):
                with pytest.raises(WorkersPaused, match="paused"):
                    data.map_reduce(lambda block, index: block.shape[0])
        finally:
            c.run(set_status, Status.running)
        assert outcomes == [True, False]
        assert data.map_reduce(lambda block, index: block.shape[0]) == 3000
        assert outcomes == [True, False, True]


def test_blocks_copied_to_several_workers_are_shared_out_between_them(cluster_client):
    """A block Dask has copied to several workers goes to the one with the fewest blocks,
    so that no worker sits idle in the passes (resident passes use the placement as is)."""
    from distributed import futures_of

    data = _persisted(table(12), 4)
    futures = futures_of(data.blocks)
    cluster_client.replicate(futures)  # every block on both workers
    holders = cluster_client.who_has(futures)
    assert all(len(holders[f.key]) == 2 for f in futures)
    data._placement = None
    groups = data._groups_by_holder()
    assert sorted(len(g) for g in groups) == [2, 2]
    assert data.map_reduce(lambda block, index: block.shape[0]) == 3000
    # one helper on each worker, each over two blocks
    assert len({worker for _, worker, _ in data._residents._runners}) == 2
