"""The ``impute-survey`` flow: fill the missing answers of a survey table, publish a new version.

Story: check the inputs → profile the table → fit the imputation model by EM → fill (the
conditional mean, or m multiple imputations), the workers writing straight to the destination
→ validate against the source → commit the new version in one step → report.

Numeric columns are modelled by :class:`emdask.EMImputer` (a Gaussian mixture fitted on the
incomplete rows); when categorical or boolean answers are among the columns,
:class:`emdask.MixedMixture` models them all together and fills each cell from its row.

The source and the destination are URLs (:mod:`pipelines.sources`, :mod:`pipelines.versions`).
A published version of a folder destination holds (an Iceberg or Delta destination commits
``data`` as the table's new snapshot and keeps the rest beside it)::

    data/part.N.parquet        the table, missing cells filled, everything else as it was
                               (method='multiple': imputations/1/ ... imputations/m/ instead)
    filled/part.N.parquet      the id column and, per modelled column, True where a cell was filled
    model/                     the fitted model (emdask.load reads it)
    convergence.png            mean log-likelihood per EM iteration
    manifest.json              parameters, source files, rows, missing cells before and after, fit
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import pandas as pd
from prefect import flow, get_run_logger
from pydantic import Field

import emdask
from emdask.engine import columns as column_rules

from . import validation
from .cluster import dask_client
from .errors import InputError, ValidationError
from .partitions import filled_marks
from .reports import format_duration, warnings_to_log
from .sources import Source, open_source
from .tasks import (
    FitResult,
    base_manifest,
    commit_version,
    io_task,
    load_model,
    parquet_writes,
    plot_convergence,
    profile_source,
    progress_callback,
    report_run,
    save_model,
    step_task,
    up_to_date,
)
from .versions import Destination, Published, open_destination, run_key

__all__ = ["ImputePlan", "check_inputs", "impute_survey", "model_parameters"]

FLOW_NAME = "impute-survey"


@dataclass
class ImputePlan:
    """The checked inputs of an imputation run."""

    source: Source
    destination: Destination
    id_column: str
    columns: list
    model: str  # "gaussian" (EMImputer) or "mixed" (MixedMixture)
    key: str
    parameters: dict = field(default_factory=dict)


def _model_for(plan, dtypes, parsed):
    """The plan with its model chosen again once the profile has told which text columns
    hold numbers stored as text: those are numeric, and a table of numbers only is modelled
    by EMImputer."""
    non_gaussian = [
        c for c in plan.columns
        if c not in parsed and column_rules.needs_discrete_family(dtypes[c])
    ]
    if plan.model == "mixed" and not non_gaussian:
        get_run_logger().info(f"column(s) {parsed} hold numbers stored as text; read as numbers")
        return replace(plan, model="gaussian")
    return plan


def _mixed_available():
    return hasattr(emdask, "MixedMixture")


@io_task
def plan_imputation(
    source: str, dest: str, id_column: str, columns: Optional[list], parameters: dict,
    storage_options: Optional[dict] = None,
) -> ImputePlan:
    """Check the source, the columns and the destination; nothing is read beyond metadata."""
    info = open_source(source, storage_options)
    dtypes = info.open_table().dtypes
    chosen = validation.check_table_columns(dtypes, id_column, columns, what="columns")
    validation.check_not_empty(info)
    non_gaussian = [c for c in chosen if column_rules.needs_discrete_family(dtypes[c])]
    model = "mixed" if non_gaussian else "gaussian"
    if model == "mixed" and not _mixed_available():
        raise InputError(
            f"columns {non_gaussian} are categorical and this emdask has no MixedMixture; "
            "leave them out of columns"
        )
    if model == "mixed" and parameters["covariance_type"] not in ("full", "diag"):
        raise InputError(
            f"covariance_type={parameters['covariance_type']!r} cannot model categorical columns "
            f"{non_gaussian}; use 'full' or 'diag'"
        )
    destination = open_destination(dest, storage_options)
    if destination.kind in ("iceberg", "delta") and parameters["method"] == "multiple":
        raise InputError(
            f"method='multiple' publishes {parameters['n_imputations']} tables, and destination "
            f"{destination.url} is one {destination.kind} table; publish multiple imputations to a "
            "folder or object-store URL"
        )
    destination.check(info)
    params = {**parameters, "id_column": id_column, "columns": chosen}
    key = run_key(FLOW_NAME, params, info.identity(), emdask.__version__)
    return ImputePlan(info, destination, id_column, chosen, model, key, params)


def model_parameters(n_components=1, covariance_type="full", method="mean", n_imputations=5,
                     max_iter=100, tol=1e-3, random_state=0, algorithm="squarem", **_):
    """The run's model parameters (those that, with the source, determine its output)."""
    return dict(
        n_components=n_components, covariance_type=covariance_type, method=method,
        n_imputations=n_imputations if method == "multiple" else None,
        max_iter=max_iter, tol=tol, random_state=random_state, algorithm=algorithm,
    )


