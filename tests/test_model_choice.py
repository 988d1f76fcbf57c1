"""Model choice on public data: singular components are flagged and never chosen, and the
default restarts of the discrete families reach the best optimum.

References come from outside emdask: eigenvalues and row counts computed here from the
fitted arrays, the published flexmix optimum for the epil counts, and an independent
latent-class EM written below (numpy, many random Dirichlet starts, on the distinct
response patterns).
"""

from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from scipy.stats import poisson

from emdask import (
    BernoulliMixture,
    CategoricalMixture,
    ConvergenceWarning,
    DataWarning,
    GaussianMixture,
    PoissonMixture,
    select_components,
)

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.filterwarnings("ignore::emdask.ConvergenceWarning")


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def faithful():
    return pd.read_csv(DATA / "faithful.csv").to_numpy(float)


def at_floor(model, reg_covar=1e-6):
    """Components whose covariance has a direction at the reg_covar floor, from the arrays."""
    cov = np.asarray(model.covariances_)
    if model.covariance_type == "full":
        low = np.linalg.eigvalsh(cov)[:, 0]
    else:
        low = cov.min(axis=1)
    return set(np.flatnonzero(low <= 2 * reg_covar).tolist())


def too_few_rows(model, n):
    d = model.n_features_in_
    per = {"full": d + d * (d + 1) / 2, "diag": 2 * d}[model.covariance_type]
    return set(np.flatnonzero(model.weights_ * n < per).tolist())


# --------------------------------------------------------------------------------------
# Singular components
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_faithful_selection_never_chooses_a_singular_candidate(covariance_type):
    X = faithful()
    n = len(X)
    result = select_components(
        GaussianMixture(covariance_type=covariance_type, n_init=10, tol=1e-8, random_state=0),
        X, n_components=range(1, 10),
    )
    table = result.table_.set_index("n_components")
    # every mark agrees with the fitted arrays, and only marked candidates are singular
    for k, est in result.estimators_.items():
        expected = bool(at_floor(est) | too_few_rows(est, n))
        assert table.loc[k, "singular"] == expected, (k, table.loc[k, "singular_reason"])
        assert (table.loc[k, "singular_reason"] != "") == expected
    chosen = result.best_n_components_
    assert not table.loc[chosen, "singular"]
    assert result.best_estimator_ is result.estimators_[chosen]
    eligible = table[~table["singular"]]
    assert table.loc[chosen, "bic"] == eligible["bic"].min()
    assert 2 <= chosen <= 4  # the two (or three) groups of eruptions, not a spike
    if covariance_type == "diag":
        # the data reproduce the trap: a candidate on the 14 rows of waiting == 83 (a
        # variance at reg_covar) has the lowest BIC of all, and is marked
        assert table["singular"].any()
        assert table["bic"].idxmin() != chosen
        assert table.loc[table["bic"].idxmin(), "singular"]
        spike = result.estimators_[table["bic"].idxmin()]
        j = next(iter(at_floor(spike)))
        assert spike.covariances_[j].min() <= 2e-6
        assert spike.weights_[j] * n == pytest.approx(np.sum(X[:, 1] == round(spike.means_[j, 1])), abs=0.5)


def spiked_table():
    """Two groups and a spike: 25 rows of an integer-valued column at exactly 68."""
    rng = np.random.default_rng(0)
    A = np.column_stack([rng.normal(0, 1, 150), np.round(rng.normal(55, 6, 150))])
    B = np.column_stack([rng.normal(4, 1, 150), np.round(rng.normal(80, 6, 150))])
    S = np.column_stack([rng.normal(2, 0.5, 25), np.full(25, 68.0)])
    return np.vstack([A, B, S])


@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_a_spike_on_an_integer_column_warns_naming_the_component(covariance_type):
    X = spiked_table()
    with pytest.warns(DataWarning, match=r"singular: component (\d) \(covariance at the reg_covar floor") as rec:
        model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    j = int(next(w for w in rec if issubclass(w.category, DataWarning)).message.args[0]
            .split("component ")[1].split(" ")[0])
    assert at_floor(model) == {j}
    assert model.means_[j, 1] == pytest.approx(68.0, abs=1e-6)
    # the 25 rows of the spike, and perhaps a row of the groups that has 68 too
    assert 24.5 <= model.weights_[j] * len(X) <= np.sum(X[:, 1] == 68.0) + 0.5
    assert "reg_covar" in str(rec[0].message) and "fewer components" in str(rec[0].message)


