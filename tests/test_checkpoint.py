"""Checkpoints after every iteration, resuming to the same result, and warm starts."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from threadpoolctl import threadpool_limits

import emdask
from emdask import ConvergenceWarning, GaussianMixture, ModelFileError

from test_persistence import OTHERS, _candidate_tables


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Dask already runs one block per core: BLAS threads on top only contend (tiny
    matrices wait for busy cores), so these tests run with one BLAS thread per task."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def table(seed=0, n=900, d=3, shift=0.0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0, 0], [3, 1, 0], [0, 3, 2]], dtype=float)[:, :d] + shift
    X = np.vstack([rng.normal(c, [1.0, 1.5, 0.8][: d], (n // 3, d)) for c in centers])
    return pd.DataFrame(X, columns=list("abc")[:d])


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", SkConvergenceWarning)
        return fn(*args, **kw)


def stop_at(n):
    def callback(info):
        return info.iteration >= n

    return callback


ARGS = dict(n_components=3, n_init=2, tol=1e-5, max_iter=200, random_state=3)


def assert_same_fit(a, b):
    assert a.n_iter_ == b.n_iter_ and a.converged_ == b.converged_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-10, atol=0)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12)


def test_stopped_then_resumed_equals_uninterrupted(tmp_path):
    X = table()
    whole = GaussianMixture(**ARGS).fit(X)
    assert whole.converged_ and whole.n_iter_ > 8  # enough iterations to stop in the middle
    path = tmp_path / "ckpt"
    stopped = quiet(GaussianMixture(**ARGS).fit, X, checkpoint=path, callbacks=[stop_at(4)])
    assert stopped.n_iter_ == 4 and not stopped.converged_
    doc = json.loads((path / "model.json").read_text())
    assert doc["kind"] == "checkpoint" and [m["n_iter"] for m in doc["models"]] == [4, 4]
    resumed = GaussianMixture(**ARGS).fit(X, checkpoint=path, resume=True)
    assert_same_fit(resumed, whole)
    assert resumed.n_passes_ == 1 + (whole.n_iter_ - 4)  # summary + the remaining iterations
    # resuming a finished fit changes nothing
    again = GaussianMixture(**ARGS).fit(X, checkpoint=path, resume=True)
    assert_same_fit(again, whole)


def test_written_after_every_iteration_and_survives_a_crash(tmp_path):
    X = table(1)
    path = tmp_path / "ckpt"
    seen = []

    def crash_at_6(info):
        if info.model == 0:
            seen.append(emdask.load(path).n_iter_)  # what a crash now would leave
        if info.iteration == 6:
            raise KeyboardInterrupt  # the process dies in the middle of iteration 6

    with pytest.raises(KeyboardInterrupt):
        GaussianMixture(**ARGS).fit(X, checkpoint=path, callbacks=[crash_at_6])
    # the checkpoint of iteration t-1 is there when iteration t's callbacks run;
    # the first one holds the starting parameters
    assert seen == [0, 1, 2, 3, 4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert len(list(path.iterdir())) == 2  # model.json and one arrays file
    best_so_far = emdask.load(path)
    assert best_so_far.n_iter_ == 5 and not best_so_far.converged_
    best_so_far.predict(X)  # a usable model
    resumed = GaussianMixture(**ARGS).fit(X, checkpoint=path, resume=True)
    assert_same_fit(resumed, GaussianMixture(**ARGS).fit(X))


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    X = table(2)
    fresh = GaussianMixture(**ARGS).fit(X, checkpoint=tmp_path / "new", resume=True)
    assert_same_fit(fresh, GaussianMixture(**ARGS).fit(X))
    assert emdask.load(tmp_path / "new").n_iter_ == fresh.n_iter_


def test_resume_refuses_another_fit(tmp_path):
    X = table(3)
    path = tmp_path / "ckpt"
    quiet(GaussianMixture(**ARGS).fit, X, checkpoint=path, callbacks=[stop_at(2)])
    with pytest.raises(ValueError, match=r"other values of \['n_components'\].*resume=False"):
        GaussianMixture(**{**ARGS, "n_components": 2}).fit(X, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="other data.*resume=False"):
        GaussianMixture(**ARGS).fit(table(4), checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="checkpoint=path"):
        GaussianMixture(**ARGS).fit(X, resume=True)
    # verbose and max_iter may change between the two runs
    quiet(GaussianMixture(**{**ARGS, "max_iter": 300, "verbose": 0}).fit, X, checkpoint=path, resume=True)
    # a saved model is not a checkpoint
    model = GaussianMixture(**ARGS).fit(X)
    model.save(tmp_path / "model")
    with pytest.raises(ModelFileError, match="not a checkpoint.*warm_start"):
        GaussianMixture(**ARGS).fit(X, checkpoint=tmp_path / "model", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an emdask checkpoint"):
        GaussianMixture(**ARGS).fit(X, checkpoint=tmp_path / "other")


def test_a_corrupted_checkpoint_is_not_resumed(tmp_path):
    X = table(5)
    path = tmp_path / "ckpt"
    quiet(GaussianMixture(**ARGS).fit, X, checkpoint=path, callbacks=[stop_at(2)])
    arrays = next(p for p in path.iterdir() if p.suffix == ".npz")
    arrays.write_bytes(arrays.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="corrupted"):
        GaussianMixture(**ARGS).fit(X, checkpoint=path, resume=True)


def test_warm_start_continues_like_scikit_learn_from_the_fitted_parameters():
    first, nightly = table(6), table(7, shift=0.3)
    gm = GaussianMixture(3, random_state=0, warm_start=True, max_iter=6, tol=0, algorithm="em")
    quiet(gm.fit, first)
    start = dict(weights_init=gm.weights_, means_init=gm.means_, precisions_init=gm.precisions_)
    quiet(gm.fit, nightly)
    assert gm.n_passes_ == 1 + 6  # summary + EM: no initialisation
    ref = quiet(SkGaussianMixture(3, max_iter=6, tol=0, **start).fit, nightly.to_numpy())
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(gm, name), getattr(ref, name), rtol=1e-8, atol=1e-10)
    assert gm.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-10)
    with pytest.raises(ValueError, match="warm-start was fitted on 3"):
        gm.fit(nightly[["a", "b"]])


@pytest.mark.parametrize("cls", OTHERS or [None], ids=[c.__name__ for c in OTHERS] or ["none"])
def test_other_families_resume_to_the_same_result(cls, tmp_path):
    if cls is None:
        pytest.skip("no emdask estimator besides GaussianMixture in this tree yet")
    args = dict(n_components=2, random_state=0, tol=1e-9, max_iter=60)
    for X in _candidate_tables():
        try:
            whole = quiet(cls(**args).fit, X)
            break
        except (TypeError, ValueError, KeyError):
            continue
    else:
        pytest.skip(f"{cls.__name__} fits none of the generic test tables")
    if whole.n_iter_ < 4:
        pytest.skip(f"{cls.__name__} converges in {whole.n_iter_} iterations: nothing to resume")
    path = tmp_path / "ckpt"
    quiet(cls(**args).fit, X, checkpoint=path, callbacks=[stop_at(2)])
    resumed = quiet(cls(**args).fit, X, checkpoint=path, resume=True)
    assert resumed.n_iter_ == whole.n_iter_
    np.testing.assert_allclose(resumed.lower_bounds_, whole.lower_bounds_, rtol=1e-10)
    for name in cls._fitted_arrays:
        np.testing.assert_allclose(getattr(resumed, name), getattr(whole, name), rtol=1e-10, atol=1e-12)
