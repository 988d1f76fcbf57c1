"""The ``emdask`` command: run the Prefect flows from a shell.

Every command that computes runs its Prefect flow, so each run is recorded by Prefect (on
the API in ``PREFECT_API_URL``, or a local ephemeral one). EM progress appears as one log
line per iteration; a short summary follows. Bad input stops the command before any work
with a one-line error and exit status 2; a run that fails later exits with status 1; Ctrl-C
stops any command, 'emdask serve' included, within seconds, with status 130.

Before any service starts, a command checks what metadata can answer (the source's files and
their schemas, the columns, the destination, the Dask scheduler's address); only then does it
start the local Prefect API (:mod:`pipelines.lifecycle`: it dies with the command, even on
``kill -9``) and run the flow, whose first pass checks what needs the data (rows, ids).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
#: Status of a command stopped by Ctrl-C (SIGINT), as shells report a process killed by it.
EXIT_INTERRUPTED = 130


#: What the commands import beyond the emdask library (the ``pipelines`` extra): module, and
#: the package that provides it. Warehouse clients (s3fs, pyiceberg, ...) are checked where
#: a URL needs them.
REQUIRED_MODULES = (("prefect", "prefect"), ("matplotlib", "matplotlib"), ("PIL", "pillow"),
                    ("fsspec", "fsspec"))
INSTALL_PIPELINES = 'pip install "emdask[pipelines]"'


def missing_packages():
    """The packages of :data:`REQUIRED_MODULES` that cannot be imported (looked up, not
    imported: Prefect must be configured before its first import)."""
    import importlib.util

    missing = []
    for module, package in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


class CommandError(Exception):
    """An error to report in one line, with the exit status to use."""

    def __init__(self, message, status=EXIT_BAD_INPUT):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _column_list(text):
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one column name, separated by commas")
    return names


def _k_range(text):
    parts = text.replace("-", ":").split(":")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range such as 2:8") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= K_MIN <= K_MAX, e.g. 2:8")
    return lo, hi


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------


def _add_run_options(p, what="rows"):
    g = p.add_argument_group("run")
    g.add_argument("--max-iter", type=_positive_int, default=100, metavar="N",
                   help="maximum EM iterations (default: 100)")
    g.add_argument("--tol", type=_positive_float, default=1e-3,
                   help=f"stop when the mean log-likelihood per {what[:-1]} changes less than "
                        "this (default: 1e-3)")
    g.add_argument("--seed", type=_non_negative_int, default=0,
                   help="random seed; the same seed on the same data gives the same output "
                        "(default: 0)")
    g.add_argument("--dask-address", metavar="ADDRESS",
                   help="Dask scheduler, e.g. tcp://host:8786 (default: $DASK_SCHEDULER_ADDRESS, "
                        "else a local cluster on 127.0.0.1 for the run)")
    g.add_argument("--keep-versions", type=_positive_int, default=5, metavar="N",
                   help="published versions to keep in the destination (default: 5)")
    g.add_argument("--force", action="store_true",
                   help="recompute even when the published version already holds this run "
                        "(same source and parameters)")
    g.add_argument("--storage-option", dest="storage_options", action="append",
                   type=_key_value, default=None, metavar="KEY=VALUE",
                   help="fsspec option for object-store URLs, e.g. endpoint_url=http://... or "
                        "anon=true (repeatable); credentials belong in the environment "
                        "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*), not here")


def _key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    try:
        return key.strip(), int(value)
    except ValueError:
        pass
    try:
        return key.strip(), float(value)
    except ValueError:
        return key.strip(), value


SOURCE_FORMS = """source forms (never modified):
  PATH | file://PATH             Parquet dataset (directory, .parquet file, glob) or CSV file(s)
  s3://B/P, gs://B/P, abfs://C/P the same on object storage (any fsspec URL)
  iceberg://CATALOG/NS.TABLE     an Apache Iceberg table (add @SNAPSHOT_ID for an older snapshot);
                                 the catalog comes from PYICEBERG_CATALOG__CATALOG__URI or .pyiceberg.yaml
  PATH_OR_URL (holding _delta_log/)  a Delta Lake table (add @VERSION for an older version)
  postgresql://USER@HOST:PORT/DB?table=SCHEMA.TABLE  (or ?query=SELECT...; &partition_on=COLUMN,
                                 &partitions=N, &watermark=W for idempotent re-runs); password
                                 from PGPASSWORD or ~/.pgpass
