"""Accelerated EM (SQUAREM): the plain-EM fixed point, monotone, partition invariant,
valid unconstrained coordinates for every family, checkpoints.

The references are plain EM run to its fixed point in numpy (the family's own E- and M-step
in a loop, without the driver or the accelerator), from the same starting parameters.

Data. R's ``faithful`` and ``airquality`` (shipped in ``tests/data``, see its README), and
two generated tables of the same shapes that add harder cases:

* ``faithful_like``: 272 rows, 2 columns (eruption minutes, waiting minutes) drawn from
  correlated Gaussian clusters on faithful's scales (short eruptions ~2.0 min / 54 min
  wait, a third of the rows; long ones ~4.3 min / 80 min, themselves two heavily
  overlapping clusters), so that k=3 is identified but converges slowly and linearly under
  plain EM.
* ``airquality_like``: 153 rows, 4 correlated columns on airquality's scales (ozone,
  solar radiation, wind, temperature), with ozone missing in 24% of the rows and solar
  radiation in 5%, as in the R data set.
"""

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest

import emdask
from emdask import (
    CategoricalMixture,
    ConvergenceWarning,
    GaussianMixture,
    MixedMixture,
    PoissonMixture,
)
from emdask.engine.driver import EMModel, run_em
from emdask.engine.squarem import Squarem
from emdask.selection import select_components

# max_iter=0 fits give the starting parameters on purpose
pytestmark = pytest.mark.filterwarnings("ignore:max_iter=0:emdask.ConvergenceWarning")

COV_TYPES = ["full", "tied", "diag", "spherical"]


def faithful_like(seed=0):
    rng = np.random.default_rng(seed)
    short = rng.multivariate_normal([2.04, 54.5], [[0.09, 0.6], [0.6, 35.0]], 97)
    long_a = rng.multivariate_normal([4.05, 77.0], [[0.12, 0.5], [0.5, 30.0]], 100)
    long_b = rng.multivariate_normal([4.55, 83.5], [[0.10, 0.3], [0.3, 25.0]], 75)
    return np.vstack([short, long_a, long_b])


def airquality_like(seed=0):
    rng = np.random.default_rng(seed)
    corr = np.array(
        [[1.0, 0.35, -0.6, 0.7], [0.35, 1.0, -0.06, 0.28], [-0.6, -0.06, 1.0, -0.46],
         [0.7, 0.28, -0.46, 1.0]]
    )
    sd = np.array([33.0, 90.0, 3.5, 9.5])
    X = rng.multivariate_normal([42.0, 186.0, 10.0, 78.0], corr * np.outer(sd, sd), 153)
    X[rng.random(153) < 0.24, 0] = np.nan
    X[rng.random(153) < 0.05, 1] = np.nan
    return X


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kw)


def plain_em_fixed_point(family, X, params, max_iter=200_000, step=1e-13):
    """Plain EM in numpy until the parameters stop moving; returns (params, mean loglik)."""
    z = family.to_unconstrained(params)
    for _ in range(max_iter):
        stats = family.partial_stats(X, params)
        params = family.m_step(stats, params)
        z_new = family.to_unconstrained(params)
        moved = np.max(np.abs(z_new - z))
        z = z_new
        if moved < step:
            break
    return params, family.partial_stats(X, params).mean_loglik


DATA = Path(__file__).parent / "data"


def faithful():
    """R's ``faithful`` (272 x 2; tests/data/README.md)."""
    return pd.read_csv(DATA / "faithful.csv").to_numpy(float)


def airquality():
    """R's ``airquality`` ozone, solar radiation, wind, temperature (153 x 4, 37 + 7 cells
    missing; tests/data/README.md)."""
    return pd.read_csv(DATA / "airquality.csv").to_numpy(float)


def start_and_fits(cls, X, **args):
    """The starting parameters (``max_iter=0``) and the accelerated fit from them."""
    start = cls(**args, max_iter=0).fit(X)
    fast = quiet(cls(**args, algorithm="squarem", tol=1e-14, max_iter=5000).fit, X)
    return start._make_family(), start._fitted_params(), fast


