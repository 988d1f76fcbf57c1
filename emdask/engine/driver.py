"""The map-reduce EM driver: one Dask graph per iteration for any number of models.

Each iteration hands every block to every model still iterating (``partial_stats``), adds
the statistics up a tree with fan-in ``split_every``, and runs the M-step on the client.
Reading the data is the expensive part, so several models — restarts, candidate numbers of
components, bootstrap replicates — share each pass; a model that has converged drops out of
later passes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .columns import NonFiniteParameters
from .data import one_blas_thread
from .randomness import row_poisson1
from .squarem import ALGORITHMS, Squarem

__all__ = [
    "EMModel",
    "IterationInfo",
    "run_em",
    "bootstrap_weights",
    "format_iteration",
    "map_reduce_many",
]


@dataclass(eq=False)
class EMModel:
    """One model being fitted: its family, current parameters and history.

    ``bootstrap_seed`` makes the model see the data through Poisson(1) row weights drawn
    from that seed and the block's position (a bootstrap replicate that needs no resampled
    copy of the table, and gives the same weights every pass whatever the cluster).
    """

    family: Any
    params: Any
    bootstrap_seed: int | None = None
    lower_bounds: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    #: SQUAREM state (``algorithm='squarem'``); ``None`` for plain EM
    accelerator: Squarem | None = None
    #: the lower bound the first pass is compared with (a warm start: the previous fit's)
    previous_bound: float = -math.inf

    @property
    def point(self):
        """The parameters the next pass evaluates: ``params`` (the EM image of the last
        accepted point) or, with the accelerator, an extrapolated point."""
        return self.params if self.accelerator is None else self.accelerator.point(self.params)

    @property
    def lower_bound(self):
        return self.lower_bounds[-1] if self.lower_bounds else self.previous_bound


@dataclass(frozen=True)
class IterationInfo:
    """What a callback hears after each model's M-step."""

    iteration: int
    model: int
    n_models: int
    lower_bound: float
    change: float
    seconds: float
    converged: bool
    params: Any
    #: ``False`` for a pass that evaluated an extrapolation and rejected it (SQUAREM)
    accepted: bool = True


def bootstrap_weights(seed, start, n_rows):
    """Poisson(1) weights for rows ``start, ..., start + n_rows - 1``, reproducible from the
    seed and the rows' global positions (whatever the partitioning)."""
    return row_poisson1(seed, "bootstrap", start, n_rows)


def _em_chunk(block, index, models, starts):
    out = []
    for family, params, seed in models:
        weights = None if seed is None else bootstrap_weights(seed, starts[index], block.shape[0])
        out.append(family.partial_stats(block, params, weights))
    return tuple(out)


