"""Prefect tasks every flow shares: profile, plot, commit, report.

Tasks take and return URLs, paths and small objects; tables stay in the warehouse and on the
Dask cluster. Only input/output tasks retry, and only on I/O errors (:func:`is_transient`):
never on bad input (:class:`InputError`), output that fails validation
(:class:`ValidationError`) or any other deterministic error. Those end the run with a one-line
log record, no traceback.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import asdict, dataclass, field

import prefect.exceptions
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import emdask
from emdask.engine import format_iteration

from . import reports, validation
from .errors import InputError, ValidationError
from .sources import filesystem, storage_options_for
from .versions import ConcurrentCommitError

__all__ = [
    "DETERMINISTIC",
    "FitResult",
    "base_manifest",
    "commit_version",
    "convergence_bar",
    "io_task",
    "is_transient",
    "load_model",
    "parquet_writes",
    "plot_convergence",
    "profile_source",
    "progress_callback",
    "report_run",
    "save_model",
    "step_task",
    "up_to_date",
]


#: Failures that a second attempt meets again: bad input, output that fails its checks, a
#: destination another run changed. Never retried; logged in one line, without a traceback.
DETERMINISTIC = (InputError, ValidationError, ConcurrentCommitError)
#: OS errors that say something about the input or the machine, not the moment.
_LASTING_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                      PermissionError)
_LASTING_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENAMETOOLONG", "EFBIG") if hasattr(errno, name))
#: Errors of network clients (botocore, aiohttp, Google's, httpx, urllib3, http.client) that
#: are not OSErrors, named so that none of those packages needs importing.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ServerDisconnectedError", "ClientPayloadError", "ServiceUnavailable", "TooManyRequests",
    "InternalServerError", "BadGateway", "GatewayTimeout", "RemoteProtocolError", "ProtocolError",
    "IncompleteRead",
})


def is_transient(exc):
    """Whether ``exc`` is an I/O failure (of the network, a store, a worker's connection) that a
    second attempt may well not meet; bad input, bugs and a full disk are not."""
    if isinstance(exc, DETERMINISTIC):
        return False
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, socket and store errors
        return not isinstance(exc, _LASTING_OS_ERRORS) and exc.errno not in _LASTING_ERRNOS
    return any(k.__name__ in _TRANSIENT_NAMES for k in type(exc).__mro__)


def _retry_io_errors(task, task_run, state):
    """Prefect's retry condition of :func:`io_task`: retry I/O errors, nothing else."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as raised:  # a result that cannot be read: the exception itself
            exc = raised
    return isinstance(exc, BaseException) and is_transient(exc)


#: Interrupts: Ctrl-C, and the SIGTERM Prefect's runner stops a flow run with.
_INTERRUPTS = (KeyboardInterrupt, getattr(prefect.exceptions, "TerminationSignal", KeyboardInterrupt))


class _OneLineFailures(logging.Filter):
    """Prefect logs the exception that ends a flow or task run with its traceback; a
    deterministic failure's message says all there is, and so does an interrupt's ("aborted
    by an interrupt signal"): their tracebacks are left out."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DETERMINISTIC + _INTERRUPTS):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_expected_failures():
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineFailures) for f in logger.filters):
            logger.addFilter(_OneLineFailures())


_quiet_expected_failures()


def io_task(fn=None, **kwargs):
    """``@task`` for reading and writing: a few retries of I/O errors (:func:`is_transient`),
    never cached."""
    options = dict(
        retries=2,
        retry_delay_seconds=2,
        retry_condition_fn=_retry_io_errors,
        cache_policy=NO_CACHE,
    )
    options.update(kwargs)
    return task(fn, **options) if fn is not None else task(**options)


def step_task(fn=None, **kwargs):
    """``@task`` for computing steps: no retries (a failed fit is not transient), never cached."""
    options = dict(cache_policy=NO_CACHE)
    options.update(kwargs)
    return task(fn, **options) if fn is not None else task(**options)


@dataclass
class FitResult:
    """What a fit left behind: the model file and the history the reports need."""

    model_path: str
    model_class: str
    n_components: int
    n_iter: int
    converged: bool
    lower_bounds: list
    seconds: float
    n_passes: int = 0
    selection: list = field(default_factory=list)  # one dict per candidate k when k was searched

    def to_dict(self):
        return asdict(self)


def convergence_bar(first_change, change, tol, width=20):
    """A text bar of how far EM has come toward convergence.

    Progress is measured on the log scale of the change in mean log-likelihood: from the
    first finite change (0%) down to ``tol`` (100%), as EM's changes shrink geometrically.
    """
    import math

    if not math.isfinite(change) or first_change is None:
        done = 0.0
    elif abs(change) < tol:
        done = 1.0
    elif abs(first_change) <= tol or abs(change) >= abs(first_change):
        done = 0.0
    else:
        done = math.log(abs(first_change) / abs(change)) / math.log(abs(first_change) / tol)
    done = min(max(done, 0.0), 1.0)
    filled = round(done * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done:4.0%}"


def progress_callback(label="", tol=None):
    """A fit callback that logs one line per EM iteration (iteration, log-likelihood, change,
    time), led by a bar of the progress toward convergence when ``tol`` is given."""
    logger = get_run_logger()
    prefix = f"{label} " if label else ""
    first = {}

    def callback(info):
        bar = ""
        if tol is not None:
            if info.model not in first and abs(info.change) != float("inf"):
                first[info.model] = info.change
            bar = convergence_bar(first.get(info.model), info.change, tol) + " "
        logger.info(prefix + bar + format_iteration(info))

    return callback


def save_model(model, path):
    """Write a fitted estimator as a model file (JSON + .npz) at ``path``; returns the path."""
    return str(emdask.save(model, path))


def load_model(path, model_class=None):
    """Read a model file written by :func:`save_model`."""
    model = emdask.load(path)
    if model_class is not None and type(model).__name__ != model_class:
        raise ValueError(f"{path} holds a {type(model).__name__}, not a {model_class}")
    return model


def up_to_date(destination, key):
    """The published version when it already holds this exact run, else None (logged)."""
    found = destination.find(key)
    if found is not None:
        destination.clean_up()  # what ended runs left, as a run that computes would
        destination.drop_checkpoint(key)  # left by a run killed right after its commit
        get_run_logger().info(
            f"{found.url} already holds this run (same source and parameters); nothing to do. "
            "Pass force=True to recompute."
        )
    return found


@io_task
def profile_source(source, id_column: str, columns: list, components: tuple | None = None
                   ) -> validation.TableProfile:
    """Count rows and missing cells, check the ids are present and unique and the columns
    modellable; ``components``: (largest number asked, its parameter's name), checked against
    the rows."""
    profile = validation.profile_table(source, id_column, columns)
    if components is not None:
        validation.check_components(profile, *components)
    rates = ", ".join(f"{c} {r:.1%}" for c, r in profile.missing_rate().items() if r)
    get_run_logger().info(
        f"{profile.rows:,} rows in {profile.partitions} partitions; missing: {rates or 'none'}"
    )
    return profile


@io_task
def plot_convergence(path: str, lower_bounds: list, title: str) -> str:
    """Plot the mean log-likelihood per EM iteration to a PNG."""
    return str(reports.convergence_plot(path, lower_bounds, title=title))


@io_task
def commit_version(version, manifest: dict):
    """Write the manifest and make the new version visible in one step.

    A commit is idempotent (:meth:`pipelines.versions.Version.commit`): a retry after an I/O
    error, even one that hid whether the visible step took effect, publishes the version once.
    """
    published = version.commit(manifest)
    where = f"{published.table} (sidecar {published.url})" if published.table else published.url
    get_run_logger().info(f"published version {published.name} to {where}")
    return published


@step_task
def report_run(key: str, title: str, facts: dict, tables: list, table: list | None = None) -> str:
    """Create the run's Prefect artifacts: a markdown summary and a table."""
    markdown = reports.summary_markdown(title, facts, [tuple(t) for t in tables])
    reports.create_artifacts(key, markdown, table=table, description=title)
    return markdown


def base_manifest(flow_name, key, parameters, source=None, started=None):
    """The manifest fields every flow writes."""
    return {
        "flow": flow_name,
        "run_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "emdask_version": emdask.__version__,
        "parameters": parameters,
        "source": None if source is None else source.describe(),
        "seconds": None if started is None else round(time.perf_counter() - started, 3),
    }


def parquet_writes(version, tables):
    """Dask writes (not run yet) of ``(name, frame, primary, write_index)`` tables into ``version``.

    The workers write each table's ``part.N.parquet`` files straight to the destination's
    storage; a retried task starts from an empty folder.
    """
    writes = []
    for name, frame, primary, write_index in tables:
        url = version.table_url(name, primary=primary)
        fs, path = filesystem(url, version.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        options = storage_options_for(url, version.storage_options) or None
        writes.append(frame.to_parquet(url, write_index=write_index, compute=False,
                                       storage_options=options))
    return writes
