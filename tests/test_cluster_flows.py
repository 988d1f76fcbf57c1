"""The process driving a job is killed outright (SIGKILL) while the cluster keeps running.

* A fit with a checkpoint: killed between iterations, started again, it resumes from the last
  checkpoint (fewer passes than a fresh fit) and reaches the uninterrupted fit's model.
* The imputation flow killed mid-fit: started again, it resumes from the checkpoint it keeps
  under the destination and publishes the model an uninterrupted run publishes.
* The imputation flow: killed while its output is being written, the destination still
  shows the previously published version, whole; the next run publishes a new one, with
  every id of the source exactly once.

Jobs run in processes of their own (tests/cluster_jobs.py) against a ``dask scheduler`` and
two ``dask worker`` processes on 127.0.0.1.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import emdask
from cluster_helpers import TESTS_DIR, ProcessCluster, mixture_table, write_parquet_parts
from cluster_jobs import FIT_COLUMNS, fit_model

N_PARTS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ProcessCluster(tmp_path_factory.mktemp("cluster"), n_workers=2, memory_limit="1GiB") as c:
        yield c


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    frame = mixture_table(N_PARTS * 4000, n_features=5, k=3, seed=8, missing=0.1)
    return frame, write_parquet_parts(frame, tmp_path_factory.mktemp("survey") / "t", N_PARTS)


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)]),
        # flows in these processes use a Prefect home of their own (one database for all)
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.pop("PREFECT_API_URL", None)
    return env


def start_job(env, *args):
    return subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "cluster_jobs.py"), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def kill(proc):
    """SIGKILL the job's process group (its own processes; the cluster is elsewhere)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def wait_for(condition, proc, timeout=180, poll=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the job ended before it could be killed:\n{err[-3000:]}")
        found = condition()
        if found:
            return found
        time.sleep(poll)
    kill(proc)
    pytest.fail("the moment to kill the job never came")


def test_killed_fit_resumes_from_its_checkpoint_to_the_same_model(cluster, survey, job_env, tmp_path):
    _, source = survey
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore", emdask.ConvergenceWarning)
        reference = fit_model().fit(dd.read_parquet(source), columns=FIT_COLUMNS)
    checkpoint, out = tmp_path / "ckpt", tmp_path / "model"

    def iterations_done():
        try:
            n = emdask.load(checkpoint).n_iter_
        except Exception:  # not written yet
            return None
        return n if n >= 3 else None

    proc = start_job(job_env, "fit", cluster.address, source, checkpoint, out, "--pause", 0.4)
    try:
        done = wait_for(iterations_done, proc)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert 3 <= emdask.load(checkpoint).n_iter_ < reference.n_iter_

    result = finish(start_job(job_env, "fit", cluster.address, source, checkpoint, out))
    model = emdask.load(out)
    assert model.n_iter_ == reference.n_iter_ == result["n_iter"]
    # it went on from the checkpoint: a summary pass and the iterations that were left
    assert result["n_passes"] <= 1 + reference.n_iter_ - done < reference.n_passes_
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(model, name), getattr(reference, name),
                                   rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.lower_bounds_, reference.lower_bounds_, rtol=1e-10)


def published(dest):
    from pathlib import Path

    from pipelines.versions import open_destination

    found = open_destination(str(dest)).published()
    return (None, None) if found is None else (found.name, Path(found.url))


def read_manifest(path):
    return json.loads((path / "manifest.json").read_text())


def published_ids(version_dir):
    data = pd.read_parquet(version_dir / "data")
    assert not data[FIT_COLUMNS].isna().any().any()
    return np.sort(data["id"].to_numpy())


# The same crash window on S3, where a cluster shares no disk, runs by default
# (test_warehouse_cluster.py); this local-folder one runs with `make test-all`.
@pytest.mark.slow
def test_flow_killed_while_writing_leaves_the_published_version(cluster, survey, job_env, tmp_path):
    frame, source = survey
    ids = np.sort(frame["id"].to_numpy())
    dest = tmp_path / "dest"

    first = finish(start_job(job_env, "impute", cluster.address, source, dest, 0))
    name, path = published(dest)
    assert name == first["version"]
    np.testing.assert_array_equal(published_ids(path), ids)

    # another run (another seed: not the published one) killed in the middle of its writing
    proc = start_job(job_env, "impute", cluster.address, source, dest, 1)
    staged_parts = lambda: [p for p in (dest / "versions").glob("*/data/*.parquet")  # noqa: E731
                            if p.parent.parent.name != name]
    try:
        parts = wait_for(staged_parts, proc)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    staged = parts[0].parent.parent
    assert not (staged / "manifest.json").exists()  # killed before the version was complete
    assert published(dest) == (name, path)
    np.testing.assert_array_equal(published_ids(path), ids)

    # the next run publishes a new version; the leftovers of the killed one are not read
    second = finish(start_job(job_env, "impute", cluster.address, source, dest, 1))
    new_name, new_path = published(dest)
    assert new_name == second["version"] != name
    assert new_path != staged
    np.testing.assert_array_equal(published_ids(new_path), ids)  # no row lost or duplicated
    assert len(np.unique(published_ids(new_path))) == len(ids)
    np.testing.assert_array_equal(published_ids(path), ids)  # the old version is intact


# Resuming a killed fit from its checkpoint runs by default in
# test_killed_fit_resumes_from_its_checkpoint_to_the_same_model and, through a flow on S3, in
# test_warehouse_cluster.py; this flow run on a local folder runs with `make test-all`.
@pytest.mark.slow
def test_flow_killed_mid_fit_resumes_from_its_checkpoint(cluster, survey, job_env, tmp_path):
    from pipelines.versions import CHECKPOINTS

    _, source = survey
    ref_dest, dest = tmp_path / "reference", tmp_path / "dest"
    finish(start_job(job_env, "impute", cluster.address, source, ref_dest, 0))
    ref_path = published(ref_dest)[1]
    reference = emdask.load(ref_path / "model")
    ref_fit = read_manifest(ref_path)["fit"]
    assert reference.n_iter_ >= 2

    def checkpointed():
        for state in (dest / CHECKPOINTS).glob("*/model.json"):
            try:
                return emdask.load(state.parent).n_iter_ >= 1
            except Exception:  # being replaced
                return None
        return None

    proc = start_job(job_env, "impute", cluster.address, source, dest, 0, "--pause", 1.0)
    try:
        wait_for(checkpointed, proc)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert published(dest) == (None, None)  # nothing published by the killed run

    finish(start_job(job_env, "impute", cluster.address, source, dest, 0))
    path = published(dest)[1]
    model = emdask.load(path / "model")
    fit = read_manifest(path)["fit"]
    # it went on from the checkpoint: fewer passes than the uninterrupted run, same model
    assert fit["n_passes"] < ref_fit["n_passes"]
    assert model.n_iter_ == reference.n_iter_
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(model, name), getattr(reference, name),
                                   rtol=1e-10, atol=1e-12)
    pd.testing.assert_frame_equal(pd.read_parquet(path / "data"), pd.read_parquet(ref_path / "data"))
    assert not (dest / CHECKPOINTS).exists()  # removed once published