def check_inputs(source, dest, id_column, columns=None, storage_options=None, **options):
    """Check a run's inputs as its first task does, without running it; raises InputError."""
    return plan_imputation.fn(source, dest, id_column, columns, model_parameters(**options),
                              storage_options)


def _make_model(plan):
    p = plan.parameters
    common = dict(tol=p["tol"], max_iter=p["max_iter"], random_state=p["random_state"],
                  algorithm=p.get("algorithm", "squarem"))
    if plan.model == "mixed":
        return emdask.MixedMixture(p["n_components"], covariance_type=p["covariance_type"], **common)
    return emdask.EMImputer(p["n_components"], covariance_type=p["covariance_type"], **common)


@step_task
def fit_imputer(plan: ImputePlan, version) -> FitResult:
    """Fit the imputation model by EM on the incomplete table and save it to the version.

    The fit is checkpointed after every iteration; a run started again after being killed
    mid-fit resumes from the checkpoint."""
    logger = get_run_logger()
    model = _make_model(plan)
    logger.info(f"fitting {model!r} on {len(plan.columns)} columns")
    started = time.perf_counter()
    checkpoint, keep_a_copy = plan.destination.checkpoint(plan.key)
    callbacks = [progress_callback(tol=model.tol)] + ([keep_a_copy] if keep_a_copy else [])
    with warnings_to_log(logger), validation.data_errors_as_input():
        model.fit(plan.source.open_table(), columns=plan.columns, callbacks=callbacks,
                  checkpoint=checkpoint, resume=True)
    seconds = time.perf_counter() - started
    path = save_model(model, str(version.local / "model"))
    logger.info(
        f"fitted in {model.n_iter_} iterations ({'converged' if model.converged_ else 'not converged'}), "
        f"{format_duration(seconds)}"
    )
    return FitResult(
        model_path=path,
        model_class=type(model).__name__,
        n_components=int(model.n_components),
        n_iter=int(model.n_iter_),
        converged=bool(model.converged_),
        lower_bounds=[float(v) for v in model.lower_bounds_],
        seconds=seconds,
        n_passes=int(getattr(model, "n_passes_", 0) or 0),
    )


def _fill(model, table):
    return model.impute(table)


#: dask's placeholder category of a column whose categories its metadata does not know
UNKNOWN_CATEGORIES = "__UNKNOWN_CATEGORIES__"


def _partition_categories(part, columns):
    return {c: list(part[c].cat.categories) for c in columns}


def _categories(table):
    """The categories of every ``category`` column whose categories the table's metadata
    does not know (Parquet dictionaries), in one pass over those columns: first-seen order,
    so the declared order of the source comes first."""
    import dask

    unknown = [
        c for c, dtype in table.dtypes.items()
        if isinstance(dtype, pd.CategoricalDtype) and not table[c].cat.known
    ]
    if not unknown:
        return {}
    parts = dask.compute(*[
        dask.delayed(_partition_categories)(p, unknown) for p in table[unknown].to_delayed()
    ])
    return {c: list(dict.fromkeys(v for part in parts for v in part[c])) for c in unknown}


def _set_categories(part, categories):
    out = part.copy()
    for c, levels in categories.items():
        extra = [v for v in out[c].cat.categories if v not in set(levels) and v != UNKNOWN_CATEGORIES]
        out[c] = out[c].cat.set_categories(list(levels) + extra)
    return out


def _with_categories(frame, categories):
    """``frame`` with the same categories in every partition and in its metadata: the
    Parquet writer sizes a column's dictionary indices from the metadata, and a partition
    of more levels than that (int8 codes hold 127) could not be written."""
    categories = {
        c: v for c, v in categories.items()
        if c in frame.columns and isinstance(frame.dtypes[c], pd.CategoricalDtype)
    }
    if not categories:
        return frame
    meta = _set_categories(frame._meta, categories)
    return frame.map_partitions(_set_categories, categories, meta=meta)


