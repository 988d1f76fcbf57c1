"""Model files: exact round trips, no pickle, clear errors for bad files."""

import importlib
import json
import pkgutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

import emdask
from emdask import ConvergenceWarning, GaussianMixture, ModelFileError
from emdask.persistence import FORMAT_VERSION, _checksum


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Dask already runs one block per core: BLAS threads on top only contend (tiny
    matrices wait for busy cores), so these tests run with one BLAS thread per task."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


COV_TYPES = ["full", "tied", "diag", "spherical"]


def table(seed=0, n=600, d=3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, (3, d))
    X = np.vstack([rng.normal(c, 1.0, (n // 3, d)) for c in centers])
    return pd.DataFrame(X, columns=[f"col {j}" for j in range(d)])


def fitted(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(3, **{"random_state": 0, "max_iter": 20, **kw}).fit(table())


def assert_same_state(a, b):
    assert type(a) is type(b)
    pa, pb = a.get_params(), b.get_params()
    assert pa.keys() == pb.keys()
    for key in pa:
        if isinstance(pa[key], np.ndarray):
            np.testing.assert_array_equal(pa[key], pb[key])
        else:
            assert pa[key] == pb[key], key
    for name in a._fitted_arrays:
        x, y = getattr(a, name), getattr(b, name)
        assert np.asarray(x).dtype == np.asarray(y).dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in tuple(a._fitted_meta) + tuple(a._common_fitted):
        if not hasattr(a, name):
            assert not hasattr(b, name), name
            continue
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tolist() == y.tolist(), name
        else:
            assert x == y, name
            assert isinstance(y, type(x)) or isinstance(x, type(y)), name


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_gaussian_round_trip_is_exact(cov_type, tmp_path):
    gm = fitted(covariance_type=cov_type)
    path = gm.save(tmp_path / "model")
    loaded = emdask.load(path)
    assert_same_state(gm, loaded)
    X = table(1)
    np.testing.assert_array_equal(loaded.predict_proba(X), gm.predict_proba(X))
    np.testing.assert_array_equal(loaded.score_samples(X), gm.score_samples(X))
    assert loaded.bic(X) == gm.bic(X)


def test_the_json_says_what_the_model_is(tmp_path):
    gm = fitted(means_init=table().to_numpy()[:3], random_state=np.random.default_rng(0))
    path = gm.save(tmp_path / "m")
    files = sorted(p.name for p in path.iterdir())
    assert files[1] == "model.json" and files[0].startswith("arrays-") and files[0].endswith(".npz")
    doc = json.loads((path / "model.json").read_text())
    assert doc["format"] == "emdask-model" and doc["format_version"] == FORMAT_VERSION
    assert doc["emdask_version"] == emdask.__version__
    assert doc["estimator"] == "GaussianMixture" and doc["family"] == "gaussian"
    assert doc["params"]["random_state"] is None  # a Generator is not kept
    assert doc["params"]["means_init"]["__ndarray__"] == gm.means_init.tolist()
    assert doc["feature_names"] == ["col 0", "col 1", "col 2"]
    assert doc["history"]["lower_bounds"] == gm.lower_bounds_
    assert doc["history"]["n_iter"] == gm.n_iter_
    loaded = emdask.load(path)
    assert loaded.random_state is None
    np.testing.assert_array_equal(loaded.means_init, gm.means_init)
    assert list(loaded.feature_names_in_) == ["col 0", "col 1", "col 2"]
    # the arrays file is plain numpy: readable without pickle
    with np.load(path / files[0], allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["means_"], gm.means_)


def test_saving_again_replaces_the_model_and_leaves_no_debris(tmp_path):
    path = tmp_path / "m"
    fitted(covariance_type="diag").save(path)
    second = fitted(covariance_type="full")
    second.save(path)
    assert sorted(p.name for p in path.iterdir())[1:] == ["model.json"]
    assert len(list(path.iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left
    assert emdask.load(path).covariance_type == "full"
    emdask.save(second, tmp_path / "other")  # the function form


def test_unfitted_or_unsafe_targets(tmp_path):
    with pytest.raises(AttributeError, match="not fitted"):
        GaussianMixture().save(tmp_path / "m")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no model.json"):
        fitted().save(tmp_path / "stuff")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def _model(tmp_path):
    path = fitted().save(tmp_path / "m")
    return path, json.loads((path / "model.json").read_text())


def _rewrite(path, doc, fix_checksum=True):
    if fix_checksum:
        doc["checksum"] = _checksum(doc)
    (path / "model.json").write_text(json.dumps(doc))


def test_corrupted_arrays_fail_clearly(tmp_path):
    path, doc = _model(tmp_path)
    arrays = path / doc["arrays"]["file"]
    raw = bytearray(arrays.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    arrays.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="SHA-256.*corrupted"):
        emdask.load(path)
    arrays.write_bytes(bytes(raw[:100]))
    with pytest.raises(ModelFileError, match="corrupted"):
        emdask.load(path)
    arrays.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        emdask.load(path)


def test_edited_or_broken_json_fails_clearly(tmp_path):
    path, doc = _model(tmp_path)
    doc["params"]["n_components"] = 2  # an edit without the checksum
    _rewrite(path, doc, fix_checksum=False)
    with pytest.raises(ModelFileError, match="checksum"):
        emdask.load(path)
    (path / "model.json").write_text('{"format": "emdask-model", ')
    with pytest.raises(ModelFileError, match="not valid JSON"):
        emdask.load(path)
    (path / "model.json").write_text('{"hello": 1}')
    with pytest.raises(ModelFileError, match="not an emdask model"):
        emdask.load(path)
    with pytest.raises(FileNotFoundError, match="no model"):
        emdask.load(tmp_path / "nowhere")


def test_a_tampered_file_never_runs_code(tmp_path):
    path, doc = _model(tmp_path)
    marker = tmp_path / "pwned"
    # a class name that would run code if it were imported and called
    doc["estimator"] = "os.system"
    doc["params"] = {"command": f"touch {marker}"}
    _rewrite(path, doc)
    with pytest.raises(ModelFileError, match="does not know"):
        emdask.load(path)
    # an arrays file holding a pickled object, with matching digests
    path, doc = _model(tmp_path / "b")
    import hashlib
    import io

    buf = io.BytesIO()
    np.savez(buf, means_=np.array([marker], dtype=object), **{
        k: np.zeros(1) for k in doc["arrays"]["entries"] if k != "means_"})
    raw = buf.getvalue()
    digest = hashlib.sha256(raw).hexdigest()
    (path / doc["arrays"]["file"]).unlink()
    name = f"arrays-{digest[:16]}.npz"
    (path / name).write_bytes(raw)
    doc["arrays"]["file"], doc["arrays"]["sha256"] = name, digest
    _rewrite(path, doc)
    with pytest.raises(ModelFileError, match="plain numpy|dtype"):
        emdask.load(path)
    # a path outside the directory as the arrays file
    doc["arrays"]["file"] = "../../etc/passwd"
    _rewrite(path, doc)
    with pytest.raises(ModelFileError, match="unexpected arrays file"):
        emdask.load(path)
    assert not marker.exists()


def test_newer_format_version_asks_to_upgrade(tmp_path):
    path, doc = _model(tmp_path)
    doc["format_version"] = FORMAT_VERSION + 1
    doc["emdask_version"] = "99.0"
    _rewrite(path, doc)
    with pytest.raises(ModelFileError, match=r"emdask 99\.0.*format 2.*upgrade emdask"):
        emdask.load(path)


def test_unknown_argument_from_another_version(tmp_path):
    path, doc = _model(tmp_path)
    doc["params"]["shrinkage"] = 0.5
    _rewrite(path, doc)
    with pytest.raises(ModelFileError, match="shrinkage"):
        emdask.load(path)


def test_classes_outside_emdask_must_be_registered(tmp_path):
    class Custom(GaussianMixture):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = Custom(2, random_state=0, max_iter=5).fit(table())
    with pytest.raises(TypeError, match="register_estimator"):
        model.save(tmp_path / "c")
    emdask.register_estimator(Custom)
    loaded = emdask.load(model.save(tmp_path / "c"))
    assert type(loaded) is Custom
    np.testing.assert_array_equal(loaded.means_, model.means_)


# -- every other emdask estimator, as the families land ---------------------------------


def _other_estimators():
    import emdask.estimators as pkg
    from emdask.estimators.base import BaseMixture

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"emdask.estimators.{info.name}")
    found, stack = [], list(BaseMixture.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        public = not cls.__name__.startswith("_")
        if cls.__module__.startswith("emdask.") and public and cls is not GaussianMixture:
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def _candidate_tables():
    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, 400)
    binary = (rng.random((400, 3)) < np.where(z[:, None] == 1, 0.85, 0.15)).astype(np.int64)
    # text categories first, so that category levels go through the file
    yield pd.DataFrame({c: np.where(binary[:, j] == 1, "yes", "no") for j, c in enumerate("abc")})
    mixed = pd.DataFrame({"x": rng.normal(z * 4.0, 1.0), "y": rng.poisson(1 + 4 * z)})
    mixed["c"] = np.where(binary[:, 0] == 1, "u", "v")
    yield mixed
    yield pd.DataFrame(binary, columns=["a", "b", "c"])
    trials = rng.integers(1, 10, 400)
    yield pd.DataFrame({"successes": rng.binomial(trials, np.where(z == 1, 0.8, 0.2)), "trials": trials})


OTHERS = _other_estimators()


@pytest.mark.parametrize("cls", OTHERS or [None], ids=[c.__name__ for c in OTHERS] or ["none"])
def test_other_families_round_trip_exactly(cls, tmp_path):
    if cls is None:
        pytest.skip("no emdask estimator besides GaussianMixture in this tree yet")
    errors = []
    for X in _candidate_tables():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls(n_components=2, random_state=0).fit(X)
            break
        except (TypeError, ValueError, KeyError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    else:
        pytest.skip(f"{cls.__name__} fits none of the generic test tables: {errors}")
    loaded = emdask.load(model.save(tmp_path / "m"))
    assert_same_state(model, loaded)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


# -- files written by earlier versions --------------------------------------------------------

_MODELS = Path(__file__).parent / "data" / "models"


@pytest.mark.parametrize("name, table", [
    ("faithful-gaussian", lambda: pd.read_csv(Path(__file__).parent / "data" / "faithful.csv")),
    ("survey-categorical", lambda: pd.read_csv(
        Path(__file__).parent / "data" / "survey.csv", keep_default_na=False, na_values=[""]
    )[["Sex", "W.Hnd", "Fold", "Clap", "Exer", "Smoke", "M.I"]].astype("category")),
])
def test_model_files_of_the_previous_release_load_and_predict_as_they_did(name, table):
    """tests/data/models holds models saved, with the posterior probabilities they gave,
    by emdask before its estimators became scikit-learn estimators."""
    model = emdask.load(_MODELS / name)
    expected = pd.read_csv(_MODELS / f"{name}-proba.csv").to_numpy()
    np.testing.assert_allclose(model.predict_proba(table()), expected, rtol=1e-10, atol=1e-12)
