"""How often does a restart reach the best optimum? Old default start vs new, per family.

For each family and public data set, ``SEEDS`` x ``RESTARTS`` single restarts (restart ``r``
of seed ``s`` is the fit with ``random_state = 1000 s + r``, exactly what ``n_init=20``
runs) from every ``init_params``; a restart *reaches* the best known optimum when its
log-likelihood is within 1e-6 (relative) of the best of all restarts of all starts (for
epil, also the published flexmix optimum, -779.603). Printed per start: the share of
restarts that reach it, the share of seeds whose best of ``RESTARTS`` reaches it, and the
mean passes over the data per restart (summary + start + EM).

Run: ``python benchmarks/starts.py`` (a few minutes on 2 cores; no cluster: the data sets
are small and the question is statistical).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd

import emdask

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SEEDS = 10
RESTARTS = 20
STARTS = ("random_from_data", "random", "k-means++")
OLD_DEFAULT = "random_from_data"
REL = 1e-6


def survey_frame():
    # "None" is a level of Exer: only empty cells are missing
    return pd.read_csv(DATA / "survey.csv", keep_default_na=False, na_values=[""])


def cases():
    epil = pd.read_csv(DATA / "epil.csv").drop(columns="subject").to_numpy(float)
    lsat6 = pd.read_csv(DATA / "lsat6.csv").to_numpy(float)
    survey = survey_frame()
    categorical = survey[["Sex", "W.Hnd", "Fold", "Clap", "Exer", "Smoke", "M.I"]].astype("category")
    mixed = survey.copy()
    for c in categorical.columns:
        mixed[c] = mixed[c].astype("category")
    return [
        ("PoissonMixture k=3, epil (59 x 4)", emdask.PoissonMixture, 3, epil, {}),
        ("BernoulliMixture k=3, lsat6 (1000 x 5)", emdask.BernoulliMixture, 3, lsat6, {}),
        ("CategoricalMixture k=3, MASS survey (237 x 7)", emdask.CategoricalMixture, 3,
         categorical, {}),
        ("MixedMixture k=3, MASS survey (237 x 12)", emdask.MixedMixture, 3, mixed, {}),
    ]


def run_case(cls, k, X, extra):
    out = {}
    for start in STARTS:
        lls = np.empty((SEEDS, RESTARTS))
        passes = np.empty((SEEDS, RESTARTS))
        for s in range(SEEDS):
            for r in range(RESTARTS):
                model = cls(k, init_params=start, random_state=1000 * s + r, tol=1e-9,
                            max_iter=2000, **extra).fit(X)
                n = len(X)
                lls[s, r] = model.lower_bound_ * n
                passes[s, r] = model.n_passes_
        out[start] = (lls, passes)
    return out


def main():
    warnings.simplefilter("ignore")
    dask.config.set(scheduler="synchronous")
    started = time.perf_counter()
    print(f"share of restarts reaching the best known log-likelihood (within {REL:g} relative); "
          f"{SEEDS} seeds x n_init={RESTARTS}")
    for name, cls, k, X, extra in cases():
        results = run_case(cls, k, X, extra)
        best = max(lls.max() for lls, _ in results.values())
        if "epil" in name:
            best = max(best, -779.603)
        print(f"{name}: best log-likelihood {best:.3f}")
        for start, (lls, passes) in results.items():
            hit = lls >= best - REL * abs(best)
            mark = " (old default)" if start == OLD_DEFAULT else ""
            print(
                f"  {start:<17s} restarts {hit.mean():6.1%}   best of {RESTARTS} "
                f"{hit.any(axis=1).mean():6.1%} of seeds   passes/restart "
                f"{passes.mean():6.1f}{mark}"
            )
        sys.stdout.flush()
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