@io_task
def write_filled(plan: ImputePlan, fit: FitResult, version) -> list:
    """Fill the missing cells; the workers write the table (or its m imputations) and the fill marks."""
    import dask

    p = plan.parameters
    model = load_model(fit.model_path, fit.model_class)
    table = plan.source.open_table()
    categories = _categories(table)
    with validation.data_errors_as_input():
        if p["method"] == "multiple":
            copies = model.sample_imputations(
                table, n_imputations=p["n_imputations"], random_state=p["random_state"]
            )
            outputs = [(f"imputations/{i + 1}", t) for i, t in enumerate(copies)]
        else:
            outputs = [("data", _fill(model, table))]
    outputs = [(name, _with_categories(frame, categories)) for name, frame in outputs]
    meta = filled_marks(table._meta, plan.id_column, plan.columns)
    marks = table.map_partitions(filled_marks, plan.id_column, plan.columns, meta=meta)
    write_index = table.index.name is not None and plan.destination.kind == "folder"
    tables = [(name, frame, name == "data", write_index) for name, frame in outputs]
    with validation.data_errors_as_input(), validation.damaged_files_as_input(plan.source):
        dask.compute(*parquet_writes(version, tables + [("filled", marks, False, False)]))
    names = [name for name, _ in outputs]
    get_run_logger().info(f"wrote {', '.join(names)} and filled to {version.url}")
    return names


@io_task
def validate_filled(plan: ImputePlan, version, outputs: list) -> dict:
    """Check every written table against the source: rows, ids, observed cells, no missing cell left."""
    results = {}
    for name in outputs:
        url = version.table_url(name, primary=name == "data")
        checked = validation.validate_filled(
            plan.source, url, plan.id_column, plan.columns,
            mask_dir=version.table_url("filled"), storage_options=version.storage_options,
        )
        left = {c: n for c, n in checked["missing_after"].items() if n}
        if left:
            raise ValidationError(
                f"{url} still has missing cells in {left} (column: count)"
            )
        results[name] = checked
    first = results[outputs[0]]
    get_run_logger().info(
        f"validated {', '.join(outputs)}: {first['rows']:,} rows, same ids, observed cells "
        "unchanged, no missing cell left"
    )
    return first


