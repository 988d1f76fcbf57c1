"""The compiled kernels are compiled once per machine, one specialisation each: processes
that need a kernel at the same time wait for the one compiling it and load it from numba's
cache; blocks of every layout share one specialisation."""

import json
import os
import subprocess
import sys
import warnings

import dask
import numpy as np
import pytest

from emdask import ConvergenceWarning, GaussianMixture
from emdask.families import _kernels

pytestmark = pytest.mark.skipif(
    not _kernels.compiled_available() or not _kernels.use_compiled,
    reason="compiled kernels not in use",
)

# A process that loads the kernels, says so, waits for the go file, then calls one kernel
# (exp_nonpositive: small, so that it compiles in about a second) and reports what numba did.
PROCESS = """
import json, os, sys, time
import numpy as np
from emdask.families import _kernels

compiled = _kernels._load_compiled()
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
rng = np.random.default_rng(int(sys.argv[2]))
q = -rng.random((3, 500)) * 50.0
expected = np.exp(q)
compiled.exp_nonpositive(q, np.empty(q.size, dtype=np.int64))
stats = compiled.exp_nonpositive.stats
print(json.dumps({"loaded": sum(stats.cache_hits.values()),
                  "compiled": sum(stats.cache_misses.values()),
                  "error": float(np.max(np.abs(q - expected) / expected))}), flush=True)
"""


def test_processes_needing_a_kernel_at_once_compile_it_once(tmp_path):
    cache = tmp_path / "numba-cache"
    go = tmp_path / "go"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(go), str(seed)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(2)]
    try:
        for p in procs:  # every process has imported numba and the kernels' module
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()  # both call the kernel now, on an empty cache
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(r["compiled"] for r in reports) == [0, 1], reports
    assert sorted(r["loaded"] for r in reports) == [0, 1], reports
    for r in reports:
        assert r["error"] < 1e-12
    assert list(cache.rglob("*exp_nonpositive*.lock"))


def test_blocks_of_every_layout_share_one_specialisation():
    """Row- and column-major blocks, read-only or not, full and tied covariances, with and
    without weights: one specialisation of the block kernel."""
    from emdask.families import _compiled

    rng = np.random.default_rng(5)
    X = rng.normal(size=(600, 3)) + np.repeat([[0.0], [5.0]], 300, axis=0)
    X[rng.random(X.shape) < 0.1] = np.nan
    blocks = []
    for block in (np.ascontiguousarray(X), np.asfortranarray(X)):
        frozen = block.copy(order="K")
        frozen.setflags(write=False)
        blocks += [block, frozen]
    weights = rng.uniform(0.5, 1.5, X.shape[0])
    for covariance_type in ("full", "tied"):
        with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm = GaussianMixture(2, covariance_type=covariance_type, max_iter=2,
                                 random_state=0).fit(X)
        family, params = gm._make_family(), gm._fitted_params()
        reference = family.partial_stats(np.ascontiguousarray(X), params, weights)
        for block in blocks:
            for w in (None, weights):
                stats = family.partial_stats(block, params, w)
                if w is not None:
                    np.testing.assert_allclose(stats.terms["s2"], reference.terms["s2"],
                                               rtol=1e-10, atol=1e-10)
    assert len(_compiled.dense_block_stats.overloads) == 1
