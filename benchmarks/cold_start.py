"""The first fit on a fresh installation, against the second one.

Each case runs in a process of its own: a 2-worker ``LocalCluster`` (worker processes, one
thread each) starts, then ``GaussianMixture(3).fit`` of a 20,000 x 4 table runs twice on it.
The first fit includes everything a fresh worker does once (imports, loading the compiled
kernels); the second runs on warm workers. Cases: ``complete`` (no missing cell) and
``missing`` (20% of the cells missing completely at random). The cluster's start is not
timed. For each fit the CPU time the workers spent (which the machine's load does not
inflate, unlike the wall time) and the kernel they ran are printed: ``compiled`` (the C
kernels built with the package) or ``numpy``.

With ``--fresh-install`` the cases run in a new virtual environment into which this checkout
is installed first (``pip install .``, timed and printed): a user's first fit after
``pip install emdask``.

Targets: complete, first fit <= 10 s; missing, first fit <= 3 x second + 10 s.

    python benchmarks/cold_start.py
    python benchmarks/cold_start.py --fresh-install
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
from pathlib import Path

ROWS, COLUMNS, COMPONENTS = 20_000, 4, 3
TARGET_SECONDS = 10.0
REPO = Path(__file__).resolve().parent.parent


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
    """In a worker: the Gaussian block kernel in use, ``compiled`` (and the file of its
    module) or ``numpy``."""
    from emdask.families import _kernels

    compiled = _kernels._compiled_kernels()
    if compiled is None:
        return "numpy"
    import emdask.families._cgaussian as module

    return f"compiled ({Path(module.__file__).name})"


def describe(reports):
    kinds = sorted(set(reports.values()))
    return kinds[0] if len(kinds) == 1 else " / ".join(kinds)


def run_case(case):
    """One case, in this process (started by :func:`main`)."""
    import warnings

    from distributed import Client, LocalCluster

    from emdask import GaussianMixture

    X = table(case == "missing")
    env = {}
    if os.environ.get("EMDASK_COMPILED"):
        env["EMDASK_COMPILED"] = os.environ["EMDASK_COMPILED"]
    out = {"case": case}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, env=env) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        for which in ("first", "second"):
            cpu = client.run(cpu_seconds)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = GaussianMixture(COMPONENTS, random_state=0).fit(X)
            out[which] = time.perf_counter() - started
            out[f"{which}_cpu"] = sum(client.run(cpu_seconds).values()) - sum(cpu.values())
            out[f"{which}_kernel"] = describe(client.run(kernel_report))
            out[f"{which}_iter"] = int(model.n_iter_)
    print(json.dumps(out), flush=True)


def fresh_install(where):
    """A new virtual environment in ``where`` with this checkout installed (``pip install
    .`` of a copy without build products); returns its python and the install's seconds."""
    source = Path(where) / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
        "demo-output", "dask-worker-space"))
    venv = Path(where) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    started = time.perf_counter()
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], check=True)
    return python, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["complete", "missing"], help=argparse.SUPPRESS)
    parser.add_argument("--fresh-install", action="store_true",
                        help="run in a new virtual environment after `pip install .`")
    parser.add_argument("--numpy", action="store_true",
                        help="EMDASK_COMPILED=0: time the numpy reference instead")
    args = parser.parse_args()
    if args.case:
        run_case(args.case)
        return

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the start")
    scratch = tempfile.mkdtemp(prefix="emdask-cold-")
    try:
        python = sys.executable
        if args.fresh_install:
            python, seconds = fresh_install(scratch)
            print(f"fresh virtual environment: pip install . took {seconds:.0f} s "
                  "(dependencies from the package index or pip's cache)")
        results = {}
        for case in ("complete", "missing"):
            env = dict(os.environ)
            env.pop("PYTHONPATH", None)
            if args.numpy:
                env["EMDASK_COMPILED"] = "0"
            done = subprocess.run([python, __file__, "--case", case], env=env, cwd=scratch,
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                sys.exit(f"the {case} case failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results[case] = r
            label = "complete" if case == "complete" else "20% missing (MCAR)"
            print(f"cold start: {label} {ROWS:,} x {COLUMNS}: first fit {r['first']:.2f} s, "
                  f"second fit {r['second']:.2f} s "
                  f"(first = {r['first'] / r['second']:.1f} x second)")
            for which in ("first", "second"):
                print(f"  {which} fit: {r[f'{which}_iter']} EM iterations, workers' CPU "
                      f"{r[f'{which}_cpu']:.2f} s, kernel {r[f'{which}_kernel']}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    c, m = results["complete"], results["missing"]
    ok_c = c["first"] <= TARGET_SECONDS
    ok_m = m["first"] <= 3 * m["second"] + TARGET_SECONDS
    print(f"target complete: first fit <= {TARGET_SECONDS:.0f} s: "
          f"{'met' if ok_c else 'NOT met'} ({c['first']:.2f} s)")
    print(f"target missing: first fit <= 3 x second + {TARGET_SECONDS:.0f} s = "
          f"{3 * m['second'] + TARGET_SECONDS:.1f} s: {'met' if ok_m else 'NOT met'} "
          f"({m['first']:.2f} s)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