def test_well_separated_groups_do_not_warn():
    rng = np.random.default_rng(3)
    X = np.vstack([rng.normal(0, 1, (200, 3)), rng.normal(6, 1, (200, 3))])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        model = GaussianMixture(2, covariance_type="full", random_state=0).fit(X)
    assert model._singular(len(X)) == {}


def test_every_candidate_singular_warns_and_still_returns_one():
    # a column of two values: every k >= 2 puts components on the values; k=1 is fine,
    # so ask only for k >= 2
    rng = np.random.default_rng(4)
    X = np.column_stack([rng.normal(0, 1, 200), 10.0 * rng.integers(0, 2, 200)])
    with pytest.warns(DataWarning, match="every candidate is singular"):
        result = select_components(GaussianMixture(covariance_type="diag", random_state=0),
                                   X, n_components=[2, 3])
    assert result.table_["singular"].all()
    assert result.best_n_components_ in (2, 3)


def test_discrete_component_collapsed_on_a_handful_of_rows_is_singular():
    # 400 rows of four rarely answered binary items, and 3 rows that answer 1 everywhere: a
    # component on those 3 rows has probabilities at the smoothing floor (no 0 seen) and 3
    # rows for 4 parameters
    rng = np.random.default_rng(6)
    X = np.vstack([(rng.random((400, 4)) < 0.05).astype(float), np.ones((3, 4))])
    model = BernoulliMixture(
        2, probabilities_init=[[0.2] * 4, [0.999] * 4], weights_init=[0.99, 0.01],
        tol=1e-10, max_iter=500,
    )
    with pytest.warns(DataWarning, match=r"component 1 \(a probability or rate at the smoothing floor"):
        model.fit(X)
    rows = model.weights_ * len(X)
    assert rows[1] < 4
    assert np.min(1 - model.probabilities_[1]) * rows[1] < 1e-3


def test_a_small_discrete_component_that_is_not_collapsed_is_not_singular():
    X = pd.read_csv(DATA / "epil.csv").drop(columns="subject").to_numpy(float)
    model = PoissonMixture(3, n_init=20, random_state=0, tol=1e-10, max_iter=2000).fit(X)
    rows = model.weights_ * len(X)
    assert rows.min() < 4  # three patients with very high counts ...
    assert model._singular(len(X)) == {}  # ... are a finding, not a spike


# --------------------------------------------------------------------------------------
# Starts that reach the best optimum
# --------------------------------------------------------------------------------------

#: flexmix's best of 20 random partitions for k=3 on epil (Poisson, 59 x 4)
EPIL_BEST = -779.603


