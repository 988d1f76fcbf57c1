"""The ``segment-customers`` flow: split a customer table into segments with a mixture model.

Story: check the inputs → profile the table → (optional) standardize the numeric features →
fit a mixture, or every candidate number of segments at once and keep the best by BIC →
the workers write each customer's segment and membership probabilities to the destination →
validate → write the segment profile → commit the new version in one step → report.

Numeric features are modelled by :class:`emdask.GaussianMixture`; when categorical or boolean
features are among them, :class:`emdask.MixedMixture` models every column with its own family
(Gaussian, Poisson counts, Bernoulli, categorical).

The source and the destination are URLs (:mod:`pipelines.sources`, :mod:`pipelines.versions`).
A published version of a folder destination holds (an Iceberg or Delta destination commits
``segments`` as the table's new snapshot and keeps the rest beside it)::

    segments/part.N.parquet    id column, segment (0..k-1), p_0 ... p_{k-1}
    profile.parquet, .csv      per segment: rows, share, mixing weight, and per feature its
                               mean (numeric), rate (counts), probability (boolean) or level
                               frequencies (categorical), in the original units
    model/                     the fitted model (emdask.load reads it); scaling.json when scaled
    convergence.png            mean log-likelihood per EM iteration of the chosen model
    bic.png, selection.csv     criterion against k, when k was searched
    manifest.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from pydantic import Field

import emdask
from emdask.engine import columns as column_rules

from . import validation
from .cluster import dask_client
from .errors import InputError
from .partitions import label_partition, scaled_table, segment_frame
from .reports import format_duration, log_singular_candidates, warnings_to_log
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

__all__ = ["SegmentPlan", "check_inputs", "model_parameters", "segment_customers", "segment_profile"]

FLOW_NAME = "segment-customers"


@dataclass
class SegmentPlan:
    """The checked inputs of a segmentation run."""

    source: Source
    destination: Destination
    id_column: str
    features: list
    family: str  # "gaussian" or "mixed"
    scaled: list  # features standardized before fitting
    candidates: list  # numbers of components to fit
    key: str
    parameters: dict = field(default_factory=dict)


@io_task
def plan_segmentation(
    source: str, dest: str, id_column: str, features: Optional[list], parameters: dict,
    storage_options: Optional[dict] = None,
) -> SegmentPlan:
    """Check the source, the features, the model options and the destination (metadata only)."""
    p = parameters
    info = open_source(source, storage_options)
    dtypes = info.open_table().dtypes
    chosen = validation.check_table_columns(dtypes, id_column, features, what="features")
    validation.check_not_empty(info)
    non_gaussian = [c for c in chosen if column_rules.needs_discrete_family(dtypes[c])]
    family = p["family"]
    if family == "auto":
        family = "mixed" if non_gaussian else "gaussian"
    if family == "gaussian" and non_gaussian:
        raise InputError(
            f"family='gaussian' cannot model categorical or boolean features {non_gaussian}; "
            "use family='mixed' or leave them out of features"
        )
    if family == "mixed" and p["covariance_type"] not in ("full", "diag"):
        raise InputError(
            f"covariance_type={p['covariance_type']!r} is not available with family='mixed'; "
            "use 'full' or 'diag'"
        )
    if p["n_components"] is not None:
        candidates = [int(p["n_components"])]
    else:
        if p["k_min"] > p["k_max"]:
            raise InputError(f"k_min={p['k_min']} is larger than k_max={p['k_max']}")
        candidates = list(range(p["k_min"], p["k_max"] + 1))
    if p["scale"]:
        scaled = [
            c for c in chosen
            if c not in non_gaussian
            and (family == "gaussian" or pd.api.types.is_float_dtype(dtypes[c]))
        ]
    else:
        scaled = []
    destination = open_destination(dest, storage_options)
    destination.check(info)
    params = {**p, "id_column": id_column, "features": chosen}
    key = run_key(FLOW_NAME, params, info.identity(), emdask.__version__)
    return SegmentPlan(info, destination, id_column, chosen, family, scaled, candidates, key, params)


def model_parameters(n_components=None, k_min=2, k_max=8, criterion="bic", family="auto",
                     covariance_type="full", scale=False, n_init=1, max_iter=100, tol=1e-3,
                     random_state=0, algorithm="squarem", **_):
    """The run's model parameters (those that, with the source, determine its output)."""
    return dict(
        n_components=n_components, k_min=None if n_components else k_min,
        k_max=None if n_components else k_max, criterion=criterion, family=family,
        covariance_type=covariance_type, scale=scale, n_init=n_init, max_iter=max_iter, tol=tol,
        random_state=random_state, algorithm=algorithm,
    )


