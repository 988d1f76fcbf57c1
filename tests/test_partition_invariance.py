"""Same random_state, same model, however the table is partitioned: every start of every
family draws from the seed and the rows' global positions, never from partition numbers."""

import warnings

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import emdask


@pytest.fixture(autouse=True)
def quiet_synchronous():
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gaussian_table():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (300, 3)), rng.normal(4, 1, (300, 3))])
    X[rng.random(X.shape) < 0.1] = np.nan
    return X


@pytest.mark.parametrize("init", ["k-means||", "kmeans", "k-means++", "random_from_data", "random"])
def test_gaussian_start_and_fit_do_not_depend_on_partitions(init):
    X = gaussian_table()
    fits = [
        emdask.GaussianMixture(2, init_params=init, random_state=3, max_iter=5, tol=0)
        .fit(da.from_array(X, chunks=(600 // parts, 3)))
        for parts in (1, 3, 10)
    ]
    for other in fits[1:]:
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(other, name), getattr(fits[0], name),
                                       rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("init", ["k-means++", "random_from_data", "random"])
def test_mixed_start_and_fit_do_not_depend_on_partitions(init):
    rng = np.random.default_rng(1)
    n = 600
    z = rng.random(n) < 0.5
    frame = pd.DataFrame({
        "x": rng.normal(np.where(z, 0.0, 3.0), 1.0),
        "kind": pd.Categorical(np.where(rng.random(n) < np.where(z, 0.8, 0.2), "a", "b")),
        "visits": rng.poisson(np.where(z, 1.0, 5.0)),
    })
    frame.loc[rng.random(n) < 0.1, "x"] = np.nan
    fits = [
        emdask.MixedMixture(2, init_params=init, random_state=4, max_iter=5, tol=0)
        .fit(dd.from_pandas(frame, npartitions=parts))
        for parts in (1, 3, 10)
    ]
    for other in fits[1:]:
        for name in ("weights_", "means_", "covariances_", "category_probabilities_", "rates_"):
            np.testing.assert_allclose(getattr(other, name), getattr(fits[0], name),
                                       rtol=1e-10, atol=1e-10, err_msg=name)
