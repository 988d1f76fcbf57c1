"""Seeding centres on data of any size: k-means|| (Bahmani et al., 2012) and k-means++.

k-means|| on a :class:`~emdask.engine.data.BlockData` costs a fixed number of passes:

1. one pass picks the first centre (the row with the smallest random key: uniform);
2. ``n_rounds`` passes each compute every row's squared distance ``D²`` to the current
   candidates and keep the rows with ``u < ℓ·D²/ψ`` (``ℓ = oversampling·k``, ``ψ`` the total
   cost, ``u`` a uniform key from the seed and row position). ``ψ`` is only known once the pass
   is done, so each block returns its rows with the largest ``D²/u`` (a few times ℓ, far more
   than it can expect to keep) and the client applies the exact threshold;
3. one pass weights each candidate by the number of rows nearest to it;
4. the candidates are re-clustered locally by weighted k-means++ and Lloyd;
5. ``n_lloyd`` passes of Lloyd's algorithm on the cluster refine the ``k`` centres.

Total: ``1 + n_rounds + 1 + n_lloyd`` passes. Rows with missing cells use their observed
cells (squared distance over the observed columns, scaled by ``d / d_observed``).
Distances are computed about a shift (the column means) to keep their precision.

Many seedings, the same passes
------------------------------
:func:`kmeans_parallel_many` runs any number of seedings — restarts with different seeds,
candidate numbers of clusters — in the passes one seeding takes: every pass hands each block
to all of them. Seedings that share a seed share one oversampled candidate set (``ℓ`` set
for the largest ``k`` among them) and differ only in the local re-clustering, as the
paper suggests for choosing ``k``. A lone seeding gives exactly what
:func:`kmeans_parallel` gives. Passes: ``1 + n_rounds + 1 + max(n_lloyd)`` whatever the
number of seedings (the first drops out when the first rows come from a sample already
drawn, see :func:`sample_rows_many`).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from .driver import map_reduce_many

from .randomness import STREAMS, row_uniforms, stream_rng

__all__ = [
    "kmeans_parallel",
    "kmeans_parallel_many",
    "kmeans_plusplus",
    "sample_rows",
    "sample_rows_many",
    "sq_distances",
    "nearest",
    "kmeans_passes",
]


def kmeans_passes(n_rounds, n_lloyd):
    """Passes over the data that :func:`kmeans_parallel` (and :func:`kmeans_parallel_many`,
    with ``n_lloyd`` its largest) makes."""
    return 1 + n_rounds + 1 + n_lloyd


def sq_distances(X, centers):
    """Squared Euclidean distances, shape (n_rows, n_centers), over observed cells.

    A row with missing cells gets its observed-cell distance scaled by ``d / d_observed``;
    a row with no observed cell is at distance 0 from every centre.
    """
    miss = np.isnan(X)
    if miss.any():
        obs = ~miss
        X0 = np.where(obs, X, 0.0)
        d2 = (X0 * X0).sum(1)[:, None] - 2.0 * X0 @ centers.T + obs.astype(np.float64) @ (centers**2).T
        n_obs = obs.sum(1)
        d2 *= (X.shape[1] / np.maximum(n_obs, 1))[:, None]
        d2[n_obs == 0] = 0.0
    else:
        d2 = (X * X).sum(1)[:, None] - 2.0 * X @ centers.T + (centers**2).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def nearest(X, centers):
    """Index of the nearest centre and the squared distance to it, per row."""
    d2 = sq_distances(X, centers)
    labels = d2.argmin(axis=1)
    return labels, d2[np.arange(X.shape[0]), labels]


def _fill(rows, shift):
    return np.where(np.isnan(rows), shift, rows)


# -- pass helpers (run inside Dask tasks) --------------------------------------------------


def _smallest_keys_chunk(block, index, seed, size, shift, starts):
    keys = row_uniforms(seed, "sample", starts[index], block.shape[0])
    informative = ~np.isnan(block).all(axis=1)
    keys = np.where(informative, keys, np.inf)
    take = np.argsort(keys, kind="stable")[:size]
    take = take[np.isfinite(keys[take])]
    return keys[take], _fill(block[take], shift)


def _smallest_keys_combine(size):
    def combine(a, b):
        keys = np.concatenate([a[0], b[0]])
        rows = np.concatenate([a[1], b[1]])
        take = np.argsort(keys, kind="stable")[:size]
        return keys[take], rows[take]

    return combine


def sample_rows(data, size, seed, shift=None):
    """A uniform sample (without replacement) of ``size`` rows, in one pass.

    Every row gets a uniform key from the seed and its position; the sample is the rows with
    the smallest keys, so it does not depend on the cluster. Missing cells are filled with
    ``shift`` (default: the column means); rows with no observed cell are never drawn.
    The rows come in key order, so the first ``m`` rows of a sample are the sample of
    size ``m`` from the same seed.
    """
    return sample_rows_many(data, {seed: size}, shift)[seed]


def sample_rows_many(data, sizes, shift=None):
    """:func:`sample_rows` for several seeds in one pass.

    Parameters
    ----------
    data : BlockData
    sizes : dict of int to int
        Rows wanted per seed.
    shift : ndarray of shape (n_features,), optional

    Returns
    -------
    dict of int to ndarray
        The sample of each seed, equal to ``sample_rows(data, size, seed, shift)``.
    """
    shift = data.summary.col_mean if shift is None else shift
    seeds = list(sizes)
    starts = data.row_starts
    tasks = [
        (
            _smallest_keys_chunk,
            (seed, int(sizes[seed]), shift, starts),
            _smallest_keys_combine(int(sizes[seed])),
        )
        for seed in seeds
    ]
    results = map_reduce_many(data, tasks)
    return {seed: rows for seed, (_, rows) in zip(seeds, results)}


def _round_chunk(block, index, centers, shift, seed, round_, cap, starts):
    X = block - shift
    _, d2 = nearest(X, centers)
    keys = row_uniforms(seed, "kmeans_round", starts[index], block.shape[0], index=round_)
    with np.errstate(divide="ignore"):
        ratio = d2 / np.maximum(keys, 1e-300)
    take = np.argsort(-ratio, kind="stable")[:cap]
    take = take[ratio[take] > 0]
    return d2.sum(), ratio[take], _fill(X[take], 0.0)


def _round_combine(cap):
    def combine(a, b):
        ratio = np.concatenate([a[1], b[1]])
        rows = np.concatenate([a[2], b[2]])
        take = np.argsort(-ratio, kind="stable")[:cap]
        return a[0] + b[0], ratio[take], rows[take]

    return combine


def _count_chunk(block, index, centers, shift):
    labels, _ = nearest(block - shift, centers)
    informative = ~np.isnan(block).all(axis=1)
    return np.bincount(labels[informative], minlength=centers.shape[0]).astype(np.float64)


def _lloyd_chunk(block, index, centers, shift):
    X = block - shift
    labels, d2 = nearest(X, centers)
    obs = ~np.isnan(X)
    informative = obs.any(axis=1)
    onehot = np.zeros((X.shape[0], centers.shape[0]))
    onehot[np.arange(X.shape[0])[informative], labels[informative]] = 1.0
    return onehot.T @ np.where(obs, X, 0.0), onehot.T @ obs.astype(np.float64), d2.sum()


def _add3(a, b):
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


# -- local algorithms ---------------------------------------------------------------------


def kmeans_plusplus(X, n_clusters, rng, sample_weight=None, n_local_trials=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii) on in-memory rows.

    Parameters
    ----------
    X : ndarray of shape (n, d), complete rows
    n_clusters : int
    rng : numpy.random.Generator
    sample_weight : ndarray of shape (n,), optional

    Returns
    -------
    ndarray of shape (n_clusters, d)
    """
    n, d = X.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    centers = np.empty((n_clusters, d))
    first = rng.choice(n, p=w / w.sum())
    centers[0] = X[first]
    closest = sq_distances(X, centers[:1])[:, 0]
    for c in range(1, n_clusters):
        pot = closest @ w
        if pot <= 0:  # fewer distinct points than clusters: repeat one
            centers[c] = X[rng.choice(n, p=w / w.sum())]
            continue
        cand = rng.choice(n, size=n_local_trials, p=(closest * w) / pot)
        d_cand = np.minimum(closest[None, :], sq_distances(X, X[cand]).T)
        best = int(np.argmin(d_cand @ w))
        centers[c] = X[cand[best]]
        closest = d_cand[best]
    return centers