def check_inputs(source, dest, id_column, features=None, storage_options=None, **options):
    """Check a run's inputs as its first task does, without running it; raises InputError."""
    return plan_segmentation.fn(source, dest, id_column, features, model_parameters(**options),
                                storage_options)


@step_task
def fit_scaling(plan: SegmentPlan, version) -> dict:
    """Estimate each scaled feature's mean and standard deviation (a one-component diagonal Gaussian)."""
    if not plan.scaled:
        return {}
    table = plan.source.open_table()
    model = emdask.GaussianMixture(1, covariance_type="diag", init_params="random", tol=1e-9,
                                   max_iter=5, random_state=0)
    with validation.data_errors_as_input():
        model.fit(table, columns=plan.scaled)
    scale = np.sqrt(model.covariances_[0])
    scaling = {
        c: [float(m), float(s) if s > 0 else 1.0]
        for c, m, s in zip(plan.scaled, model.means_[0], scale)
    }
    with open(version.local / "scaling.json", "w") as fh:
        json.dump({"centers_and_scales": scaling}, fh, indent=2)
    get_run_logger().info(f"standardizing {len(scaling)} features: (x - mean) / std")
    return scaling


def _estimator(plan):
    p = plan.parameters
    common = dict(tol=p["tol"], max_iter=p["max_iter"], random_state=p["random_state"],
                  n_init=p["n_init"], covariance_type=p["covariance_type"],
                  algorithm=p.get("algorithm", "squarem"))
    k = plan.candidates[0]
    if plan.family == "mixed":
        return emdask.MixedMixture(k, **common)
    return emdask.GaussianMixture(k, **common)


@step_task
def fit_segments(plan: SegmentPlan, scaling: dict, version) -> FitResult:
    """Fit the mixture (every candidate k in shared passes when k is searched) and save the best.

    A single k is checkpointed after every iteration; a run started again after being killed
    mid-fit resumes from the checkpoint."""
    logger = get_run_logger()
    p = plan.parameters
    table = scaled_table(plan.source.open_table(), scaling)
    estimator = _estimator(plan)
    started = time.perf_counter()
    selection = []
    with warnings_to_log(logger), validation.data_errors_as_input():
        if len(plan.candidates) == 1:
            logger.info(f"fitting {estimator!r} on {len(plan.features)} features")
            checkpoint, keep_a_copy = plan.destination.checkpoint(plan.key)
            callbacks = [progress_callback(tol=estimator.tol)] + ([keep_a_copy] if keep_a_copy else [])
            model = estimator.fit(table, columns=plan.features, callbacks=callbacks,
                                  checkpoint=checkpoint, resume=True)
            n_passes = getattr(model, "n_passes_", 0)
        else:
            ks = plan.candidates
            logger.info(f"fitting k = {ks[0]}..{ks[-1]} together; choosing by {p['criterion'].upper()}")
            n_init = p["n_init"]

            def callback(info):
                logger.info(f"k={ks[info.model // n_init]:<3d}" + emdask.engine.format_iteration(info))

            result = emdask.select_components(
                estimator, table, n_components=ks, criterion=p["criterion"],
                columns=plan.features, callbacks=[callback],
            )
            model = result.best_estimator_
            n_passes = result.n_passes_
            result.table_.to_csv(version.local / "selection.csv", index=False)
            result.plot(str(version.local / f"{p['criterion']}.png"))
            selection = json.loads(result.table_.to_json(orient="records"))
            log_singular_candidates(logger, result.table_)
            logger.info(f"{p['criterion'].upper()} chose k={result.best_n_components_}")
    seconds = time.perf_counter() - started
    path = save_model(model, str(version.local / "model"))
    logger.info(
        f"k={model.n_components}: {model.n_iter_} iterations "
        f"({'converged' if model.converged_ else 'not converged'}), {format_duration(seconds)}"
    )
    return FitResult(
        model_path=path,
        model_class=type(model).__name__,
        n_components=int(model.n_components),
        n_iter=int(model.n_iter_),
        converged=bool(model.converged_),
        lower_bounds=[float(v) for v in model.lower_bounds_],
        seconds=seconds,
        n_passes=int(n_passes or 0),
        selection=selection,
    )


@io_task
def write_segments(plan: SegmentPlan, fit: FitResult, scaling: dict, version) -> str:
    """The workers write every row's id, segment and membership probabilities, partition by partition."""
    import dask

    model = load_model(fit.model_path)
    table = plan.source.open_table()
    empty = np.empty((0, fit.n_components))
    meta = segment_frame(table._meta[plan.id_column].to_numpy(), empty, plan.id_column)
    segments = table.map_partitions(
        label_partition, model, plan.id_column, plan.features, scaling, meta=meta
    )
    with validation.data_errors_as_input(), validation.damaged_files_as_input(plan.source):
        dask.compute(*parquet_writes(version, [("segments", segments, True, False)]))
    return version.table_url("segments", primary=True)