def assert_same_optimum(family, block, start, fast, arrays):
    ref_params, ref_ll = plain_em_fixed_point(family, block, start)
    assert fast.converged_
    assert fast.lower_bound_ == pytest.approx(ref_ll, rel=1e-8)
    for name, ref in arrays(ref_params).items():
        np.testing.assert_allclose(getattr(fast, name), ref, rtol=1e-5, atol=1e-5, err_msg=name)


def gaussian_arrays(p):
    return {"weights_": p.weights, "means_": p.means, "covariances_": p.covariances}


# --------------------------------------------------------------------------------------
# Same fixed point as plain EM, from the same start
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [faithful, faithful_like])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_gaussian_mixture_reaches_the_plain_em_fixed_point(covariance_type, k, data):
    X = data()
    family, start, fast = start_and_fits(
        GaussianMixture, X, n_components=k, covariance_type=covariance_type, random_state=0
    )
    assert_same_optimum(family, X, start, fast, gaussian_arrays)


@pytest.mark.parametrize("data", [airquality, airquality_like])
def test_incomplete_normal_reaches_the_plain_em_fixed_point(data):
    X = data()
    family, start, fast = start_and_fits(GaussianMixture, X, n_components=1, random_state=0)
    assert_same_optimum(family, X, start, fast, gaussian_arrays)


def test_categorical_mixture_reaches_the_plain_em_fixed_point():
    rng = np.random.default_rng(1)
    k, n = 3, 600
    probs = rng.dirichlet(np.ones(4), size=(k, 5))
    labels = rng.choice(k, n, p=[0.5, 0.3, 0.2])
    codes = np.array([[rng.choice(4, p=probs[z, j]) for j in range(5)] for z in labels], float)
    codes[rng.random(codes.shape) < 0.1] = np.nan
    family, start, fast = start_and_fits(CategoricalMixture, codes, n_components=k, random_state=0)
    assert_same_optimum(
        family, codes, start, fast,
        lambda p: {"weights_": p.weights, "probabilities_": p.probabilities},
    )


def test_poisson_mixture_reaches_the_plain_em_fixed_point():
    rng = np.random.default_rng(2)
    labels = rng.choice(2, 800, p=[0.6, 0.4])
    X = rng.poisson(np.array([[2.0, 5.0, 1.0], [3.0, 4.0, 2.5]])[labels]).astype(float)
    family, start, fast = start_and_fits(PoissonMixture, X, n_components=2, random_state=0)
    assert_same_optimum(
        family, X, start, fast, lambda p: {"weights_": p.weights, "rates_": p.rates}
    )


def test_fewer_passes_than_plain_em_to_the_same_log_likelihood():
    X = faithful_like()
    args = dict(n_components=3, random_state=0, tol=1e-9, max_iter=5000)
    plain = quiet(GaussianMixture(**args, algorithm="em").fit, X)
    fast = quiet(GaussianMixture(**args, algorithm="squarem").fit, X)
    assert fast.lower_bound_ >= plain.lower_bound_ - 1e-8 * abs(plain.lower_bound_)
    assert fast.n_iter_ * 2 <= plain.n_iter_
    assert fast.n_passes_ < plain.n_passes_


# --------------------------------------------------------------------------------------
# Monotone, partition invariant
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("missing", [False, True], ids=["complete", "nan"])
def test_recorded_log_likelihood_never_decreases(seed, missing):
    """Kept extrapolations never lower the likelihood, and EM steps do not either — exactly so
    without ``reg_covar`` (which makes the covariance update a regularised one, under which
    plain EM itself may lose ~1e-12 at convergence)."""
    X = faithful_like(seed)
    if missing:
        X[np.random.default_rng(seed).random(X.shape) < 0.2] = np.nan
    model = quiet(
        GaussianMixture(
            3, reg_covar=0.0, random_state=seed, tol=1e-10, max_iter=400, algorithm="squarem"
        ).fit,
        X,
    )
    lb = np.asarray(model.lower_bounds_)
    assert len(lb) <= model.n_iter_
    assert np.all(np.diff(lb) >= -1e-13 * np.abs(lb[1:]))