def weighted_lloyd(X, centers, sample_weight, n_iter=20):
    """Lloyd's algorithm on in-memory weighted rows; empty clusters keep their centre."""
    centers = centers.copy()
    for _ in range(n_iter):
        labels, _ = nearest(X, centers)
        onehot = np.zeros((X.shape[0], centers.shape[0]))
        onehot[np.arange(X.shape[0]), labels] = sample_weight
        mass = onehot.sum(axis=0)
        new = np.where(mass[:, None] > 0, (onehot.T @ X) / np.maximum(mass, 1e-300)[:, None], centers)
        if np.allclose(new, centers, rtol=0, atol=0):
            break
        centers = new
    return centers


# -- k-means|| ----------------------------------------------------------------------------


def kmeans_parallel(data, n_clusters, seed, *, oversampling=2.0, n_rounds=5, n_lloyd=2):
    """k-means|| centres of a :class:`BlockData`, in ``1 + n_rounds + 1 + n_lloyd`` passes.

    Parameters
    ----------
    data : BlockData
    n_clusters : int
    seed : int
    oversampling : float
        ``ℓ / k``: rows expected to be drawn per round, per cluster.
    n_rounds : int
        Sampling rounds (the paper's ``r``; 5 is plenty in practice).
    n_lloyd : int
        Lloyd iterations on the whole data after the local re-clustering.

    Returns
    -------
    ndarray of shape (n_clusters, n_features)
    """
    return kmeans_parallel_many(
        data, [(n_clusters, seed, n_lloyd)], oversampling=oversampling, n_rounds=n_rounds
    )[0]


