"""The ``segment-image`` flow: segment an image into regions by colour (and position).

Story: check the image → turn its pixels into a feature file (RGB, optionally x and y) →
fit a Gaussian mixture on the pixels as a chunked Dask array (every candidate k at once and
the best by BIC when k is not given) → label every pixel → write the labelled image, each
segment in its mean colour, and the label array → validate → publish atomically → report.

A published version of ``OUT`` holds::

    segments.png               the image, every pixel in its segment's mean colour
    labels.npy                 segment of every pixel, shape (height, width)
    model/                     the fitted GaussianMixture (emdask.load reads it)
    convergence.png            mean log-likelihood per EM iteration
    bic.png, selection.csv     criterion against k, when k was searched
    manifest.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
from prefect import flow, get_run_logger
from pydantic import Field

import emdask

from . import warehouse
from .cluster import dask_client
from .partitions import read_rows
from .reports import format_duration
from .tasks import (
    FitResult,
    base_manifest,
    discard,
    io_task,
    load_model,
    plot_convergence,
    progress_callback,
    publish_version,
    report_run,
    save_model,
    stage_version,
    step_task,
    up_to_date,
    write_version_manifest,
)
from .warehouse import InputError

__all__ = ["ImagePlan", "check_inputs", "image_features", "model_parameters", "segment_image"]

FLOW_NAME = "segment-image"
#: Pixels per chunk of the Dask array the model is fitted on.
CHUNK_PIXELS = 500_000


@dataclass
class ImagePlan:
    """The checked inputs of an image segmentation run."""

    image: str
    out: str
    width: int
    height: int
    mode: str
    format: str
    candidates: list
    key: str
    parameters: dict = field(default_factory=dict)

    @property
    def pixels(self):
        return self.width * self.height


def model_parameters(n_components=None, k_min=2, k_max=8, position=False, position_weight=1.0,
                     covariance_type="full", max_iter=100, tol=1e-3, random_state=0, **_):
    """The run's model parameters (those that, with the image, determine its output)."""
    return dict(
        n_components=n_components, k_min=None if n_components else k_min,
        k_max=None if n_components else k_max, position=position,
        position_weight=position_weight if position else None, covariance_type=covariance_type,
        max_iter=max_iter, tol=tol, random_state=random_state,
    )


def check_inputs(image, out, **options):
    """Check a run's inputs as its first task does, without running it; raises InputError."""
    return plan_image.fn(image, out, model_parameters(**options))


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"{path} is not an image Pillow can read (PNG, JPEG, ...): {warehouse._one_line(exc)}"
        ) from exc


@io_task
def plan_image(image: str, out: str, parameters: dict) -> ImagePlan:
    """Check the image opens and the output directory can receive a new version."""
    path = Path(str(image)).expanduser()
    if not str(image).strip() or not path.is_file():
        raise InputError(f"image {image} does not exist or is not a file; give a PNG or JPEG file")
    img = _open_image(path)
    width, height = img.size
    if width * height < 2:
        raise InputError(f"image {image} has {width * height} pixel(s); nothing to segment")
    p = parameters
    if p["n_components"] is not None:
        candidates = [int(p["n_components"])]
    else:
        if p["k_min"] > p["k_max"]:
            raise InputError(f"k_min={p['k_min']} is larger than k_max={p['k_max']}")
        candidates = list(range(p["k_min"], p["k_max"] + 1))
    if max(candidates) > width * height:
        raise InputError(f"k={max(candidates)} is more than the image's {width * height} pixels")
    source = warehouse.SourceInfo(str(path.resolve()), "image", (str(path.resolve()),))
    dest = warehouse.check_destination(out, source)
    key = warehouse.run_key(FLOW_NAME, p, source.fingerprint(), emdask.__version__)
    return ImagePlan(str(path.resolve()), str(dest), width, height, img.mode,
                     img.format or "", candidates, key, p)


def image_features(rgb, position_weight=None):
    """Pixel features: R, G, B and, with a position weight, x and y scaled to 0..255 × weight.

    Parameters
    ----------
    rgb : ndarray of shape (height, width, 3), uint8
    position_weight : float or None

    Returns
    -------
    ndarray of shape (height * width, 3 or 5), float32
    """
    h, w, _ = rgb.shape
    colour = rgb.reshape(-1, 3).astype(np.float32)
    if not position_weight:
        return colour
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs *= 255.0 * position_weight / max(1, w - 1)
    ys *= 255.0 * position_weight / max(1, h - 1)
    return np.concatenate([colour, xs.reshape(-1, 1), ys.reshape(-1, 1)], axis=1)


@io_task
def write_features(plan: ImagePlan, staged: str) -> str:
    """Decode the image and write its pixel features to a work file in staging."""
    img = _open_image(plan.image).convert("RGB")
    weight = plan.parameters["position_weight"] if plan.parameters["position"] else None
    features = image_features(np.asarray(img), weight)
    work = Path(staged) / "work"
    work.mkdir(exist_ok=True)
    path = work / "features.npy"
    np.save(path, features)
    get_run_logger().info(
        f"{plan.width}x{plan.height} image: {features.shape[0]:,} pixels, "
        f"{features.shape[1]} features each"
    )
    return str(path)