@io_task
def validate_segments(plan: SegmentPlan, fit: FitResult, segments: str, version) -> dict:
    """Check the segment table against the source: same ids in order, valid labels and probabilities."""
    checked = validation.validate_segments(plan.source, segments, plan.id_column, fit.n_components,
                                           storage_options=version.storage_options)
    get_run_logger().info(
        f"validated {checked['rows']:,} rows: same ids, labels in 0..{fit.n_components - 1}, "
        f"probabilities sum to 1; rows per segment {checked['counts']}"
    )
    return checked


def segment_profile(model, features, scaling, counts):
    """Per segment: rows, share, mixing weight, and each feature's parameter in original units.

    Numeric features give the segment's mean, counts their Poisson rate, booleans the
    probability of True, and categorical features one column ``feature=level`` per level with
    the level's probability in the segment. All values are the fitted model's parameters
    (undoing the standardization of scaled features).
    """
    k = int(model.n_components)
    total = max(1, int(sum(counts)))
    table = pd.DataFrame({
        "segment": np.arange(k),
        "rows": np.asarray(counts, dtype=np.int64),
        "share": np.asarray(counts, dtype=np.float64) / total,
        "weight": np.asarray(model.weights_, dtype=np.float64),
    })

    def unscale(c, values):
        if c in scaling:
            center, scale = scaling[c]
            return values * scale + center
        return values

    if isinstance(model, emdask.GaussianMixture):
        names = [str(c) for c in model.feature_names_in_]
        for j, c in enumerate(names):
            table[c] = unscale(c, model.means_[:, j])
        return table
    families = model.column_families_
    groups = {"gaussian": [], "poisson": [], "bernoulli": [], "categorical": []}
    for c, fam in families.items():
        groups[fam].append(c)
    columns = {}
    for j, c in enumerate(groups["gaussian"]):
        columns[c] = unscale(c, np.asarray(model.means_)[:, j])
    for j, c in enumerate(groups["poisson"]):
        columns[c] = np.asarray(model.rates_)[:, j]
    for j, c in enumerate(groups["bernoulli"]):
        columns[c] = np.asarray(model.binary_probabilities_)[:, j]
    for j, c in enumerate(groups["categorical"]):
        for level_index, level in enumerate(model.categories_[c]):
            columns[f"{c}={level}"] = np.asarray(model.category_probabilities_)[:, j, level_index]
    for c in features:
        for name in [n for n in columns if n == c or n.startswith(f"{c}=")]:
            table[name] = columns[name]
    return table


@io_task
def write_profile(plan: SegmentPlan, fit: FitResult, scaling: dict, counts: list, version) -> list:
    """Write the segment profile (sizes and per-segment parameters, original units) into the version."""
    model = load_model(fit.model_path)
    profile = segment_profile(model, plan.features, scaling, counts)
    profile.to_parquet(version.local / "profile.parquet", index=False)
    profile.to_csv(version.local / "profile.csv", index=False)
    return json.loads(profile.to_json(orient="records"))