"""

DEST_FORMS = """destination forms (a run publishes one new version, in one step):
  PATH | file://PATH             a folder of versions; CURRENT names the published one
  s3://B/P, gs://B/P             the same on object storage; CURRENT replaced by a conditional write
  iceberg://CATALOG/NS.TABLE     a new snapshot of the table (created if missing)
  PATH_OR_URL (holding _delta_log/), delta+PATH_OR_URL for a new table
                                 a new version of a Delta Lake table
"""


def _add_k_options(p, default_range="2:8"):
    g = p.add_mutually_exclusive_group()
    g.add_argument("-k", "--components", type=_positive_int, metavar="K",
                   help="number of segments (default: chosen by BIC among --k-range)")
    g.add_argument("--k-range", type=_k_range, default=None, metavar="K_MIN:K_MAX",
                   help=f"numbers of segments to try, all fitted in shared passes "
                        f"(default: {default_range})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="emdask",
        description="EM on tables too large for one machine: Prefect flows over Dask.",
        epilog="Each command runs a Prefect flow; runs are recorded by the Prefect API in "
               "PREFECT_API_URL, or by a local ephemeral one. 'emdask COMMAND --help' "
               "documents each command. Exit status: 0 done, 1 the run failed, 2 bad input "
               "(found before any work), 130 stopped by Ctrl-C. The commands need "
               f"Prefect, matplotlib and pillow: {INSTALL_PIPELINES}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # impute --------------------------------------------------------------------------
    p = sub.add_parser(
        "impute", help="fill the missing cells of a table; publish a new version of DEST",
        description="Fit a mixture by EM on the incomplete table, fill every missing cell of "
                    "the modelled columns (observed cells stay as they are), validate, and "
                    "publish a new version of DEST atomically.",
        epilog=SOURCE_FORMS + "\n" + DEST_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE",
                   help="table to read: a path or URL (forms below); never modified")
    p.add_argument("dest", metavar="DEST", help="where to publish: a folder, object-store or "
                   "table URL (forms below)")
    p.add_argument("--id", dest="id_column", required=True, metavar="COLUMN",
                   help="column identifying rows (present and unique)")
    p.add_argument("--columns", type=_column_list, metavar="A,B,...",
                   help="columns to model and fill (default: every numeric, boolean and "
                        "categorical column except the id)")
    p.add_argument("-k", "--components", type=_positive_int, default=1, metavar="K",
                   help="mixture components (default: 1, one multivariate normal)")
    p.add_argument("--covariance", choices=["full", "diag", "tied", "spherical"], default="full",
                   help="covariance of the numeric columns within a component (default: full)")
    p.add_argument("--multiple", type=_positive_int, metavar="M",
                   help="write M completed copies drawn from the model (multiple imputation) "
                        "instead of the conditional-mean fill")
    _add_algorithm_option(p)
    _add_run_options(p)

    # segment -------------------------------------------------------------------------
    p = sub.add_parser(
        "segment", help="segment the rows of a table; publish a new version of DEST",
        description="Fit a mixture model (the number of segments given, or chosen by an "
                    "information criterion) and publish every row's segment and membership "
                    "probabilities, with a per-segment profile, as a new version of DEST.",
        epilog=SOURCE_FORMS + "\n" + DEST_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE",
                   help="table to read: a path or URL (forms below); never modified")
    p.add_argument("dest", metavar="DEST", help="where to publish: a folder, object-store or "
                   "table URL (forms below)")
    p.add_argument("--id", dest="id_column", required=True, metavar="COLUMN",
                   help="column identifying rows (present and unique)")
    p.add_argument("--features", type=_column_list, metavar="A,B,...",
                   help="columns to segment on (default: every numeric, boolean and "
                        "categorical column except the id)")
    _add_k_options(p)
    p.add_argument("--criterion", choices=["bic", "aic", "icl"], default="bic",
                   help="criterion choosing the number of segments (default: bic)")
    p.add_argument("--family", choices=["auto", "gaussian", "mixed"], default="auto",
                   help="gaussian: numeric features; mixed: a family per column (Gaussian, "
                        "Poisson, Bernoulli, categorical); auto: mixed when a feature is "
                        "categorical or boolean (default: auto)")
    p.add_argument("--covariance", choices=["full", "diag", "tied", "spherical"], default="full",
                   help="covariance of the numeric features within a segment (default: full)")
    p.add_argument("--scale", action="store_true",
                   help="standardize numeric features before fitting (profiles stay in "
                        "original units)")
    p.add_argument("--n-init", type=_positive_int, default=1, metavar="N",
                   help="restarts per number of segments; the best is kept (default: 1)")
    _add_algorithm_option(p)
    _add_run_options(p)

    # segment-image -------------------------------------------------------------------
    p = sub.add_parser(
        "segment-image", help="segment an image by colour; publish the labelled image in OUT",
        description="Fit a Gaussian mixture on the pixels of an image (as a chunked Dask "
                    "array) and publish the image in segment mean colours (segments.png) and "
                    "the label array (labels.npy) as a new version of OUT.",
    )
    p.add_argument("image", metavar="IN", help="PNG or JPEG image: a path or an object-store URL")
    p.add_argument("out", metavar="OUT", help="folder to publish versions in: a path or an "
                   "object-store URL (s3://, gs://, ...)")
    _add_k_options(p, "2:8")
    p.add_argument("--position", action="store_true",
                   help="add each pixel's x and y to its colour, for spatially coherent segments")
    p.add_argument("--position-weight", type=_positive_float, default=1.0, metavar="W",
                   help="weight of position against colour with --position (default: 1.0)")
    p.add_argument("--covariance", choices=["full", "diag", "tied", "spherical"], default="full",
                   help="covariance of the pixel features within a segment (default: full)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                   help="largest image (width x height) to take, checked from the header before "
                        "any work; raise it for trusted images (default: Pillow's "
                        "Image.MAX_IMAGE_PIXELS, 89478485)")
    _add_run_options(p, what="pixels")

    # coin, demo, serve ----------------------------------------------------------------
    sub.add_parser(
        "coin", help="print the EM traces of the coin examples",
        description="EM step by step on a coin with lost flips and on two coins of unknown "
                    "bias, run as a Prefect flow.",
    )

    p = sub.add_parser(
        "demo", help="generate example data and run all three flows on a local cluster",
        description="Generate a survey table with missing answers, a customer table and an "
                    "image under OUTPUT, run the three flows on a local Dask cluster, and print "
                    "where the outputs, plots and model files are.",
    )
    p.add_argument("--output", default="demo-output", metavar="DIR",
                   help="directory for the data and outputs (default: demo-output)")
    p.add_argument("--customers", type=_positive_int, default=1_000_000, metavar="N",
                   help="rows of the customer table (default: 1000000)")
    p.add_argument("--survey-rows", type=_positive_int, default=100_000, metavar="N",
                   help="rows of the survey table (default: 100000)")
    p.add_argument("--image-size", default="1600x1000", metavar="WxH",
                   help="size of the generated image (default: 1600x1000)")

    p = sub.add_parser(
        "serve", help="serve the scheduled deployments from one process",
        description="Serve the deployments of a prefect.yaml file (nightly imputation, weekly "
                    "segmentation, ...) with their cron schedules until interrupted; runs can "
                    "also be triggered from the Prefect UI or 'prefect deployment run'.",
    )
    p.add_argument("--config", metavar="PATH", default=None,
                   help="deployment file (default: deploy/prefect.yaml in the working "
                        "directory, else the project's)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="serve only this deployment (repeatable)")
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="most flow runs executed at once (default: no limit)")
    return parser


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def _add_algorithm_option(p):
    p.add_argument("--algorithm", choices=["em", "squarem"], default="squarem",
                   help="squarem: EM accelerated by SQUAREM, the same model in fewer passes over "
                        "the table; em: plain EM (default: squarem)")


def _k_arguments(args):
    if args.components is not None:
        return {"n_components": args.components}
    lo, hi = args.k_range or (2, 8)
    return {"n_components": None, "k_min": lo, "k_max": hi}


def _run_options(args):
    return dict(max_iter=args.max_iter, tol=args.tol, random_state=args.seed,
                dask_address=args.dask_address, keep_versions=args.keep_versions,
                force=args.force,
                storage_options=dict(args.storage_options) if args.storage_options else None)


def _start_prefect_api():
    """Start the local Prefect API (when no PREFECT_API_URL is set) guarded to die with this
    process; see :mod:`pipelines.lifecycle`."""
    from .lifecycle import LocalApiError, start_local_api

    try:
        start_local_api()
    except LocalApiError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None


def _run_flow(flow_fn, check, kwargs):
    """Validate the parameters as Prefect does and check the inputs (metadata, destination,
    scheduler), before any service starts; then start the Prefect API and run the flow."""
    from prefect.exceptions import ParameterTypeError

    from .cluster import check_scheduler
    from .errors import InputError, redact

    try:
        flow_fn.validate_parameters(kwargs)
    except ParameterTypeError as exc:
        raise CommandError(_first_line(exc)) from None
    try:
        check(**kwargs)
        check_scheduler(kwargs.get("dask_address"))
    except InputError as exc:
        raise CommandError(redact(str(exc))) from None
    _start_prefect_api()
    try:
        return flow_fn(**kwargs)
    except InputError as exc:
        raise CommandError(redact(str(exc))) from None
    except Exception as exc:
        raise CommandError(f"the run failed: {_first_line(exc)}", EXIT_FAILED) from exc


def _first_line(exc):
    from .errors import redact

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return redact(f"{type(exc).__name__}: {' '.join(lines[:2])}" if lines else type(exc).__name__)


def _print_paths(summary, out):
    for label, value in summary:
        if value:
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                out(f"  {(label + ':') if i == 0 else '':<8} {v}")


def _published(summary):
    where = summary.get("table") or summary["path"]
    if summary.get("up_to_date"):
        return f"already published in {where} (same source and parameters); nothing to do"
    return f"published {where}" + (f" (version {summary['version']})" if summary.get("table") else "")


def _status(summary):
    state = "converged" if summary["converged"] else "not converged"
    return f"{summary['n_iter']} EM iterations ({state})"


def cmd_impute(args, out):
    from . import impute

    kwargs = dict(source=args.source, dest=args.dest, id_column=args.id_column,
                  columns=args.columns, n_components=args.components,
                  covariance_type=args.covariance,
                  method="multiple" if args.multiple else "mean",
                  n_imputations=args.multiple or 5, algorithm=args.algorithm,
                  **_run_options(args))
    s = _run_flow(impute.impute_survey, impute.check_inputs, kwargs)
    filled = sum(1 for c in s["columns"] if s["missing_before"][c])
    out(f"impute-survey: {_published(s)}")
    out(f"  {s['rows']:,} rows; {s['filled_cells']:,} cells filled in {filled} column(s); "
        f"{s['model']} k={s['n_components']}; {_status(s)}; {s['seconds']:.1f} s")
    _print_paths([("tables", s["tables"]), ("model", s["model_path"]), ("plots", s["plots"])], out)


def cmd_segment(args, out):
    from . import segment

    kwargs = dict(source=args.source, dest=args.dest, id_column=args.id_column,
                  features=args.features, criterion=args.criterion, family=args.family,
                  covariance_type=args.covariance, scale=args.scale, n_init=args.n_init,
                  algorithm=args.algorithm, **_k_arguments(args), **_run_options(args))
    s = _run_flow(segment.segment_customers, segment.check_inputs, kwargs)
    chosen = (f"k={s['n_components']} chosen by {s['criterion'].upper()} among "
              f"{s['searched'][0]}..{s['searched'][-1]}" if s["searched"] else f"k={s['n_components']}")
    out(f"segment-customers: {_published(s)}")
    out(f"  {s['rows']:,} rows; {s['model']} {chosen}; {_status(s)}; {s['seconds']:.1f} s")
    out(f"  rows per segment: {s['counts']}")
    _print_paths([("tables", s["tables"]), ("model", s["model_path"]), ("plots", s["plots"])], out)


def cmd_segment_image(args, out):
    from . import image

    kwargs = dict(image=args.image, out=args.out, position=args.position,
                  position_weight=args.position_weight, covariance_type=args.covariance,
                  max_pixels=args.max_pixels, **_k_arguments(args), **_run_options(args))
    s = _run_flow(image.segment_image, image.check_inputs, kwargs)
    chosen = (f"k={s['n_components']} chosen by BIC among {s['searched'][0]}..{s['searched'][-1]}"
              if s["searched"] else f"k={s['n_components']}")
    out(f"segment-image: {_published(s)}")
    out(f"  {s['width']}x{s['height']} ({s['pixels']:,} pixels); {chosen}; {_status(s)}; "
        f"{s['seconds']:.1f} s")
    _print_paths([("image", s["image"]), ("labels", s["labels"]), ("model", s["model_path"]),
                  ("plots", s["plots"])], out)


def cmd_coin(args, out):
    from .coin import coin_examples

    _start_prefect_api()
    try:
        text = coin_examples()
    except Exception as exc:
        raise CommandError(f"the run failed: {_first_line(exc)}", EXIT_FAILED) from exc
    out(text)


def cmd_demo(args, out):
    from . import demo

    try:
        size = tuple(int(v) for v in args.image_size.lower().split("x"))
        if len(size) != 2 or min(size) < 2:
            raise ValueError
    except ValueError:
        raise CommandError(f"--image-size {args.image_size!r} is not WIDTHxHEIGHT, e.g. 1600x1000") from None
    demo.prepare_environment(args.output)  # the demo's Prefect database, before its API starts
    _start_prefect_api()
    demo.run_demo(args.output, customers=args.customers, survey_rows=args.survey_rows,
                  image_size=size, out=out)


def cmd_serve(args, out):
    from . import serve

    try:
        specs = serve.load_config(args.config)
    except serve.ConfigError as exc:
        raise CommandError(str(exc)) from None
    names = ", ".join(s.name for s in specs if not args.only or s.name in args.only)
    from .lifecycle import serving

    serving()  # the flow runs it starts die with it, even on kill -9
    _start_prefect_api()
    out(f"serving {names} (Ctrl-C to stop)")
    try:
        serve.serve(args.config, only=args.only, limit=args.limit)
    except serve.ConfigError as exc:
        raise CommandError(str(exc)) from None
    # Prefect's serve returns only once interrupted (it catches the KeyboardInterrupt)
    raise KeyboardInterrupt


COMMANDS = {
    "impute": cmd_impute,
    "segment": cmd_segment,
    "segment-image": cmd_segment_image,
    "coin": cmd_coin,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


def _leave_interrupted(status):
    """End the program at once after Ctrl-C: the exit handlers run (Prefect records what it
    still has to and stops its local API; logs are flushed), the interpreter's teardown, which
    takes seconds once Prefect is loaded, does not. A second Ctrl-C is ignored meanwhile."""
    import atexit
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def main(argv=None):
    """Entry point of the ``emdask`` console script; returns the exit status.

    0: done; 1: the run failed; 2: bad input, found before any work (one line on stderr);
    130: stopped by Ctrl-C (SIGINT), for every command ('emdask serve' runs until then).
    """
    from .lifecycle import configure_environment

    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_packages()
    if missing:  # before any work: the run would fail at its first plot or flow
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        print(f"emdask {args.command}: error: the emdask command needs {names}, which "
              f"{'are' if len(missing) > 1 else 'is'} not installed: {INSTALL_PIPELINES}",
              file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    configure_environment()  # before Prefect is imported: its settings read the environment

    def out(line):
        print(line, flush=True)

    try:
        COMMANDS[args.command](args, out)
    except CommandError as exc:
        print(f"emdask {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.status
    except KeyboardInterrupt:
        print(f"emdask {args.command}: interrupted", file=sys.stderr, flush=True)
        if argv is None:  # the program itself (not a caller passing arguments): leave now
            _leave_interrupted(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