def poisson_loglik(X, weights, rates):
    comp = np.stack([poisson.logpmf(X, r).sum(axis=1) for r in rates], axis=1) + np.log(weights)
    m = comp.max(axis=1, keepdims=True)
    return float((m[:, 0] + np.log(np.exp(comp - m).sum(axis=1))).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_epil_best_of_twenty_default_restarts_reaches_the_published_optimum(seed):
    X = pd.read_csv(DATA / "epil.csv").drop(columns="subject").to_numpy(float)
    model = PoissonMixture(3, n_init=20, random_state=seed, tol=1e-10, max_iter=3000).fit(X)
    ll = poisson_loglik(X, model.weights_, model.rates_)
    assert ll == pytest.approx(model.lower_bound_ * len(X), rel=1e-9)
    assert ll >= EPIL_BEST - 1e-6 * abs(EPIL_BEST)


def latent_class_best(codes, n_levels, k, n_starts=200, n_iter=1500, seed=0):
    """Best log-likelihood of a k-class latent class model found by plain EM from many random
    Dirichlet starts, on the distinct response patterns (NaN = missing, marginalized). Every
    start runs at once (arrays with a leading axis of starts); a start stops moving once its
    log-likelihood gains less than a relative 1e-11 in an iteration."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(codes).fillna(-1)
    patterns = frame.value_counts().reset_index()
    counts = patterns["count"].to_numpy(float)
    P = patterns.drop(columns="count").to_numpy(int)
    n, d = P.shape
    onehots = []
    for j, L in enumerate(n_levels):
        oh = np.zeros((n, L))
        seen = P[:, j] >= 0
        oh[np.flatnonzero(seen), P[seen, j]] = 1.0
        onehots.append(oh)
    w = np.empty((n_starts, k))
    theta = [np.empty((n_starts, k, L)) for L in n_levels]
    for s in range(n_starts):  # the draws of one start after another
        w[s] = rng.dirichlet(np.ones(k))
        for t, L in zip(theta, n_levels):
            t[s] = rng.dirichlet(np.ones(L), size=k)
    best = np.full(n_starts, -np.inf)
    prev = np.full(n_starts, -np.inf)
    live = np.arange(n_starts)  # the starts still moving
    for _ in range(n_iter):
        wl, tl = w[live], [t[live] for t in theta]
        logp = np.log(wl)[:, None, :] + sum(
            oh @ np.log(np.maximum(t, 1e-300)).transpose(0, 2, 1) for oh, t in zip(onehots, tl))
        m = logp.max(axis=2, keepdims=True)
        norm = m[..., 0] + np.log(np.exp(logp - m).sum(axis=2))
        ll = norm @ counts
        best[live] = ll
        moving = ~(ll - prev[live] < 1e-11 * np.abs(ll))
        prev[live] = ll
        live, logp, norm = live[moving], logp[moving], norm[moving]
        if not len(live):
            break
        resp = np.exp(logp - norm[..., None]) * counts[None, :, None]
        w[live] = resp.sum(axis=1) / counts.sum()
        for j, oh in enumerate(onehots):
            total = resp.transpose(0, 2, 1) @ oh
            theta[j][live] = total / np.maximum(total.sum(axis=2, keepdims=True), 1e-300)
    return float(best.max())


def test_lsat6_bernoulli_best_of_twenty_default_restarts_reaches_the_best_optimum():
    X = pd.read_csv(DATA / "lsat6.csv").to_numpy(float)
    reference = latent_class_best(X, [2] * X.shape[1], 3, n_starts=60)
    for seed in (0,):
        model = BernoulliMixture(3, n_init=20, alpha=0.0, random_state=seed, tol=1e-8,
                                 max_iter=5000).fit(X)
        assert model.lower_bound_ * len(X) == pytest.approx(reference, rel=1e-6)


def test_survey_categorical_best_of_twenty_default_restarts_reaches_the_best_optimum():
    survey = pd.read_csv(DATA / "survey.csv", keep_default_na=False, na_values=[""])
    cols = ["Sex", "W.Hnd", "Fold", "Clap", "Exer", "Smoke", "M.I"]
    table = survey[cols].astype("category")
    codes = np.column_stack([
        table[c].cat.codes.replace(-1, np.nan).to_numpy(float) for c in cols
    ])
    reference = latent_class_best(codes, [len(table[c].cat.categories) for c in cols], 3,
                                  n_starts=60)
    for seed in (0,):
        model = CategoricalMixture(3, n_init=20, alpha=0.0, random_state=seed, tol=1e-9,
                                   max_iter=5000).fit(table)
        informative = (~np.isnan(codes)).any(axis=1).sum()
        assert model.lower_bound_ * informative == pytest.approx(reference, rel=1e-6)


def test_kmeans_plus_plus_start_is_the_same_for_any_partitioning():
    X = pd.read_csv(DATA / "epil.csv").drop(columns="subject").to_numpy(float)
    import dask.array as da

    fits = [
        PoissonMixture(3, n_init=3, random_state=5, max_iter=0).fit(da.from_array(X, chunks=(c, 4)))
        for c in (59, 20, 7)
    ]
    for other in fits[1:]:
        np.testing.assert_array_equal(other.rates_, fits[0].rates_)
        np.testing.assert_array_equal(other.weights_, fits[0].weights_)


def test_convergence_warning_is_still_raised_for_unconverged_fits():
    X = pd.read_csv(DATA / "epil.csv").drop(columns="subject").to_numpy(float)
    with pytest.warns(ConvergenceWarning):
        PoissonMixture(3, random_state=0, tol=1e-12, max_iter=2).fit(X)