def test_the_accelerated_fit_does_not_depend_on_the_partitioning():
    X = airquality_like(3)
    fits = []
    for parts in (1, 3, 17):
        dX = da.from_array(X, chunks=(-(-len(X) // parts), 4))
        assert dX.numblocks[0] == parts
        fits.append(
            quiet(GaussianMixture(2, random_state=0, tol=1e-6, algorithm="squarem").fit, dX)
        )
    for other in fits[1:]:
        assert other.n_iter_ == fits[0].n_iter_
        np.testing.assert_allclose(other.lower_bounds_, fits[0].lower_bounds_, rtol=1e-10)
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(other, name), getattr(fits[0], name), rtol=1e-10)


# --------------------------------------------------------------------------------------
# What the fit options keep meaning under acceleration
# --------------------------------------------------------------------------------------


def test_fixed_weights_stay_fixed():
    rng = np.random.default_rng(4)
    X = rng.poisson(np.where(rng.random((500, 1)) < 0.5, 2.0, 6.0), size=(500, 2)).astype(float)
    w = np.array([0.3, 0.7])
    model = quiet(
        PoissonMixture(2, fit_weights=False, weights_init=w, random_state=0, algorithm="squarem",
                       tol=1e-10, max_iter=500).fit,
        X,
    )
    np.testing.assert_array_equal(model.weights_, w)


def test_mixed_table_with_missing_cells_converges_monotonically():
    rng = np.random.default_rng(5)
    n = 600
    z = rng.random(n) < 0.4
    table = pd.DataFrame(
        {
            "x": rng.normal(np.where(z, 0.0, 1.5), 1.0),
            "y": rng.normal(np.where(z, 1.0, 0.0), 1.0),
            "flag": (rng.random(n) < np.where(z, 0.8, 0.3)).astype(float),
            "count": rng.poisson(np.where(z, 1.0, 3.0)).astype(float),
        }
    )
    table.loc[rng.random(n) < 0.15, "x"] = np.nan
    # float columns would all be Gaussian (and 'flag' a variance-floor spike): name them
    families = {"flag": "bernoulli", "count": "poisson"}
    args = dict(n_components=2, random_state=0, tol=1e-10, max_iter=3000,
                column_families=families)
    plain = quiet(MixedMixture(**args, algorithm="em").fit, table)
    fast = quiet(MixedMixture(**args, algorithm="squarem").fit, table)
    lb = np.asarray(fast.lower_bounds_)
    assert np.all(np.diff(lb) >= -1e-13 * np.abs(lb[1:]))
    assert fast.lower_bound_ == pytest.approx(plain.lower_bound_, rel=1e-7)
    assert fast.n_iter_ < plain.n_iter_


def test_every_unconstrained_vector_is_a_valid_model():
    """Random points of R^n (far from any fitted value) map to valid parameters, and the
    coordinates of valid parameters map back to them."""
    rng = np.random.default_rng(6)
    X = faithful_like()
    cases = [
        GaussianMixture(3, covariance_type=ct, max_iter=0, random_state=0).fit(X)
        for ct in COV_TYPES
    ]
    cases.append(PoissonMixture(2, max_iter=0, random_state=0).fit(np.round(X[:, :1] * 3)))
    codes = rng.integers(0, 3, (200, 3)).astype(float)
    cases.append(CategoricalMixture(2, max_iter=0, random_state=0).fit(codes))
    for est in cases:
        family, params = est._make_family(), est._fitted_params()
        z = family.to_unconstrained(params)
        back = family.from_unconstrained(z, params)
        for a, b in zip(family.to_unconstrained(back), z):
            assert a == pytest.approx(b, abs=1e-9)
        for _ in range(5):
            p = family.from_unconstrained(z + rng.normal(0, 3, z.size), params)
            assert np.isclose(p.weights.sum(), 1.0) and np.all(p.weights > 0)
            if hasattr(p, "covariances"):
                assert np.all(np.isfinite(p.precisions_cholesky))
            for name in ("rates", "probabilities"):
                if hasattr(p, name):
                    assert np.all(getattr(p, name) >= 0)
            if hasattr(p, "probabilities"):
                np.testing.assert_allclose(p.probabilities.sum(axis=-1), 1.0)


def test_restarts_and_candidates_share_passes_under_acceleration():
    X = faithful_like()

    def search(max_iter, algorithm="squarem"):
        est = GaussianMixture(random_state=0, tol=1e-8, max_iter=max_iter, algorithm=algorithm)
        return quiet(select_components, est, X, n_components=[1, 2, 3])

    result, without_em, plain = search(1000), search(0), search(1000, "em")
    longest = max(est.n_iter_ for est in result.estimators_.values())
    # one pass per evaluation of all the candidates together
    assert result.n_passes_ == without_em.n_passes_ + longest
    assert result.n_passes_ < plain.n_passes_
    assert result.best_n_components_ == plain.best_n_components_
    np.testing.assert_allclose(result.table_["bic"], plain.table_["bic"], rtol=1e-6)


def test_driver_rejects_an_extrapolation_that_lowers_the_likelihood():
    """A pass at a worse extrapolated point is not recorded, and the fit goes on from the
    plain EM double step."""
    X = faithful_like()
    est = GaussianMixture(2, max_iter=0, random_state=0).fit(X)
    family, start = est._make_family(), est._fitted_params()
    acc = Squarem()
    acc.phase, acc.pending, acc.alpha, acc.step_max = 2, start, 4.0, 4.0
    safe = family.m_step(family.partial_stats(X, start), start)
    accepted, params = acc.update(family, start, -1e9, safe, best=-3.0)
    assert not accepted and params is None and acc.phase == 0 and acc.step_max == 1.0
    model = EMModel(family, start)

    class Blocks:  # the least a driver needs: one block
        row_starts = (0,)
        n_passes = 0

        def map_reduce(self, chunk, *args, combine):
            return chunk(X, 0, *args)

    run_em(Blocks(), [model], tol=0, max_iter=30, algorithm="squarem")
    ref, _ = plain_em_fixed_point(family, X, start, max_iter=30, step=0)
    assert model.lower_bound >= family.partial_stats(X, ref).mean_loglik - 1e-12
    with pytest.raises(ValueError, match="algorithm='fast'"):
        run_em(Blocks(), [model], algorithm="fast")


def test_checkpoint_resumes_the_accelerator(tmp_path):
    X = pd.DataFrame(faithful_like(), columns=["eruptions", "waiting"])
    args = dict(n_components=3, n_init=2, tol=1e-8, max_iter=500, random_state=0,
                algorithm="squarem")
    whole = quiet(GaussianMixture(**args).fit, X)
    assert whole.n_iter_ > 10
    path = tmp_path / "ckpt"
    for stop in (4, 8):  # stopped in two different phases of a SQUAREM cycle
        quiet(GaussianMixture(**args).fit, X, checkpoint=path / str(stop),
              callbacks=[lambda info, s=stop: info.iteration >= s])
        resumed = quiet(GaussianMixture(**args).fit, X, checkpoint=path / str(stop), resume=True)
        assert resumed.n_iter_ == whole.n_iter_
        np.testing.assert_allclose(resumed.lower_bounds_, whole.lower_bounds_, rtol=1e-10)
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(resumed, name), getattr(whole, name),
                                       rtol=1e-8, atol=1e-10)
    best_so_far = emdask.load(path / "4")  # the accelerator's state does not get in the way
    assert best_so_far.algorithm == "squarem"
    best_so_far.predict(X)
    with pytest.raises(ValueError, match="algorithm"):
        GaussianMixture(**{**args, "algorithm": "em"}).fit(X, checkpoint=path / "4", resume=True)
    with pytest.raises(ValueError, match="algorithm='fast' is not one of"):
        GaussianMixture(algorithm="fast").fit(X)
