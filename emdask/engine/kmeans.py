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
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "kmeans_parallel",
    "kmeans_plusplus",
    "sample_rows",
    "sq_distances",
    "nearest",
    "kmeans_passes",
]


def kmeans_passes(n_rounds, n_lloyd):
    """Passes over the data that :func:`kmeans_parallel` makes."""
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


def _keys(seed, stage, index, n):
    return np.random.default_rng([int(seed), int(stage), int(index)]).random(n)


def _fill(rows, shift):
    return np.where(np.isnan(rows), shift, rows)


# -- pass helpers (run inside Dask tasks) --------------------------------------------------


def _smallest_keys_chunk(block, index, seed, size, shift):
    keys = _keys(seed, 0, index, block.shape[0])
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
    """
    shift = data.summary.col_mean if shift is None else shift
    keys, rows = data.map_reduce(
        _smallest_keys_chunk, seed, size, shift, combine=_smallest_keys_combine(size)
    )
    return rows


def _round_chunk(block, index, centers, shift, seed, stage, cap):
    X = block - shift
    _, d2 = nearest(X, centers)
    keys = _keys(seed, stage, index, block.shape[0])
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
    shift = data.summary.col_mean
    ell = oversampling * n_clusters
    cap = int(math.ceil(3 * ell)) + 32
    first = sample_rows(data, 1, seed, shift)
    candidates = first - shift
    for r in range(n_rounds):
        psi, ratio, rows = data.map_reduce(
            _round_chunk, candidates, shift, seed, r + 1, cap, combine=_round_combine(cap)
        )
        if psi <= 0:
            continue  # every row already sits on a candidate; the pass is still counted
        chosen = rows[ratio > psi / ell]
        candidates = np.vstack([candidates, chosen])
    counts = data.map_reduce(_count_chunk, candidates, shift)
    rng = np.random.default_rng([int(seed), 0xC0FFEE])
    keep = counts > 0
    cand, weight = candidates[keep], counts[keep]
    if cand.shape[0] <= n_clusters:
        extra = n_clusters - cand.shape[0]
        centers = np.vstack([cand, cand[rng.choice(cand.shape[0], size=extra)]]) if extra else cand
    else:
        centers = kmeans_plusplus(cand, n_clusters, rng, sample_weight=weight)
        centers = weighted_lloyd(cand, centers, weight)
    for _ in range(n_lloyd):
        sums, counts, _ = data.map_reduce(_lloyd_chunk, centers, shift, combine=_add3)
        centers = np.where(counts > 0, sums / np.maximum(counts, 1e-300), centers)
    return centers + shift


def kmeans_cost(data, centers):
    """Sum of squared distances of every row to its nearest centre (one pass)."""
    shift = data.summary.col_mean
    return data.map_reduce(_lloyd_chunk, centers - shift, shift, combine=_add3)[2]