@flow(name=FLOW_NAME, validate_parameters=True)
def impute_survey(
    source: str,
    dest: str,
    id_column: str,
    columns: Optional[list[str]] = None,
    n_components: Annotated[int, Field(ge=1, le=100)] = 1,
    covariance_type: Literal["full", "diag", "tied", "spherical"] = "full",
    method: Literal["mean", "multiple"] = "mean",
    n_imputations: Annotated[int, Field(ge=1, le=100)] = 5,
    max_iter: Annotated[int, Field(ge=1, le=100_000)] = 100,
    tol: Annotated[float, Field(gt=0)] = 1e-3,
    random_state: Annotated[int, Field(ge=0)] = 0,
    algorithm: Literal["em", "squarem"] = "squarem",
    dask_address: Optional[str] = None,
    keep_versions: Annotated[int, Field(ge=1)] = 5,
    force: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
) -> dict:
    """Fill the missing cells of a table by EM and publish the result as a new version of ``dest``.

    Args:
        source: Table to read, never modified: a Parquet dataset (directory, file or glob) or
            CSV file(s), local or on an object store (s3://, gs://, abfs://, ...), an Iceberg
            table (iceberg://CATALOG/NAMESPACE.TABLE[@SNAPSHOT_ID]), a Delta table (a folder
            holding _delta_log/, [@VERSION]) or PostgreSQL
            (postgresql://USER@HOST:PORT/DB?table=SCHEMA.TABLE or ?query=...).
        dest: Where the new version is published: a local or object-store folder (versions +
            CURRENT), an Iceberg table (iceberg://CATALOG/NAMESPACE.TABLE, created if missing)
            or a Delta table (delta+URL for a new one); see ``pipelines.versions``.
        id_column: Column identifying rows; must be present and unique.
        columns: Columns to model and fill; default: every numeric, boolean and categorical
            column except the id column.
        n_components: Mixture components of the model (1: one multivariate normal).
        covariance_type: Covariance of the numeric columns within a component.
        method: 'mean' fills each cell with its conditional expectation (most probable level
            for categories); 'multiple' writes ``n_imputations`` completed copies drawn from
            the model (folder destinations only).
        n_imputations: Number of copies for method='multiple'.
        max_iter: Maximum EM iterations.
        tol: Convergence threshold on the change of the mean log-likelihood per row.
        random_state: Seed; the same seed on the same data gives the same output.
        algorithm: 'squarem' (EM accelerated by SQUAREM: the same model in fewer passes over
            the table) or 'em' (plain EM).
        dask_address: Dask scheduler to use; default: $DASK_SCHEDULER_ADDRESS, else a local
            cluster on 127.0.0.1 for the run.
        keep_versions: Published versions to keep in ``dest``.
        force: Recompute even when the published version already holds this run.
        storage_options: fsspec options of object-store URLs (endpoint, region, ...);
            credentials belong in the environment, not here.
    """
    started = time.perf_counter()
    parameters = model_parameters(
        n_components=n_components, covariance_type=covariance_type, method=method,
        n_imputations=n_imputations, max_iter=max_iter, tol=tol, random_state=random_state,
        algorithm=algorithm,
    )
    plan = plan_imputation(source, dest, id_column, columns, parameters, storage_options)
    done = None if force else up_to_date(plan.destination, plan.key)
    if done is not None:
        return {**_summary(done), "up_to_date": True}
    with dask_client(dask_address):
        profile = profile_source(plan.source, plan.id_column, plan.columns,
                                 (n_components, "n_components (-k)"))
        plan = _model_for(plan, plan.source.open_table().dtypes, validation.numbers_as_text(profile))
        with plan.destination.new_version(plan.key, keep_versions) as version:
            fit = fit_imputer(plan, version)
            outputs = write_filled(plan, fit, version)
            checked = validate_filled(plan, version, outputs)
            plot = plot_convergence(
                str(version.local / "convergence.png"), fit.lower_bounds,
                f"{fit.model_class}, k={fit.n_components}: EM convergence",
            )
            manifest = base_manifest(FLOW_NAME, plan.key, plan.parameters, plan.source, started)
            manifest.update(
                rows=profile.rows,
                columns=plan.columns,
                dtypes=profile.dtypes,
                missing_before=profile.missing,
                missing_after=checked["missing_after"],
                outputs={"tables": outputs, "filled": "filled", "model": "model",
                         "convergence_plot": Path(plot).name},
                fit=fit.to_dict() | {"model_path": "model"},
            )
            published = commit_version(version, manifest)
    summary = _summary(published)
    _report(summary)
    return summary


def _summary(published: Published):
    m = published.manifest
    rows = m["rows"]
    fit = m["fit"]
    tables = [published.join(t) for t in m["outputs"]["tables"]]
    if published.table:
        tables = [published.table]
    return {
        "flow": FLOW_NAME,
        "version": m["version"],
        "path": published.url,
        "table": published.table,
        "rows": rows,
        "columns": m["columns"],
        "missing_before": m["missing_before"],
        "missing_after": m["missing_after"],
        "filled_cells": int(sum(m["missing_before"].values())),
        "model": fit["model_class"],
        "n_components": fit["n_components"],
        "n_iter": fit["n_iter"],
        "converged": fit["converged"],
        "seconds": m["seconds"],
        "tables": tables,
        "model_path": published.join("model"),
        "plots": [published.join(m["outputs"]["convergence_plot"])],
    }


def _report(summary):
    rows = summary["rows"]
    per_column = [
        {
            "column": c,
            "missing_before": summary["missing_before"][c],
            "missing_rate_before": round(summary["missing_before"][c] / rows, 6),
            "missing_after": summary["missing_after"][c],
            "missing_rate_after": round(summary["missing_after"][c] / rows, 6),
        }
        for c in summary["columns"]
    ]
    facts = {
        "version": summary["path"],
        "rows": f"{rows:,}",
        "cells filled": f"{summary['filled_cells']:,}",
        "model": f"{summary['model']}, k={summary['n_components']}",
        "EM iterations": f"{summary['n_iter']} ({'converged' if summary['converged'] else 'not converged'})",
        "time": format_duration(summary["seconds"]),
    }
    report_run(
        "impute-survey", "Survey imputation", facts,
        [("Missing cells per column", per_column, list(per_column[0]))], per_column,
    )
