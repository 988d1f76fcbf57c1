"""k-means|| seeding: quality against scikit-learn's k-means++, passes, shared seedings."""

import warnings

import numpy as np
import pytest
from sklearn.cluster import kmeans_plusplus as sk_kmeans_plusplus
from threadpoolctl import threadpool_limits

from emdask import ConvergenceWarning, GaussianMixture
from emdask.engine import prepare
from emdask.engine.kmeans import (
    kmeans_parallel,
    kmeans_parallel_many,
    kmeans_passes,
    sample_rows,
    sample_rows_many,
)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Dask already runs one block per core: BLAS threads on top only contend (tiny
    matrices wait for busy cores), so these tests run with one BLAS thread per task."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def blobs(seed, n=4000, d=4, k=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 6, (k, d))
    sizes = rng.multinomial(n, rng.dirichlet(np.full(k, 3.0)))
    scales = rng.uniform(0.5, 2.0, k)
    return np.vstack([rng.normal(c, s, (m, d)) for c, s, m in zip(centers, scales, sizes)])


def cost(X, centers):
    """k-means cost by brute force (numpy only)."""
    d2 = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return d2.min(axis=1).sum()


@pytest.mark.parametrize("k", [3, 8, 15])
def test_kmeans_parallel_cost_close_to_kmeans_plusplus(k):
    X = blobs(1)
    data = prepare(X, npartitions=6)
    ours, theirs = [], []
    for seed in range(4):
        ours.append(cost(X, kmeans_parallel(data, k, seed, n_lloyd=0)))
        centers, _ = sk_kmeans_plusplus(X, k, random_state=seed)
        theirs.append(cost(X, centers))
    # seeding only (no Lloyd pass on the cluster): within a small factor of k-means++
    assert np.mean(ours) <= 1.25 * np.mean(theirs)
    assert max(ours) <= 2.0 * max(theirs)


@pytest.mark.parametrize("n_rounds,n_lloyd", [(5, 2), (3, 0), (1, 4)])
def test_documented_number_of_passes(n_rounds, n_lloyd):
    data = prepare(blobs(2, n=1500), npartitions=5)
    before = data.n_passes
    kmeans_parallel(data, 4, 0, n_rounds=n_rounds, n_lloyd=n_lloyd)
    assert data.n_passes - before == kmeans_passes(n_rounds, n_lloyd) == 1 + n_rounds + 1 + n_lloyd


def test_many_seedings_share_the_passes_of_one():
    X = blobs(3, n=2000)
    data = prepare(X, npartitions=4)
    jobs = [(k, 11, 2) for k in range(1, 7)] + [(5, 12, 2), (5, 13, 4)]
    before = data.n_passes
    centers = kmeans_parallel_many(data, jobs)
    assert data.n_passes - before == kmeans_passes(5, 4)
    # a seed used by one job gives exactly what a lone run gives
    np.testing.assert_array_equal(centers[6], kmeans_parallel(data, 5, 12, n_lloyd=2))
    np.testing.assert_array_equal(centers[7], kmeans_parallel(data, 5, 13, n_lloyd=4))
    # the largest k of a shared seed draws its candidates as it would alone
    np.testing.assert_array_equal(centers[5], kmeans_parallel(data, 6, 11, n_lloyd=2))
    # the smaller k re-clustered from the shared candidates are good seedings too
    for (k, _, _), c in zip(jobs[:6], centers[:6]):
        assert c.shape == (k, X.shape[1])
        ref = np.mean([cost(X, sk_kmeans_plusplus(X, k, random_state=s)[0]) for s in range(3)])
        assert cost(X, c) <= 1.25 * ref


def test_missing_cells_use_the_observed_ones():
    X = blobs(4, n=2000, d=3, k=3)
    rng = np.random.default_rng(0)
    Xm = X.copy()
    Xm[rng.random(X.shape) < 0.15] = np.nan
    Xm[:5] = np.nan  # rows with nothing observed are never drawn
    data = prepare(Xm, npartitions=4)
    centers = kmeans_parallel(data, 3, 0)
    assert np.isfinite(centers).all()
    full = kmeans_parallel(prepare(X, npartitions=4), 3, 0)
    # the same three clusters are found (matched by nearest centre)
    gap = np.sqrt(((centers[:, None] - full[None]) ** 2).sum(-1)).min(axis=1)
    assert gap.max() < 1.0


def test_sample_rows_many_and_prefixes():
    X = np.arange(600.0).reshape(300, 2)
    data = prepare(X, npartitions=7)
    before = data.n_passes
    many = sample_rows_many(data, {1: 40, 2: 5})
    assert data.n_passes - before == 1
    np.testing.assert_array_equal(many[1], sample_rows(data, 40, 1))
    np.testing.assert_array_equal(many[1][:10], sample_rows(data, 10, 1))
    np.testing.assert_array_equal(many[2], sample_rows(data, 5, 2))
    assert len({tuple(r) for r in many[1]}) == 40  # without replacement
    # the same rows whatever the partitioning
    np.testing.assert_array_equal(sample_rows(prepare(X, npartitions=3), 40, 1), many[1])


def test_restarts_share_initialisation_passes_and_keep_the_best():
    X = blobs(5, n=1500, d=3, k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = GaussianMixture(4, max_iter=3, tol=0, random_state=7).fit(X)
        four = GaussianMixture(4, max_iter=3, tol=0, n_init=4, random_state=7).fit(X)
        alone = [GaussianMixture(4, max_iter=3, tol=0, random_state=7 + i).fit(X) for i in range(4)]
    # summary + k-means|| (1 + 5 + 1 + 2) + initial assignment + 3 EM passes, for 1 or 4 restarts
    assert one.n_passes_ == four.n_passes_ == 1 + kmeans_passes(5, 2) + 1 + 3
    best = max(alone, key=lambda m: m.lower_bound_)
    assert four.lower_bound_ == best.lower_bound_
    np.testing.assert_array_equal(four.means_, best.means_)
    np.testing.assert_array_equal(four.covariances_, best.covariances_)