def _pixel_array(path):
    """The feature file as a Dask array read in chunks of rows by the workers."""
    import dask
    import dask.array as da

    shape = np.load(path, mmap_mode="r").shape
    bounds = list(range(0, shape[0], CHUNK_PIXELS)) + [shape[0]]
    chunks = [
        da.from_delayed(dask.delayed(read_rows)(path, a, b), shape=(b - a, shape[1]), dtype=np.float32)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return da.concatenate(chunks, axis=0)


@step_task
def fit_pixels(plan: ImagePlan, features: str, staged: str) -> FitResult:
    """Fit a Gaussian mixture on the pixels (every candidate k at once when k is searched)."""
    logger = get_run_logger()
    p = plan.parameters
    X = _pixel_array(features)
    estimator = emdask.GaussianMixture(
        plan.candidates[0], covariance_type=p["covariance_type"], tol=p["tol"],
        max_iter=p["max_iter"], random_state=p["random_state"],
    )
    started = time.perf_counter()
    selection = []
    if len(plan.candidates) == 1:
        logger.info(f"fitting {estimator!r} on {plan.pixels:,} pixels")
        model = estimator.fit(X, callbacks=[progress_callback(tol=estimator.tol)])
        n_passes = model.n_passes_
    else:
        ks = plan.candidates
        logger.info(f"fitting k = {ks[0]}..{ks[-1]} together on {plan.pixels:,} pixels; choosing by BIC")

        def callback(info):
            logger.info(f"k={ks[info.model]:<3d}" + emdask.engine.format_iteration(info))

        result = emdask.select_components(estimator, X, n_components=ks, criterion="bic",
                                          callbacks=[callback])
        model, n_passes = result.best_estimator_, result.n_passes_
        result.table_.to_csv(Path(staged) / "selection.csv", index=False)
        result.plot(str(Path(staged) / "bic.png"))
        selection = json.loads(result.table_.to_json(orient="records"))
        logger.info(f"BIC chose k={result.best_n_components_}")
    seconds = time.perf_counter() - started
    path = save_model(model, str(Path(staged) / "model"))
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


def segment_colours(model):
    """Each segment's mean colour (the R, G, B part of its mean), as uint8 of shape (k, 3)."""
    return np.clip(np.rint(np.asarray(model.means_)[:, :3]), 0, 255).astype(np.uint8)


@io_task
def write_labels(plan: ImagePlan, fit: FitResult, features: str, staged: str) -> dict:
    """Label every pixel, then write the label array and the image in segment mean colours."""
    from PIL import Image

    model = load_model(fit.model_path)
    labels = model.predict(_pixel_array(features)).compute()
    dtype = np.uint8 if fit.n_components <= 256 else np.uint16
    labels = labels.astype(dtype).reshape(plan.height, plan.width)
    np.save(Path(staged) / "labels.npy", labels)
    Image.fromarray(segment_colours(model)[labels]).save(Path(staged) / "segments.png")
    return {"labels": "labels.npy", "image": "segments.png"}


@io_task
def validate_labels(plan: ImagePlan, fit: FitResult, staged: str) -> list:
    """Check the label array and the labelled image: right shape, labels in range; drop work files."""
    from PIL import Image

    labels = np.load(Path(staged) / "labels.npy")
    if labels.shape != (plan.height, plan.width):
        raise warehouse.ValidationError(
            f"labels.npy has shape {labels.shape}, the image is {plan.height}x{plan.width}"
        )
    if labels.max() >= fit.n_components:
        raise warehouse.ValidationError(f"labels.npy has labels outside 0..{fit.n_components - 1}")
    with Image.open(Path(staged) / "segments.png") as img:
        if img.size != (plan.width, plan.height):
            raise warehouse.ValidationError(f"segments.png is {img.size}, not {(plan.width, plan.height)}")
    counts = np.bincount(labels.ravel(), minlength=fit.n_components)
    for f in (Path(staged) / "work").glob("*"):
        f.unlink()
    (Path(staged) / "work").rmdir()
    get_run_logger().info(f"validated labels: pixels per segment {counts.tolist()}")
    return [int(c) for c in counts]


@flow(name=FLOW_NAME, validate_parameters=True)
def segment_image(
    image: str,
    out: str,
    n_components: Optional[Annotated[int, Field(ge=1, le=256)]] = None,
    k_min: Annotated[int, Field(ge=1, le=256)] = 2,
    k_max: Annotated[int, Field(ge=1, le=256)] = 8,
    position: bool = False,
    position_weight: Annotated[float, Field(gt=0)] = 1.0,
    covariance_type: Literal["full", "diag", "tied", "spherical"] = "full",
    max_iter: Annotated[int, Field(ge=1, le=100_000)] = 100,
    tol: Annotated[float, Field(gt=0)] = 1e-3,
    random_state: Annotated[int, Field(ge=0)] = 0,
    dask_address: Optional[str] = None,
    keep_versions: Annotated[int, Field(ge=1)] = 5,
    force: bool = False,
) -> dict:
    """Segment an image by colour (and position) and publish the labelled image as a version of ``out``.

    Args:
        image: PNG or JPEG file (any size Pillow reads; millions of pixels are fine).
        out: Directory whose versions this run publishes (see ``pipelines.warehouse``).
        n_components: Number of segments; default: chosen by BIC among k_min..k_max.
        k_min: Smallest number of segments tried when n_components is not given.
        k_max: Largest number of segments tried when n_components is not given.
        position: Add each pixel's x and y to its colour, for spatially coherent segments.
        position_weight: Weight of position against colour (x and y span 0..255 × weight).
        covariance_type: Covariance of the pixel features within a segment.
        max_iter: Maximum EM iterations.
        tol: Convergence threshold on the change of the mean log-likelihood per pixel.
        random_state: Seed; the same seed on the same image gives the same output.
        dask_address: Dask scheduler to use; default: $DASK_SCHEDULER_ADDRESS, else a local
            cluster on 127.0.0.1 for the run.
        keep_versions: Published versions to keep in ``out``.
        force: Recompute even when the published version already holds this run.
    """
    started = time.perf_counter()
    parameters = model_parameters(
        n_components=n_components, k_min=k_min, k_max=k_max, position=position,
        position_weight=position_weight, covariance_type=covariance_type,
        max_iter=max_iter, tol=tol, random_state=random_state,
    )
    plan = plan_image(image, out, parameters)
    done = None if force else up_to_date(plan.out, plan.key)
    if done is not None:
        return _summary_from_manifest(done)
    with dask_client(dask_address):
        staged = stage_version(plan.out, plan.key)
        try:
            features = write_features(plan, staged)
            fit = fit_pixels(plan, features, staged)
            outputs = write_labels(plan, fit, features, staged)
            counts = validate_labels(plan, fit, staged)
            plot = plot_convergence(
                str(Path(staged) / "convergence.png"), fit.lower_bounds,
                f"GaussianMixture on pixels, k={fit.n_components}: EM convergence",
            )
            outputs.update(model="model", convergence_plot=Path(plot).name)
            if fit.selection:
                outputs.update(selection_plot="bic.png", selection="selection.csv")
            manifest = base_manifest(FLOW_NAME, plan.key, plan.parameters, None, started)
            manifest.update(
                source={"path": plan.image, "format": plan.format, "mode": plan.mode,
                        "width": plan.width, "height": plan.height},
                rows=plan.pixels,
                counts=counts,
                colours=segment_colours(load_model(fit.model_path)).tolist(),
                outputs=outputs,
                fit=fit.to_dict() | {"model_path": "model"},
            )
            write_version_manifest(staged, manifest)
            version = publish_version(plan.out, staged, keep_versions)
        except BaseException:
            discard(staged)
            raise
    summary = _summary_from_manifest(version)
    _report(summary)
    return summary


def _summary_from_manifest(version_dir):
    version_dir = Path(version_dir)
    m = warehouse.read_manifest(version_dir)
    fit, out = m["fit"], m["outputs"]
    plots = [str(version_dir / out["convergence_plot"])]
    if "selection_plot" in out:
        plots.append(str(version_dir / out["selection_plot"]))
    return {
        "flow": FLOW_NAME,
        "version": m["version"],
        "path": str(version_dir),
        "pixels": m["rows"],
        "width": m["source"]["width"],
        "height": m["source"]["height"],
        "n_components": fit["n_components"],
        "searched": [row["n_components"] for row in fit["selection"]],
        "selection": fit["selection"],
        "counts": m["counts"],
        "colours": m["colours"],
        "n_iter": fit["n_iter"],
        "converged": fit["converged"],
        "seconds": m["seconds"],
        "image": str(version_dir / out["image"]),
        "labels": str(version_dir / out["labels"]),
        "model_path": str(version_dir / "model"),
        "plots": plots,
    }


def _report(summary):
    facts = {
        "version": summary["path"],
        "image": f"{summary['width']}x{summary['height']} ({summary['pixels']:,} pixels)",
        "segments": summary["n_components"],
        "k searched": (f"{summary['searched'][0]}..{summary['searched'][-1]} by BIC"
                       if summary["searched"] else "no (given)"),
        "EM iterations": f"{summary['n_iter']} ({'converged' if summary['converged'] else 'not converged'})",
        "time": format_duration(summary["seconds"]),
    }
    rows = [
        {"segment": j, "pixels": n, "share": round(n / summary["pixels"], 6),
         "colour": "#%02x%02x%02x" % tuple(c)}
        for j, (n, c) in enumerate(zip(summary["counts"], summary["colours"]))
    ]
    tables = [("Segments", rows, list(rows[0]))]
    if summary["selection"]:
        tables.append(("BIC by number of segments", summary["selection"], list(summary["selection"][0])))
    report_run("segment-image", "Image segmentation", facts, tables, rows)
