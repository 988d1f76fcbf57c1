"""The first fit on a machine whose kernel cache is empty, against the second one.

Each case runs in a process of its own with an empty numba cache (a fresh temporary
``NUMBA_CACHE_DIR``, handed to the client and to the workers): a 2-worker ``LocalCluster``
(worker processes, one thread each) starts, then ``GaussianMixture(3).fit`` of a
20,000 x 4 table runs twice on it. The first fit includes compiling the kernels (or loading
them from the cache another worker of the machine filled); the second runs them. Cases:
``complete`` (no missing cell) and ``missing`` (20% of the cells missing completely at random).
The cluster's start is not timed. For each fit the CPU time the workers spent (which the
machine's load does not inflate, unlike the wall time) and the kernel they ran are printed:
``compiled`` (with, per worker, whether it compiled the kernel or loaded it from the cache)
or ``numpy``.

Targets: complete, first fit <= 10 s; missing, first fit <= 3 x second + 10 s.

    python benchmarks/cold_start.py
    python benchmarks/cold_start.py --numpy      # EMDASK_COMPILED=0: the numpy reference
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROWS, COLUMNS, COMPONENTS = 20_000, 4, 3
TARGET_SECONDS = 10.0


def table(missing, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 4.0, (COMPONENTS, COLUMNS))
    labels = rng.integers(0, COMPONENTS, ROWS)
    X = means[labels] + rng.normal(size=(ROWS, COLUMNS))
    if missing:
        X[rng.random(X.shape) < 0.2] = np.nan
    return X


def cpu_seconds():
    """CPU time of this process (a worker: all its threads), seconds."""
    return time.process_time()


def kernel_report():
    """In a worker: whether the compiled kernels are in use, and for the Gaussian block
    kernel, how many specialisations this process loaded from the cache and compiled."""
    from emdask.families import _kernels

    compiled = _kernels._compiled_kernels()
    if compiled is None:
        return {"compiled": False, "loaded": 0, "compiled_here": 0}
    stats = compiled.dense_block_stats.stats
    return {"compiled": True, "loaded": sum(stats.cache_hits.values()),
            "compiled_here": sum(stats.cache_misses.values())}


def describe(before, after):
    """``compiled (...)`` or ``numpy``, from the workers' :func:`kernel_report` before and
    after a fit: the kernel the workers run, and how often the compiled one was compiled or
    loaded from the cache during the fit."""
    if not all(r["compiled"] for r in after.values()):
        return "numpy"
    built = sum(r["compiled_here"] - before[w]["compiled_here"] for w, r in after.items())
    loaded = sum(r["loaded"] - before[w]["loaded"] for w, r in after.items())
    ready = sum(1 for r in after.values() if r["compiled_here"] or r["loaded"])
    return (f"compiled (during this fit compiled {built} time(s) and loaded from the cache "
            f"{loaded} time(s) on the machine; in memory in {ready} of {len(after)} workers)")


def run_case(case, cache):
    """One case, in this process (started by :func:`main` with an empty ``cache``)."""
    import warnings

    from distributed import Client, LocalCluster

    from emdask import GaussianMixture

    X = table(case == "missing")
    env = {"NUMBA_CACHE_DIR": cache}
    if os.environ.get("EMDASK_COMPILED"):
        env["EMDASK_COMPILED"] = os.environ["EMDASK_COMPILED"]
    out = {"case": case}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, env=env) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        # fresh workers: nothing imported, compiled or loaded (asking them would import the
        # kernels before the first fit)
        before = {w: {"compiled": True, "loaded": 0, "compiled_here": 0}
                  for w in client.scheduler_info()["workers"]}
        for which in ("first", "second"):
            cpu = client.run(cpu_seconds)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = GaussianMixture(COMPONENTS, random_state=0).fit(X)
            out[which] = time.perf_counter() - started
            out[f"{which}_cpu"] = sum(client.run(cpu_seconds).values()) - sum(cpu.values())
            after = client.run(kernel_report)
            out[f"{which}_kernel"] = describe(before, after)
            before = after
            out[f"{which}_iter"] = int(model.n_iter_)
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["complete", "missing"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--numpy", action="store_true",
                        help="EMDASK_COMPILED=0: time the numpy reference instead")
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.cache)
        return

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the start")
    results = {}
    for case in ("complete", "missing"):
        cache = tempfile.mkdtemp(prefix="emdask-cold-cache-")
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        if args.numpy:
            env["EMDASK_COMPILED"] = "0"
        try:
            done = subprocess.run([sys.executable, __file__, "--case", case, "--cache", cache],
                                  env=env, capture_output=True, text=True, timeout=1800)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if done.returncode != 0:
            sys.exit(f"the {case} case failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[case] = r
        label = "complete" if case == "complete" else "20% missing (MCAR)"
        print(f"cold start: {label} {ROWS:,} x {COLUMNS}: first fit {r['first']:.1f} s, "
              f"second fit {r['second']:.2f} s (first = {r['first'] / r['second']:.0f} x second)")
        for which in ("first", "second"):
            print(f"  {which} fit: {r[f'{which}_iter']} EM iterations, workers' CPU "
                  f"{r[f'{which}_cpu']:.1f} s, kernel {r[f'{which}_kernel']}")
    c, m = results["complete"], results["missing"]
    ok_c = c["first"] <= TARGET_SECONDS
    ok_m = m["first"] <= 3 * m["second"] + TARGET_SECONDS
    print(f"target complete: first fit <= {TARGET_SECONDS:.0f} s: "
          f"{'met' if ok_c else 'NOT met'} ({c['first']:.1f} s)")
    print(f"target missing: first fit <= 3 x second + {TARGET_SECONDS:.0f} s = "
          f"{3 * m['second'] + TARGET_SECONDS:.1f} s: {'met' if ok_m else 'NOT met'} "
          f"({m['first']:.1f} s)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