def kmeans_parallel_many(data, jobs, *, oversampling=2.0, n_rounds=5, first_rows=None):
    """k-means|| for several ``(n_clusters, seed, n_lloyd)`` seedings in shared passes.

    Seedings with the same seed share one candidate set, oversampled for the largest
    ``n_clusters`` among them (``ℓ = oversampling · max k``), then each is re-clustered
    locally to its own ``k`` and refined by its own ``n_lloyd`` Lloyd passes (all seedings'
    Lloyd steps share each pass).

    Parameters
    ----------
    data : BlockData
    jobs : sequence of (n_clusters, seed, n_lloyd)
    oversampling, n_rounds : see :func:`kmeans_parallel`
    first_rows : dict of int to ndarray, optional
        Samples already drawn with :func:`sample_rows_many` (default shift) for these seeds;
        their first row is the first candidate, which saves the first pass.

    Returns
    -------
    list of ndarray
        The centres of each job, shape (n_clusters, n_features); a job alone gives what
        :func:`kmeans_parallel` gives.

    Notes
    -----
    Passes: ``n_rounds + 1 + max(n_lloyd)``, plus one when ``first_rows`` does not cover
    every seed.
    """
    jobs = [(int(k), int(seed), int(n_lloyd)) for k, seed, n_lloyd in jobs]
    if not 0 <= n_rounds <= STREAMS["kmeans_round"].count:
        raise ValueError(
            f"n_rounds={n_rounds} must be in [0, {STREAMS['kmeans_round'].count}] "
            "(5 is plenty in practice)"
        )
    if not jobs:
        return []
    shift = data.summary.col_mean
    seeds = list(dict.fromkeys(seed for _, seed, _ in jobs))
    ell = {s: oversampling * max(k for k, seed, _ in jobs if seed == s) for s in seeds}
    cap = {s: int(math.ceil(3 * ell[s])) + 32 for s in seeds}
    first_rows = dict(first_rows or {})
    missing = [s for s in seeds if s not in first_rows or len(first_rows[s]) == 0]
    if missing:
        first_rows.update(sample_rows_many(data, {s: 1 for s in missing}, shift))
    candidates = {s: first_rows[s][:1] - shift for s in seeds}
    starts = data.row_starts
    for r in range(n_rounds):
        tasks = [
            (_round_chunk, (candidates[s], shift, s, r, cap[s], starts), _round_combine(cap[s]))
            for s in seeds
        ]
        for s, (psi, ratio, rows) in zip(seeds, map_reduce_many(data, tasks)):
            if psi <= 0:
                continue  # every row already sits on a candidate; the pass is still counted
            candidates[s] = np.vstack([candidates[s], rows[ratio > psi / ell[s]]])
    tasks = [(_count_chunk, (candidates[s], shift), operator.add) for s in seeds]
    weights = dict(zip(seeds, map_reduce_many(data, tasks)))
    centers = []
    for k, seed, _ in jobs:
        rng = stream_rng(seed, "kmeans_recluster")
        keep = weights[seed] > 0
        cand, weight = candidates[seed][keep], weights[seed][keep]
        if cand.shape[0] <= k:
            extra = k - cand.shape[0]
            c = np.vstack([cand, cand[rng.choice(cand.shape[0], size=extra)]]) if extra else cand
        else:
            c = kmeans_plusplus(cand, k, rng, sample_weight=weight)
            c = weighted_lloyd(cand, c, weight)
        centers.append(c)
    for it in range(max(n_lloyd for _, _, n_lloyd in jobs)):
        live = [j for j, (_, _, n_lloyd) in enumerate(jobs) if n_lloyd > it]
        tasks = [(_lloyd_chunk, (centers[j], shift), _add3) for j in live]
        for j, (sums, counts, _) in zip(live, map_reduce_many(data, tasks)):
            centers[j] = np.where(counts > 0, sums / np.maximum(counts, 1e-300), centers[j])
    return [c + shift for c in centers]


def kmeans_cost(data, centers):
    """Sum of squared distances of every row to its nearest centre (one pass)."""
    shift = data.summary.col_mean
    return data.map_reduce(_lloyd_chunk, centers - shift, shift, combine=_add3)[2]
