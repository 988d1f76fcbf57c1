"""Kernels compiled once per installation: workers started afterwards load them from the
cache and compile nothing, so a small worker is not pushed past Dask's pause threshold by
the compiler on its first pass."""

import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from cluster_helpers import mixture_table, write_parquet_parts
from emdask import CategoricalMixture, ConvergenceWarning, GaussianMixture
from emdask.engine.cluster import connect
from emdask.families import _kernels
from emdask.warm import compile_counts, warm_kernels

pytestmark = pytest.mark.skipif(
    not _kernels.compiled_available() or not _kernels.use_compiled,
    reason="compiled kernels not in use",
)

COLUMNS = [f"x{j}" for j in range(4)]


def test_workers_load_every_kernel_from_the_cache(tmp_path):
    assert warm_kernels() is True
    frame = mixture_table(6000, n_features=4, k=2, seed=3)[COLUMNS]
    rng = np.random.default_rng(0)
    holey = frame.mask(rng.random(frame.shape) < 0.05)
    parquet = write_parquet_parts(holey, tmp_path / "t", 3)
    codes = pd.DataFrame(rng.integers(0, 4, size=(3000, 3)), columns=["a", "b", "c"])

    # 1 GiB: what a worker should have (deploy/README.md); a compile would show in the counts
    with connect(None, n_workers=1, threads_per_worker=1, memory_limit="1GiB") as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for covariance_type in ("full", "tied"):
                GaussianMixture(2, covariance_type=covariance_type, max_iter=3,
                                random_state=0).fit(holey.to_numpy())
                GaussianMixture(2, covariance_type=covariance_type, max_iter=3,
                                random_state=0).fit(dd.read_parquet(parquet))
            CategoricalMixture(2, max_iter=3, random_state=0).fit(codes)
        per_worker = client.run(compile_counts)

    (counts,) = per_worker.values()
    compiled = {name: misses for name, (hits, misses) in counts.items() if misses}
    assert compiled == {}, f"kernels compiled in the worker: {compiled}"
    loaded = {name for name, (hits, misses) in counts.items() if hits}
    assert {"emdask.families._compiled.dense_block_stats",
            "emdask.families._compiled_discrete.categorical_block_stats"} <= loaded


def test_a_pass_stops_when_every_worker_stays_paused():
    """Dask waits for ever for a paused worker; a fit says why it cannot go on instead."""
    import dask
    from distributed import Client, LocalCluster

    from emdask import WorkersPaused

    X = mixture_table(2000, n_features=4, k=2, seed=4)[COLUMNS].to_numpy()
    # a worker that pauses as soon as it starts: its process already holds 1% of 1 GiB
    with dask.config.set({"distributed.worker.memory.pause": 0.01}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               memory_limit="1GiB", host="127.0.0.1", dashboard_address=None)
    with cluster, Client(cluster):
        with dask.config.set({"emdask.paused-timeout": 3}):
            with pytest.raises(WorkersPaused, match=r"paused .* MiB of 1024 MiB.*more memory"):
                GaussianMixture(2, max_iter=3, random_state=0).fit(X)


def _features_after_import(tmp_path, env, first=""):
    """``NUMBA_CPU_FEATURES`` as a fresh interpreter sees it after importing the kernels
    (``first``: a statement run before)."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "EMDASK_WIDE_VECTORS")}
    script = (f"{first}\nimport os\nimport emdask.families._compiled_discrete\n"
              "print(os.environ.get('NUMBA_CPU_FEATURES', ''))")
    out = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_kernels_ask_for_full_width_vectors_only_on_cpus_that_have_them(tmp_path):
    import llvmlite.binding as ll

    host = ll.get_host_cpu_features()
    asked = _features_after_import(tmp_path, {})
    if host.get("avx512f"):
        assert asked == host.flatten() + ",-prefer-256-bit"
    else:
        assert asked == ""
    # the user's choice stands; after numba's own import it is too late to ask
    assert _features_after_import(tmp_path, {"EMDASK_WIDE_VECTORS": "0"}) == ""
    assert _features_after_import(tmp_path, {"NUMBA_CPU_FEATURES": "+avx2"}) == "+avx2"
    assert _features_after_import(tmp_path, {}, first="import numba") == ""
