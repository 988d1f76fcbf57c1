"""Jobs that tests run in processes of their own, so that they can be killed outright.

    python cluster_jobs.py fit ADDRESS SOURCE CHECKPOINT OUT [--pause SECONDS]
    python cluster_jobs.py impute ADDRESS SOURCE DEST SEED [--pause SECONDS]

``fit`` fits a GaussianMixture on a Parquet table through the cluster at ADDRESS with a
checkpoint after every iteration (resuming from it when it exists) and saves the model to
OUT. ``impute`` runs the imputation flow (``--pause`` slows its EM iterations down, to leave
the test a window to kill it mid-fit). Arguments are passed as a list, never through a
shell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

FIT = dict(n_components=3, max_iter=10, tol=0, random_state=4, persist=True)
FIT_COLUMNS = [f"x{j}" for j in range(5)]


def fit_model():
    from emdask import GaussianMixture

    return GaussianMixture(**FIT)


def run_fit(address, source, checkpoint, out, pause):
    import dask.dataframe as dd

    from emdask import ConvergenceWarning
    from emdask.engine.cluster import connect

    def slow(info):  # leaves a window between checkpoints for the test to kill this process
        time.sleep(pause)

    with connect(address, timeout=30), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = fit_model().fit(
            dd.read_parquet(source), columns=FIT_COLUMNS, checkpoint=checkpoint, resume=True,
            callbacks=[slow],
        )
    model.save(out)
    print(json.dumps({"n_iter": model.n_iter_, "n_passes": model.n_passes_}))


def run_impute(address, source, dest, seed, pause=0.0):
    import pipelines.impute
    from pipelines.impute import impute_survey

    if pause:
        logged = pipelines.impute.progress_callback

        def slow_progress(*args, **kwargs):
            log = logged(*args, **kwargs)

            def callback(info):
                log(info)
                time.sleep(pause)

            return callback

        pipelines.impute.progress_callback = slow_progress

    summary = impute_survey(
        source=source, dest=dest, id_column="id", dask_address=address, random_state=seed,
        max_iter=5,
    )
    print(json.dumps({"version": summary["version"]}))


def main(argv=None):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="job", required=True)
    f = sub.add_parser("fit")
    f.add_argument("address")
    f.add_argument("source")
    f.add_argument("checkpoint")
    f.add_argument("out")
    f.add_argument("--pause", type=float, default=0.0)
    i = sub.add_parser("impute")
    i.add_argument("address")
    i.add_argument("source")
    i.add_argument("dest")
    i.add_argument("seed", type=int)
    i.add_argument("--pause", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.job == "fit":
        run_fit(args.address, args.source, args.checkpoint, args.out, args.pause)
    else:
        run_impute(args.address, args.source, args.dest, args.seed, args.pause)


if __name__ == "__main__":
    sys.exit(main())
