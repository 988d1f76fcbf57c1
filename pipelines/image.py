"""The ``segment-image`` flow: segment an image into regions by colour (and position).

Story: check the image from its header (size within ``max_pixels``, file intact) → one worker
decodes it once, band by band (whole rows, about :data:`CHUNK_PIXELS` pixels each), staging every
band's RGB pixels beside the new version → fit a Gaussian mixture on the pixels (RGB, optionally x
and y) as a chunked Dask array whose chunks the workers read from the staged bands (every
candidate k at once and the best by BIC when k is not given) → the workers label their bands →
one worker streams the labelled bands into the label array and the segment map → validate →
commit the new version in one step → report.

Memory is bounded by the band, not the image: neither the flow process nor any worker holds the
whole image (except a worker decoding a format it cannot stream; see
:mod:`pipelines.partitions`), and the EM passes read the staged uint8 bands instead of keeping
float64 pixels in the workers' memory. The staged bands take at most 4 bytes a pixel (3 for the
RGB bands, 1 for the label bands) and are removed before the commit.

The image is a local path or an object-store URL; ``OUT`` a local or object-store folder.
A published version of ``OUT`` holds::

    segments.png               the image, every pixel in its segment's mean colour (a palette
                               PNG: palette = segment colours, pixel value = label)
    labels.npy                 segment of every pixel, uint8, shape (height, width)
    model/                     the fitted GaussianMixture (emdask.load reads it)
    convergence.png            mean log-likelihood per EM iteration
    bic.png, selection.csv     criterion against k, when k was searched
    manifest.json
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
from prefect import flow, get_run_logger
from pydantic import Field

import emdask

from .cluster import dask_client
from .errors import InputError, ValidationError, one_line
from .partitions import (
    CorruptImage,
    image_features,
    image_header,
    label_band,
    pixel_band,
    stage_image,
    verify_image,
    write_segment_files,
)
from .reports import format_duration, log_singular_candidates, warnings_to_log
from .sources import filesystem, file_token, is_local
from .tasks import (
    FitResult,
    base_manifest,
    commit_version,
    io_task,
    load_model,
    plot_convergence,
    progress_callback,
    report_run,
    save_model,
    step_task,
    up_to_date,
)
from .versions import Destination, Published, open_destination, run_key

__all__ = ["ImagePlan", "check_inputs", "image_features", "model_parameters", "segment_image"]

FLOW_NAME = "segment-image"
#: Pixels per band (whole rows, at least one): the chunk the workers decode, fit and label.
CHUNK_PIXELS = 500_000


@dataclass
class ImagePlan:
    """The checked inputs of an image segmentation run."""

    image: str
    destination: Destination
    width: int
    height: int
    mode: str
    format: str
    candidates: list
    key: str
    parameters: dict = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict, repr=False)

    @property
    def pixels(self):
        return self.width * self.height

    @property
    def bands(self):
        """``(first row, end row)`` of every band, top to bottom."""
        rows = max(1, CHUNK_PIXELS // self.width)
        return [(a, min(a + rows, self.height)) for a in range(0, self.height, rows)]


def model_parameters(n_components=None, k_min=2, k_max=8, position=False, position_weight=1.0,
                     covariance_type="full", max_iter=100, tol=1e-3, random_state=0, **_):
    """The run's model parameters (those that, with the image, determine its output)."""
    return dict(
        n_components=n_components, k_min=None if n_components else k_min,
        k_max=None if n_components else k_max, position=position,
        position_weight=position_weight if position else None, covariance_type=covariance_type,
        max_iter=max_iter, tol=tol, random_state=random_state,
    )


def check_inputs(image, out, storage_options=None, max_pixels=None, **options):
    """Check a run's inputs as its first task does, without running it; raises InputError."""
    return plan_image.fn(image, out, model_parameters(**options), storage_options, max_pixels)