def _add_tuples(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _many_chunk(block, index, tasks):
    return tuple(chunk(block, index, *args) for chunk, args in tasks)


class _ManyCombine:
    """Element-wise ``combine`` of tuples, one combine function per position."""

    def __init__(self, combines):
        self.combines = tuple(combines)

    def __call__(self, a, b):
        return tuple(f(x, y) for f, x, y in zip(self.combines, a, b))


def map_reduce_many(data, tasks, *, split_every=None):
    """Several reductions in one pass over the data.

    Parameters
    ----------
    data : BlockData
    tasks : sequence of ``(chunk, args, combine)``
        What :meth:`BlockData.map_reduce` would take for each reduction:
        ``chunk(block, block_index, *args)`` and the ``combine`` of two partial results.

    Returns
    -------
    list
        One result per task, equal to what ``data.map_reduce(chunk, *args, combine=combine)``
        returns for it, at the cost of a single pass (none when ``tasks`` is empty).
    """
    tasks = list(tasks)
    if not tasks:
        return []
    spec = tuple((chunk, tuple(args)) for chunk, args, _ in tasks)
    combine = _ManyCombine(combine for _, _, combine in tasks)
    return list(data.map_reduce(_many_chunk, spec, combine=combine, split_every=split_every))


def _non_finite(value, name=""):
    """``(name, array)`` of the first array in ``value`` (a dataclass of arrays, possibly
    nested, or holding a dict of arrays) with a non-finite number, else ``None``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fc":
        return None if np.isfinite(value).all() else (name, value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, str(key))
        if found is not None:
            return found
    return None


def check_finite(params, *, iteration=None, model=None, k=None, what="parameter"):
    """Stop with :class:`~emdask.engine.columns.NonFiniteParameters` when an array of
    ``params`` (a dataclass of arrays: parameters or E-step statistics) holds a non-finite
    number, naming the component (the first axis of a per-component array), the array and
    the iteration."""
    found = _non_finite(params)
    if found is None:
        return
    name, value = found
    if k is None:
        weights = getattr(params, "weights", None)
        k = None if weights is None else np.shape(weights)[0]
    where = ""
    if k is not None and value.ndim and value.shape[0] == k:
        bad = ~np.isfinite(value.reshape(k, -1)).all(axis=1)
        where = f" of component {int(np.flatnonzero(bad)[0])}"
    after = "" if iteration is None else f" at EM iteration {iteration}"
    of = "" if model is None else f" (model {model})"
    raise NonFiniteParameters(
        f"the fit stopped{after}{of}: the {what} {name!r}{where} is not finite (NaN or "
        "infinite), as the data overflow float64 arithmetic from this starting point; rescale "
        "the numeric columns (e.g. standardize them), check them for extreme values, or "
        "start elsewhere"
    )


def format_iteration(info: IterationInfo) -> str:
    """The one-line progress report for an iteration."""
    model = f"  model {info.model}" if info.n_models > 1 else ""
    return (
        f"EM iter {info.iteration:4d}{model}  mean log-lik {info.lower_bound: .10g}  "
        f"change {info.change: .3e}  {info.seconds:6.2f}s"
        + ("" if info.accepted else "  (extrapolation rejected)")
    )


@one_blas_thread
def run_em(
    data,
    models,
    *,
    tol=1e-3,
    max_iter=100,
    callbacks=(),
    verbose=0,
    verbose_interval=10,
    print_fn: Callable[[str], None] = print,
    after_pass: Callable[[list], Any] | None = None,
    algorithm="em",
):
    """Iterate EM on every model until each converges or reaches ``max_iter``.

    Every pass evaluates one point per model: its mean log-likelihood and its EM image (the
    M-step) come from the same statistics. With ``algorithm='squarem'`` the points follow
    :class:`~emdask.engine.squarem.Squarem` (accelerated EM); ``n_iter`` counts passes in both
    cases, and ``lower_bounds`` the log-likelihoods of the accepted points (every point, for
    plain EM). A model's ``params`` are always the EM image of its last accepted point.

    Parameters
    ----------
    data : BlockData
    models : list of EMModel
        Updated in place (``params``, ``lower_bounds``, ``n_iter``, ``converged``).
    tol : float
        Convergence threshold on the change of the mean log-likelihood per row.
    max_iter : int
    callbacks : sequence of callables
        Each is called with an :class:`IterationInfo` after every model's M-step; a
        callback that returns ``True`` stops the fit after the current iteration.
    verbose : int
        ``1`` prints a line per model every ``verbose_interval`` iterations and at its
        last one; ``>= 2`` every iteration.
    verbose_interval : int
    after_pass : callable, optional
        Called with ``models`` once every model of a pass has had its M-step and its
        callbacks (a checkpoint writer, for instance), before the fit stops or goes on.
    algorithm : {'em', 'squarem'}
        Plain EM, or EM accelerated by SQUAREM (a model that already carries an
        accelerator, from a checkpoint, keeps it).

    Returns
    -------
    list of EMModel
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not one of {list(ALGORITHMS)}")
    if algorithm == "squarem":
        for m in models:
            if m.accelerator is None:
                m.accelerator = Squarem()
    stop = False
    while not stop:
        active = [m for m in models if not m.converged and m.n_iter < max_iter]
        if not active:
            break
        start = time.perf_counter()
        points = [m.point for m in active]
        spec = tuple((m.family, p, m.bootstrap_seed) for m, p in zip(active, points))
        all_stats = data.map_reduce(_em_chunk, spec, data.row_starts, combine=_add_tuples)
        for model, point, stats in zip(active, points, all_stats):
            loglik = stats.mean_loglik
            number = models.index(model) if len(models) > 1 else None
            try:
                image = model.family.m_step(stats, point)
            except (ValueError, np.linalg.LinAlgError):
                k = np.shape(getattr(point, "weights", ()))[0] or None
                check_finite(stats, iteration=model.n_iter + 1, model=number, k=k,
                             what="E-step statistic")
                raise
            model.n_iter += 1
            accepted, params = True, image
            if model.accelerator is not None:
                accepted, params = model.accelerator.update(
                    model.family, point, loglik, image, model.lower_bound
                )
            change = 0.0
            if accepted:
                check_finite(params, iteration=model.n_iter, model=number)
                change = loglik - model.lower_bound
                model.params = params
                model.lower_bounds.append(loglik)
                if abs(change) < tol:
                    model.converged = True
            info = IterationInfo(
                iteration=model.n_iter,
                model=models.index(model),
                n_models=len(models),
                lower_bound=model.lower_bound,
                change=change,
                seconds=time.perf_counter() - start,
                converged=model.converged,
                params=model.params,
                accepted=accepted,
            )
            last = model.converged or model.n_iter >= max_iter
            if verbose >= 2 or (
                verbose and (model.n_iter % verbose_interval == 0 or last)
            ):
                print_fn(format_iteration(info))
            for callback in callbacks:
                if callback(info) is True:
                    stop = True
        if after_pass is not None:
            after_pass(models)
    return models