@flow(name=FLOW_NAME, validate_parameters=True)
def segment_customers(
    source: str,
    dest: str,
    id_column: str,
    features: Optional[list[str]] = None,
    n_components: Optional[Annotated[int, Field(ge=1, le=100)]] = None,
    k_min: Annotated[int, Field(ge=1, le=100)] = 2,
    k_max: Annotated[int, Field(ge=1, le=100)] = 8,
    criterion: Literal["bic", "aic", "icl"] = "bic",
    family: Literal["auto", "gaussian", "mixed"] = "auto",
    covariance_type: Literal["full", "diag", "tied", "spherical"] = "full",
    scale: bool = False,
    n_init: Annotated[int, Field(ge=1, le=50)] = 1,
    max_iter: Annotated[int, Field(ge=1, le=100_000)] = 100,
    tol: Annotated[float, Field(gt=0)] = 1e-3,
    random_state: Annotated[int, Field(ge=0)] = 0,
    algorithm: Literal["em", "squarem"] = "squarem",
    dask_address: Optional[str] = None,
    keep_versions: Annotated[int, Field(ge=1)] = 5,
    force: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
) -> dict:
    """Segment the rows of a table with a mixture model and publish a new version of ``dest``.

    Args:
        source: Table to read, never modified: a Parquet dataset or CSV file(s), local or on
            an object store (s3://, gs://, abfs://, ...), an Iceberg table
            (iceberg://CATALOG/NAMESPACE.TABLE[@SNAPSHOT_ID]), a Delta table ([@VERSION]) or
            PostgreSQL (postgresql://USER@HOST:PORT/DB?table=SCHEMA.TABLE or ?query=...).
        dest: Where the new version is published: a local or object-store folder, an Iceberg
            table (created if missing) or a Delta table (delta+URL for a new one).
        id_column: Column identifying rows; must be present and unique.
        features: Columns to segment on; default: every numeric, boolean and categorical
            column except the id column.
        n_components: Number of segments; default: chosen by ``criterion`` among k_min..k_max.
        k_min: Smallest number of segments tried when n_components is not given.
        k_max: Largest number of segments tried when n_components is not given.
        criterion: 'bic', 'aic' or 'icl' (lower is better).
        family: 'gaussian' (numeric features), 'mixed' (a family per column) or 'auto'.
        covariance_type: Covariance of the numeric features within a segment.
        scale: Standardize numeric features before fitting (profiles stay in original units).
        n_init: Restarts per candidate; the best is kept.
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
        n_components=n_components, k_min=k_min, k_max=k_max, criterion=criterion, family=family,
        covariance_type=covariance_type, scale=scale, n_init=n_init, max_iter=max_iter, tol=tol,
        random_state=random_state, algorithm=algorithm,
    )
    plan = plan_segmentation(source, dest, id_column, features, parameters, storage_options)
    done = None if force else up_to_date(plan.destination, plan.key)
    if done is not None:
        return {**_summary(done), "up_to_date": True}
    with dask_client(dask_address):
        largest = (max(plan.candidates),
                   "n_components (-k)" if n_components is not None else "k_max (--k-range)")
        profile = profile_source(plan.source, plan.id_column, plan.features, largest)
        with plan.destination.new_version(plan.key, keep_versions) as version:
            scaling = fit_scaling(plan, version)
            fit = fit_segments(plan, scaling, version)
            segments = write_segments(plan, fit, scaling, version)
            checked = validate_segments(plan, fit, segments, version)
            seg_profile = write_profile(plan, fit, scaling, checked["counts"], version)
            plot = plot_convergence(
                str(version.local / "convergence.png"), fit.lower_bounds,
                f"{fit.model_class}, k={fit.n_components}: EM convergence",
            )
            outputs = {"segments": "segments", "profile": "profile.parquet", "model": "model",
                       "convergence_plot": Path(plot).name}
            if fit.selection:
                outputs["selection_plot"] = f"{criterion}.png"
                outputs["selection"] = "selection.csv"
            if scaling:
                outputs["scaling"] = "scaling.json"
            manifest = base_manifest(FLOW_NAME, plan.key, plan.parameters, plan.source, started)
            manifest.update(
                rows=profile.rows,
                features=plan.features,
                family=plan.family,
                missing_before=profile.missing,
                counts=checked["counts"],
                profile=seg_profile,
                outputs=outputs,
                fit=fit.to_dict() | {"model_path": "model"},
            )
            published = commit_version(version, manifest)
    summary = _summary(published)
    _report(summary)
    return summary


def _summary(published: Published):
    m = published.manifest
    fit, out = m["fit"], m["outputs"]
    plots = [published.join(out["convergence_plot"])]
    if "selection_plot" in out:
        plots.append(published.join(out["selection_plot"]))
    segments = published.table or published.join(out["segments"])
    return {
        "flow": FLOW_NAME,
        "version": m["version"],
        "path": published.url,
        "table": published.table,
        "rows": m["rows"],
        "features": m["features"],
        "model": fit["model_class"],
        "n_components": fit["n_components"],
        "searched": [row["n_components"] for row in fit["selection"]],
        "criterion": m["parameters"]["criterion"],
        "selection": fit["selection"],
        "counts": m["counts"],
        "profile": m["profile"],
        "missing_before": m["missing_before"],
        "n_iter": fit["n_iter"],
        "converged": fit["converged"],
        "seconds": m["seconds"],
        "tables": [segments, published.join(out["profile"])],
        "model_path": published.join("model"),
        "plots": plots,
    }


def _report(summary):
    rows = summary["rows"]
    facts = {
        "version": summary["path"],
        "rows": f"{rows:,}",
        "features": ", ".join(summary["features"]),
        "missing cells": f"{sum(summary['missing_before'].values()):,} (marginalized, not filled)",
        "model": f"{summary['model']}, k={summary['n_components']}",
        "k searched": (f"{summary['searched'][0]}..{summary['searched'][-1]} by "
                       f"{summary['criterion'].upper()}" if summary["searched"] else "no (given)"),
        "EM iterations": f"{summary['n_iter']} ({'converged' if summary['converged'] else 'not converged'})",
        "time": format_duration(summary["seconds"]),
    }
    profile = summary["profile"]
    tables = [("Segments", profile, list(profile[0]))]
    if summary["selection"]:
        sel = summary["selection"]
        tables.append((f"{summary['criterion'].upper()} by number of segments", sel, list(sel[0])))
    report_run("segment-customers", "Customer segmentation", facts, tables, profile)