def pixel_limit(max_pixels=None):
    """The largest image (width × height) a run takes: ``max_pixels``, by default Pillow's own
    decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels), or None."""
    from PIL import Image

    return int(max_pixels) if max_pixels else Image.MAX_IMAGE_PIXELS


def _read_header(url, storage_options=None):
    import struct

    from PIL import Image, UnidentifiedImageError

    try:
        return image_header(url, storage_options)
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        raise InputError(
            f"{url} is not an image Pillow can read (PNG, JPEG, ...): {one_line(exc)}"
        ) from None
    except OSError as exc:
        raise InputError(f"cannot read image {url}: {one_line(exc)}") from None


def _check_limit(url, width, height, max_pixels):
    limit = pixel_limit(max_pixels)
    if limit is not None and width * height > limit:
        raise InputError(
            f"image {url} has {width * height:,} pixels ({width}x{height}), more than the limit "
            f"of {limit:,} pixels; raise --max-pixels (flow parameter max_pixels) above "
            f"{width * height:,} to segment it, if the image is trusted"
        )


def _verify(url, storage_options=None):
    import struct

    from PIL import Image

    try:
        verify_image(url, storage_options)
    except (SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as exc:
        raise InputError(f"image {url} is damaged: {one_line(exc)}") from None
    except OSError as exc:
        if "truncated" in str(exc).lower():  # Pillow's "Truncated File Read"
            raise InputError(f"image {url} is damaged: {one_line(exc)}") from None
        raise InputError(f"cannot read image {url}: {one_line(exc)}") from None


@io_task
def plan_image(image: str, out: str, parameters: dict,
               storage_options: Optional[dict] = None,
               max_pixels: Optional[int] = None) -> ImagePlan:
    """Check the image from its header (no pixel decoded) and the output folder."""
    text = str(image).strip()
    if not text:
        raise InputError("image is empty; give a PNG or JPEG file")
    fs, path = filesystem(text, storage_options)
    if is_local(text):
        text = str(Path(text).expanduser().resolve())
    try:
        found = fs.isfile(path)
    except Exception as exc:
        raise InputError(f"cannot reach image {text}: {one_line(exc)}") from None
    if not found:
        raise InputError(f"image {text} does not exist or is not a file; give a PNG or JPEG file")
    width, height, mode, fmt = _read_header(text, storage_options)
    _check_limit(text, width, height, max_pixels)
    _verify(text, storage_options)
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
    destination = open_destination(out, storage_options)
    if destination.kind != "folder":
        raise InputError(f"destination {destination.url} is a {destination.kind} table; "
                         "segment-image publishes an image and a label array: give a folder")
    destination.check(None)
    info = fs.info(path)
    token = file_token(info) or _digest(fs, path)
    key = run_key(FLOW_NAME, p, [text, int(info.get("size") or 0), token], emdask.__version__)
    return ImagePlan(text, destination, width, height, mode, fmt, candidates,
                     key, p, dict(storage_options or {}))


def _digest(fs, path):
    import hashlib

    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _join(folder, name):
    return posixpath.join(folder, name) if "://" in str(folder) else str(Path(folder) / name)


def _position_weight(plan):
    return plan.parameters["position_weight"] if plan.parameters["position"] else None


@io_task
def stage_pixels(plan: ImagePlan, version) -> list:
    """Decode the image once on a worker, band by band, staging each band's RGB pixels in the
    version's ``work/`` folder; returns the bands' URLs."""
    import dask

    started = time.perf_counter()
    folder = _join(_join(version.url, "work"), "pixels")
    try:
        urls = dask.delayed(stage_image, pure=False)(
            plan.image, plan.bands, folder, plan.storage_options).compute()
    except CorruptImage as exc:
        raise InputError(f"image {plan.image} is damaged: {exc}") from None
    get_run_logger().info(f"decoded {plan.pixels:,} pixels into {len(urls)} bands of up to "
                          f"{plan.bands[0][1] * plan.width:,} pixels in "
                          f"{format_duration(time.perf_counter() - started)}")
    return urls


def _pixel_array(plan, bands):
    """The image's pixel features as a Dask array whose chunks the workers read from the
    staged bands."""
    import dask
    import dask.array as da

    weight = _position_weight(plan)
    d = 5 if weight else 3
    chunks = [
        da.from_delayed(
            dask.delayed(pixel_band)(url, a, plan.height, weight, plan.storage_options),
            shape=((b - a) * plan.width, d), dtype=np.float32,
        )
        for url, (a, b) in zip(bands, plan.bands)
    ]
    return da.concatenate(chunks, axis=0)


@step_task
def fit_pixels(plan: ImagePlan, bands: list, version) -> FitResult:
    """Fit a Gaussian mixture on the pixels (every candidate k at once when k is searched)."""
    logger = get_run_logger()
    p = plan.parameters
    X = _pixel_array(plan, bands)
    # persist=False: every pass reads the staged uint8 bands again rather than keeping the
    # pixels as float64 (8 times their size) in the workers' memory
    estimator = emdask.GaussianMixture(
        plan.candidates[0], covariance_type=p["covariance_type"], tol=p["tol"],
        max_iter=p["max_iter"], random_state=p["random_state"], persist=False,
    )
    started = time.perf_counter()
    selection = []
    with warnings_to_log(logger):
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
            result.table_.to_csv(version.local / "selection.csv", index=False)
            result.plot(str(version.local / "bic.png"))
            selection = json.loads(result.table_.to_json(orient="records"))
            log_singular_candidates(logger, result.table_)
            logger.info(f"BIC chose k={result.best_n_components_}")
    seconds = time.perf_counter() - started
    path = save_model(model, str(version.local / "model"))
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
def write_labels(plan: ImagePlan, bands: list, fit: FitResult, version) -> dict:
    """The workers label their bands; one worker streams them into the label array and the
    segment map (each segment in its mean colour); the staged bands are then removed."""
    import dask

    from .sources import filesystem

    model = load_model(fit.model_path)
    work = _join(version.url, "work")
    shared = dask.delayed(model, traverse=False)
    weight = _position_weight(plan)
    label_urls = [_join(_join(work, "labels"), f"band-{i:05d}.npy") for i in range(len(bands))]
    fs, root = filesystem(_join(work, "labels"), plan.storage_options)
    fs.makedirs(root, exist_ok=True)
    counts = dask.compute(*[
        dask.delayed(label_band, pure=False)(url, a, plan.height, weight, shared, out,
                                             plan.storage_options)
        for url, (a, _), out in zip(bands, plan.bands, label_urls)
    ])
    dask.delayed(write_segment_files, pure=False)(
        label_urls, plan.width, plan.height, segment_colours(model),
        _join(version.url, "labels.npy"), _join(version.url, "segments.png"),
        plan.storage_options,
    ).compute()
    fs, root = filesystem(work, plan.storage_options)
    fs.rm(root, recursive=True)
    total = np.sum(counts, axis=0)
    return {"labels": "labels.npy", "image": "segments.png", "counts": [int(c) for c in total]}


#: Bytes of labels.npy counted at a time by the validation (bincount takes 8 bytes a label).
_VALIDATE_BYTES = 2**18


@io_task
def validate_labels(plan: ImagePlan, fit: FitResult, version, counts: list) -> list:
    """Check the label array and the segment map, reading them as streams: right shape, labels
    in range and counted as the workers counted them, the map's PNG intact."""
    from .partitions import open_image
    from .sources import filesystem

    fs, path = filesystem(_join(version.url, "labels.npy"), plan.storage_options)
    found = np.zeros(256, np.int64)
    with fs.open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if shape != (plan.height, plan.width) or fortran or dtype != np.uint8:
            raise ValidationError(f"labels.npy holds {dtype} of shape {shape}; the image is "
                                  f"{plan.height}x{plan.width}")
        left = plan.pixels
        while left:
            block = f.read(min(left, _VALIDATE_BYTES))
            if not block:
                raise ValidationError(f"labels.npy ends {left:,} pixels short")
            found += np.bincount(np.frombuffer(block, np.uint8), minlength=256)
            left -= len(block)
    if found[fit.n_components:].any():
        raise ValidationError(f"labels.npy has labels outside 0..{fit.n_components - 1}")
    found = [int(c) for c in found[:fit.n_components]]
    if found != list(counts):
        raise ValidationError(f"labels.npy counts {found} pixels per segment; the workers "
                              f"labelled {list(counts)}")
    fs, path = filesystem(_join(version.url, "segments.png"), plan.storage_options)
    with fs.open(path, "rb") as f:
        img = open_image(f)
        if img.size != (plan.width, plan.height) or img.mode != "P":
            raise ValidationError(f"segments.png is a {img.mode} image of {img.size}, not a "
                                  f"palette image of {(plan.width, plan.height)}")
        img.verify()
    get_run_logger().info(f"validated labels: pixels per segment {found}")
    return found


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
    max_pixels: Optional[Annotated[int, Field(ge=1)]] = None,
    dask_address: Optional[str] = None,
    keep_versions: Annotated[int, Field(ge=1)] = 5,
    force: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
) -> dict:
    """Segment an image by colour (and position) and publish the labelled image as a version of ``out``.

    Args:
        image: PNG or JPEG file, a local path or an object-store URL. Non-interlaced PNGs (1 to
            16 bits a sample) are decoded band by band in bounded memory; other images (JPEG,
            interlaced PNG) are decoded whole, once, on one worker, and staged band by band.
        out: Local or object-store folder whose versions this run publishes (see
            ``pipelines.versions``).
        n_components: Number of segments; default: chosen by BIC among k_min..k_max.
        k_min: Smallest number of segments tried when n_components is not given.
        k_max: Largest number of segments tried when n_components is not given.
        position: Add each pixel's x and y to its colour, for spatially coherent segments.
        position_weight: Weight of position against colour (x and y span 0..255 × weight).
        covariance_type: Covariance of the pixel features within a segment.
        max_iter: Maximum EM iterations.
        tol: Convergence threshold on the change of the mean log-likelihood per pixel.
        random_state: Seed; the same seed on the same image gives the same output.
        max_pixels: Largest image (width × height) taken, checked from the image's header
            before anything is decoded; default: Pillow's decompression-bomb limit
            ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels). Raise it for trusted images.
        dask_address: Dask scheduler to use; default: $DASK_SCHEDULER_ADDRESS, else a local
            cluster on 127.0.0.1 for the run.
        keep_versions: Published versions to keep in ``out``.
        force: Recompute even when the published version already holds this run.
        storage_options: fsspec options of object-store URLs (endpoint, region, ...);
            credentials belong in the environment, not here.
    """
    started = time.perf_counter()
    parameters = model_parameters(
        n_components=n_components, k_min=k_min, k_max=k_max, position=position,
        position_weight=position_weight, covariance_type=covariance_type,
        max_iter=max_iter, tol=tol, random_state=random_state,
    )
    plan = plan_image(image, out, parameters, storage_options, max_pixels)
    done = None if force else up_to_date(plan.destination, plan.key)
    if done is not None:
        return {**_summary(done), "up_to_date": True}
    with dask_client(dask_address):
        with plan.destination.new_version(plan.key, keep_versions) as version:
            bands = stage_pixels(plan, version)
            fit = fit_pixels(plan, bands, version)
            outputs = write_labels(plan, bands, fit, version)
            counts = validate_labels(plan, fit, version, outputs.pop("counts"))
            plot = plot_convergence(
                str(version.local / "convergence.png"), fit.lower_bounds,
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
    return {
        "flow": FLOW_NAME,
        "version": m["version"],
        "path": published.url,
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
        "image": published.join(out["image"]),
        "labels": published.join(out["labels"]),
        "model_path": published.join("model"),
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
