"""Discrete and mixed-type mixtures on a real multi-process cluster, in model files and in
model selection."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import emdask
from emdask import (
    BernoulliMixture,
    BinomialMixture,
    CategoricalMixture,
    MixedMixture,
    PoissonMixture,
)

from test_discrete import binary_data, customer_frame, survey_frame

pytestmark = pytest.mark.filterwarnings("ignore::emdask.ConvergenceWarning")


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        host="127.0.0.1",
    )
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def test_categorical_and_mixed_on_a_local_cluster(client):
    df = survey_frame(n=1500, seed=40)
    cust = customer_frame(n=1500, seed=41)
    ref_c = CategoricalMixture(3, tol=0, max_iter=12, random_state=1).fit(df.copy())
    ref_m = MixedMixture(2, tol=0, max_iter=12, random_state=2).fit(cust.copy())
    assert client.scheduler_info()["workers"]  # the fits below run on worker processes

    ddf = dd.from_pandas(df, npartitions=6, sort=False)
    m = CategoricalMixture(3, tol=0, max_iter=12, random_state=1, split_every=2).fit(ddf)
    np.testing.assert_allclose(m.probabilities_, ref_c.probabilities_, rtol=1e-9, atol=1e-12)
    assert m.categories_ == ref_c.categories_
    labels = m.predict(ddf)
    assert isinstance(labels, dd.Series)
    np.testing.assert_array_equal(labels.compute().to_numpy(), ref_c.predict(df))
    filled = m.impute(ddf)
    assert isinstance(filled, dd.DataFrame)
    pd.testing.assert_frame_equal(filled.compute(), ref_c.impute(ddf.compute()))  # dask may retype str

    dcust = dd.from_pandas(cust, npartitions=5, sort=False)
    mm = MixedMixture(2, tol=0, max_iter=12, random_state=2).fit(dcust)
    for name in ("weights_", "means_", "covariances_", "rates_", "binary_probabilities_",
                 "category_probabilities_"):
        np.testing.assert_allclose(getattr(mm, name), getattr(ref_m, name), rtol=1e-9, atol=1e-12)
    assert mm.score(dcust) == pytest.approx(ref_m.score(cust), rel=1e-12)


def test_bad_value_on_a_worker_names_the_column(client):
    df = pd.DataFrame({"clicked": np.r_[np.zeros(50), 3.0, np.ones(49)], "other": np.ones(100)})
    with pytest.raises(ValueError, match=r"column 'clicked' must hold 0/1"):
        BernoulliMixture(1).fit(dd.from_pandas(df, npartitions=4, sort=False))


def fitted_models():
    df = survey_frame(n=300, seed=42)
    cust = customer_frame(n=300, seed=43)
    binom = pd.DataFrame({"s": np.arange(300) % 7, "n": 6 + np.arange(300) % 5})
    return [
        (BernoulliMixture(2, random_state=0).fit(binary_data(n=300)), binary_data(n=50, seed=9)),
        (BinomialMixture(2, random_state=0).fit(binom, columns=["s", "n"]), binom),
        (CategoricalMixture(2, random_state=0).fit(df), df),
        (PoissonMixture(2, random_state=0).fit(cust[["orders"]]), cust[["orders"]]),
        (MixedMixture(2, covariance_type="full", random_state=0).fit(cust), cust),
    ]


def test_every_family_round_trips_through_a_model_file(tmp_path):
    for i, (model, X) in enumerate(fitted_models()):
        path = emdask.save(model, tmp_path / f"m{i}")
        back = emdask.load(path)
        assert type(back) is type(model)
        for name in model._fitted_arrays:
            np.testing.assert_array_equal(getattr(back, name), getattr(model, name))
        for name in model._fitted_meta:
            assert getattr(back, name) == getattr(model, name)
        np.testing.assert_array_equal(back.predict_proba(X), model.predict_proba(X))
        assert back.score(X) == model.score(X)


def test_model_selection_over_categorical_mixtures():
    df = survey_frame(n=500, seed=44)
    result = emdask.select_components(CategoricalMixture(random_state=0), df, n_components=[1, 2, 3])
    best = result.best_estimator_
    assert best.n_components == 2  # the data has two latent classes
    assert best.categories_ == [["no", "maybe", "yes"], ["a", "b"], [1, 2, 3, 4]]
    bic = result.table_.set_index("n_components")["bic"]
    assert bic[2] == pytest.approx(best.bic(df), rel=1e-9)


def test_checkpointed_fit_resumes_to_the_same_model(tmp_path):
    df = survey_frame(n=500, seed=45)
    full = CategoricalMixture(3, tol=0, max_iter=12, random_state=0).fit(df)
    CategoricalMixture(3, tol=0, max_iter=12, random_state=0).fit(
        df, checkpoint=tmp_path / "ck", callbacks=[lambda info: info.iteration >= 5]
    )
    assert emdask.load(tmp_path / "ck").categories_ == full.categories_
    resumed = CategoricalMixture(3, tol=0, max_iter=12, random_state=0).fit(
        df, checkpoint=tmp_path / "ck", resume=True
    )
    assert resumed.n_iter_ == 12
    np.testing.assert_array_equal(resumed.probabilities_, full.probabilities_)
