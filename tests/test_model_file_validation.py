"""Model files are checked for what they hold, not only for corruption.

Every bad file here is made the way someone could make it: a model is fitted and saved for
real, then its ``model.json`` or its arrays are edited and the checksums recomputed (a
checksum proves a file intact, not valid). Loading must refuse it with a
:class:`~emdask.ModelFileError` naming the file and the attribute, and never build a model
from it; archives that would expand beyond what their model needs are refused before
anything is decompressed.
"""

import hashlib
import io
import json
import re
import struct
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

import emdask
from emdask import (
    BernoulliMixture,
    BinomialMixture,
    CategoricalMixture,
    EMImputer,
    GaussianMixture,
    MixedMixture,
    ModelFileError,
    PoissonMixture,
)
from emdask.exceptions import ModelFileError as ExceptionsModelFileError
from emdask.persistence import _checksum


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


COV_TYPES = ["full", "tied", "diag", "spherical"]
REMEDY = "refit and save the model again"


# -- tables and fitted models ----------------------------------------------------------------


def gaussian_table(missing=False, n=240, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0], [5.0, 1.0, -2.0], [0.0, 6.0, 3.0]])
    X = np.vstack([rng.normal(c, 1.0, (n // 3, 3)) for c in centers])
    if missing:
        X[rng.random(X.shape) < 0.15] = np.nan
    return pd.DataFrame(X, columns=["a", "b", "c"])


def overlapping_table(n=600, seed=1):
    """Components close enough for EM to take a few dozen iterations."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    X = np.vstack([rng.normal(c, [1.0, 1.5, 0.8], (n // 3, 3)) for c in centers])
    return pd.DataFrame(X, columns=["a", "b", "c"])


def discrete_tables(missing=False, n=240, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n)
    binary = (rng.random((n, 3)) < np.where(z[:, None] == 1, 0.85, 0.15)).astype(float)
    counts = rng.poisson(np.where(z[:, None] == 1, 6.0, 1.0), (n, 3)).astype(float)
    levels = np.array(["no", "yes", "maybe"])
    cats = pd.DataFrame(
        {c: levels[(binary[:, j] + (rng.random(n) < 0.2)).astype(int)] for j, c in enumerate("pqr")}
    )
    trials = rng.integers(1, 10, n)
    binom = pd.DataFrame(
        {"successes": rng.binomial(trials, np.where(z == 1, 0.8, 0.2)).astype(float), "trials": trials}
    )
    mixed = pd.DataFrame(
        {
            "x": rng.normal(z * 4.0, 1.0),
            "w": rng.normal(-z * 2.0, 1.0),
            "n": rng.poisson(1 + 4 * z).astype(float),
            "c": np.where(binary[:, 0] == 1, "u", "v"),
            "b": binary[:, 1],
        }
    )
    tables = {
        "bernoulli": pd.DataFrame(binary, columns=["a", "b", "c"]),
        "poisson": pd.DataFrame(counts, columns=["a", "b", "c"]),
        "categorical": cats.astype(object),
        "binomial": binom,
        "mixed": mixed,
    }
    if missing:
        hole = rng.random((n, 3)) < 0.15
        for key in ("bernoulli", "poisson", "categorical"):
            tables[key] = tables[key].mask(hole)
        tables["binomial"].loc[hole[:, 0], "successes"] = np.nan
        tables["mixed"] = tables["mixed"].mask(np.c_[hole, hole[:, :2]])
    return tables


def quiet_fit(est, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(X, **kw)


def fit_estimator(name, missing=False, **kw):
    """A fitted model of every kind emdask saves (small tables, a few iterations)."""
    args = {"random_state": 0, "max_iter": 15, **kw}
    if name.startswith("gaussian") or name.startswith("imputer"):
        cls = EMImputer if name.startswith("imputer") else GaussianMixture
        ct = name.split("-")[1] if "-" in name else "full"
        return quiet_fit(cls(3, covariance_type=ct, **args), gaussian_table(missing))
    tables = discrete_tables(missing)
    if name == "bernoulli":
        return quiet_fit(BernoulliMixture(2, **args), tables["bernoulli"])
    if name == "poisson":
        return quiet_fit(PoissonMixture(2, **args), tables["poisson"])
    if name == "categorical":
        return quiet_fit(CategoricalMixture(2, **args), tables["categorical"])
    if name == "binomial":
        return quiet_fit(BinomialMixture(2, **args), tables["binomial"])
    if name == "binomial-fixed":
        return quiet_fit(BinomialMixture(2, n_trials=9, **args), tables["binomial"][["successes"]])
    if name.startswith("mixed"):
        ct = name.split("-")[1]
        families = {"n": "poisson", "b": "bernoulli", "c": "categorical"}
        return quiet_fit(MixedMixture(2, covariance_type=ct, column_families=families, **args), tables["mixed"])
    raise AssertionError(name)


ESTIMATORS = (
    [f"gaussian-{ct}" for ct in COV_TYPES]
    + [f"imputer-{ct}" for ct in COV_TYPES]
    + ["bernoulli", "poisson", "categorical", "binomial", "binomial-fixed", "mixed-diag", "mixed-full"]
)


def saved(tmp_path, name="gaussian-full", missing=False, **kw):
    model = fit_estimator(name, missing, **kw)
    return model, model.save(tmp_path / "model")


# -- editing a saved file as an outsider could ------------------------------------------------


def read_doc(path):
    return json.loads((path / "model.json").read_text())


def write_doc(path, doc):
    doc["checksum"] = _checksum(doc)
    (path / "model.json").write_text(json.dumps(doc))


def edit_json(path, fn):
    doc = read_doc(path)
    fn(doc)
    write_doc(path, doc)


def read_arrays(path, doc=None):
    doc = doc or read_doc(path)
    with np.load(path / doc["arrays"]["file"], allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def write_npz_bytes(path, raw, entries=None):
    """Replace the arrays file by ``raw`` with matching name and digest (and ``entries``)."""
    doc = read_doc(path)
    digest = hashlib.sha256(raw).hexdigest()
    (path / doc["arrays"]["file"]).unlink()
    name = f"arrays-{digest[:16]}.npz"
    (path / name).write_bytes(raw)
    doc["arrays"]["file"], doc["arrays"]["sha256"] = name, digest
    if entries is not None:
        doc["arrays"]["entries"] = entries
    write_doc(path, doc)


def edit_arrays(path, fn, update_entries=True):
    """Apply ``fn`` to the dict of arrays and write them back as numpy would."""
    arrays = read_arrays(path)
    fn(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    entries = {k: {"dtype": a.dtype.str, "shape": list(a.shape)} for k, a in arrays.items()}
    write_npz_bytes(path, buf.getvalue(), entries if update_entries else None)


def refused(path, *patterns, **load_kw):
    """Loading ``path`` raises ModelFileError whose one-line message matches every pattern."""
    with pytest.raises(ModelFileError) as info:
        emdask.load(path, **load_kw)
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def names_file(message, path, json_file=False):
    doc = read_doc(path)
    target = "model.json" if json_file else doc["arrays"]["file"]
    assert str(path / target) in message, message
    assert REMEDY in message, message


# -- the error class ----------------------------------------------------------------------------


def test_model_file_error_is_a_value_error_exported_everywhere():
    import emdask.persistence

    assert ModelFileError is ExceptionsModelFileError is emdask.persistence.ModelFileError
    assert issubclass(ModelFileError, ValueError)


# -- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_arrays_of_the_wrong_shape_are_refused(cov_type, tmp_path):
    _, path = saved(tmp_path, f"gaussian-{cov_type}")
    edit_arrays(path, lambda a: a.update(means_=a["means_"][:2]))
    message = refused(
        path,
        re.escape("means_ has shape (2, 3) but n_components=3 and n_features_in_=3 need (3, 3)"),
    )
    names_file(message, path)
    # the covariances of another covariance type
    _, path = saved(tmp_path / "b", f"gaussian-{cov_type}")
    other = {"full": "diag", "tied": "spherical", "diag": "spherical", "spherical": "diag"}[cov_type]
    donor = fit_estimator(f"gaussian-{other}")
    edit_arrays(path, lambda a: a.update(covariances_=donor.covariances_))
    refused(path, rf"covariances_ has shape .* covariance_type='{cov_type}' need")


def test_the_npy_header_must_agree_with_model_json(tmp_path):
    _, path = saved(tmp_path)
    edit_arrays(path, lambda a: a.update(means_=a["means_"][:, :2]), update_entries=False)
    refused(path, r"array means_ .* has dtype float64 and shape \(3, 2\), not what model.json records")


def test_n_features_in_must_agree_with_the_arrays_and_names(tmp_path):
    _, path = saved(tmp_path)
    edit_json(path, lambda d: d["fitted"].update(n_features_in_=4))
    refused(path, r"_columns has 3 names but n_features_in_=4")
    edit_json(path, lambda d: d["fitted"].update(n_features_in_=3, _columns=None, feature_names_in_=None))
    edit_json(path, lambda d: (d["fitted"].pop("feature_names_in_"), d["fitted"].update(n_features_in_=4)))
    refused(path, re.escape("means_ has shape (3, 3) but n_components=3 and n_features_in_=4 need (3, 4)"))
    edit_json(path, lambda d: d["fitted"].update(n_features_in_=0))
    message = refused(path, r"n_features_in_ = 0 must be a positive integer")
    names_file(message, path, json_file=True)
    _, path = saved(tmp_path / "b", "binomial-fixed")
    edit_json(path, lambda d: (d["fitted"].pop("feature_names_in_"), d["fitted"].update(n_features_in_=2, _columns=["successes", "trials"])))
    refused(path, r"n_features_in_ = 2, but a BinomialMixture with n_trials=9 models 1 column")


def test_a_huge_n_components_is_refused_against_the_arrays(tmp_path):
    _, path = saved(tmp_path)
    edit_json(path, lambda d: d["params"].update(n_components=10**12))
    start = time.perf_counter()
    refused(path, re.escape("weights_ has shape (3,) but n_components=1000000000000 need (1000000000000,)"))
    assert time.perf_counter() - start < 1.0
    edit_json(path, lambda d: d["params"].update(n_components=10**30))
    refused(path, r"argument n_components holds the integer 10{30}, beyond 64 bits")
    edit_json(path, lambda d: d["params"].update(n_components=0))
    refused(path, r"n_components=0 must be >= 1")


# -- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, attr",
    [
        ("gaussian-full", "means_"),
        ("gaussian-tied", "covariances_"),
        ("gaussian-diag", "precisions_cholesky_"),
        ("bernoulli", "probabilities_"),
        ("poisson", "rates_"),
        ("mixed-diag", "means_"),
        ("categorical", "probabilities_"),
    ],
)
def test_nan_or_infinite_values_are_refused(name, attr, tmp_path):
    _, path = saved(tmp_path, name)

    def poison(a):
        a[attr] = a[attr].copy()
        a[attr].flat[0] = np.nan

    edit_arrays(path, poison)
    names_file(refused(path, rf"{attr} holds NaN or infinite values"), path)
    edit_arrays(path, lambda a: a[attr].__setitem__((0,) * a[attr].ndim, np.inf))
    refused(path, rf"{attr} holds NaN or infinite values")


def test_weights_must_be_on_the_simplex(tmp_path):
    _, path = saved(tmp_path)
    edit_arrays(path, lambda a: a.update(weights_=np.array([1.2, -0.1, -0.1])))
    names_file(refused(path, r"weights_ holds the negative weight -0\.1"), path)
    edit_arrays(path, lambda a: a.update(weights_=np.array([0.5, 0.5, 0.5])))
    refused(path, r"weights_ sums to 1\.5: weights must sum to 1")
    _, path = saved(tmp_path / "b", "poisson")
    edit_arrays(path, lambda a: a.update(weights_=np.array([0.3, 0.3])))
    refused(path, r"weights_ sums to 0\.6")


def _indefinite(d):
    m = np.eye(d)
    m[0, 1] = m[1, 0] = 2.0  # symmetric, eigenvalues -1 and 3
    return m


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_covariances_must_be_positive_definite(cov_type, tmp_path):
    _, path = saved(tmp_path, f"gaussian-{cov_type}")

    def break_it(a):
        c = a["covariances_"].copy()
        if cov_type == "full":
            c[1] = _indefinite(3)
        elif cov_type == "tied":
            c[:] = _indefinite(3)
        elif cov_type == "diag":
            c[1, 2] = -0.5
        else:
            c[1] = 0.0
        a["covariances_"] = c

    edit_arrays(path, break_it)
    expected = {
        "full": r"covariances_ is not positive definite \(component 1\)",
        "tied": r"covariances_ is not positive definite \(the tied matrix\)",
        "diag": r"covariances_ holds the variance -0\.5: variances must be > 0",
        "spherical": r"covariances_ holds the variance 0: variances must be > 0",
    }[cov_type]
    names_file(refused(path, expected), path)


@pytest.mark.parametrize("cov_type", ["full", "tied"])
def test_covariances_must_be_symmetric(cov_type, tmp_path):
    _, path = saved(tmp_path, f"gaussian-{cov_type}")

    def skew(a):
        c = a["covariances_"].copy()
        m = c[0] if cov_type == "full" else c
        m[0, 1] += 0.3
        a["covariances_"] = c

    edit_arrays(path, skew)
    refused(path, r"covariances_ is not symmetric")


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_precision_cholesky_factors_must_be_valid(cov_type, tmp_path):
    _, path = saved(tmp_path, f"gaussian-{cov_type}")

    def break_it(a):
        u = a["precisions_cholesky_"].copy()
        if cov_type == "full":
            u[2, 1, 1] = -u[2, 1, 1]
        elif cov_type == "tied":
            u[0, 0] = 0.0
        elif cov_type == "diag":
            u[0, 1] = -1.0
        else:
            u[2] = -1.0
        a["precisions_cholesky_"] = u

    edit_arrays(path, break_it)
    expected = {
        "full": r"precisions_cholesky_ has a diagonal entry <= 0 \(component 2\)",
        "tied": r"precisions_cholesky_ has a diagonal entry <= 0 \(the tied matrix\)",
        "diag": r"precisions_cholesky_ holds -1",
        "spherical": r"precisions_cholesky_ holds -1",
    }[cov_type]
    names_file(refused(path, expected), path)
    if cov_type in ("full", "tied"):  # a lower-triangular entry: not the factor emdask uses
        _, path = saved(tmp_path / "b", f"gaussian-{cov_type}")

        def lower(a):
            u = a["precisions_cholesky_"].copy()
            (u[0] if cov_type == "full" else u)[2, 0] = 0.4
            a["precisions_cholesky_"] = u

        edit_arrays(path, lower)
        refused(path, r"precisions_cholesky_ is not upper triangular")


def test_precisions_must_match_their_cholesky_factors(tmp_path):
    _, path = saved(tmp_path, "gaussian-diag")
    edit_arrays(path, lambda a: a.update(precisions_=a["precisions_"] * 2.0))
    refused(path, r"precisions_ is not the precision U Uᵀ of precisions_cholesky_")


@pytest.mark.parametrize(
    "name, attr, value, expected",
    [
        ("bernoulli", "probabilities_", 1.5, r"probabilities_ holds 1\.5: probabilities must be in \[0, 1\]"),
        ("binomial", "probabilities_", -0.25, r"probabilities_ holds -0\.25"),
        ("mixed-diag", "binary_probabilities_", 2.0, r"binary_probabilities_ holds 2"),
        ("poisson", "rates_", -3.0, r"rates_ holds the rate -3: rates must be >= 0"),
        ("mixed-full", "rates_", -1.0, r"rates_ holds the rate -1"),
        ("mixed-diag", "covariances_", -1.0, r"covariances_ holds the variance -1"),
    ],
)
def test_probabilities_and_rates_must_be_in_range(name, attr, value, expected, tmp_path):
    _, path = saved(tmp_path, name)

    def set_first(a):
        a[attr] = a[attr].copy()
        a[attr].flat[0] = value

    edit_arrays(path, set_first)
    names_file(refused(path, expected), path)


def test_categorical_probabilities_sum_to_one_over_each_columns_levels(tmp_path):
    model, path = saved(tmp_path, "categorical")
    assert model.probabilities_.shape == (2, 3, 3)

    def shift(a):
        p = a["probabilities_"].copy()
        p[1, 2, 0] += 0.2
        p[1, 2, 1] = max(p[1, 2, 1] - 0.05, 0.0)
        a["probabilities_"] = p

    edit_arrays(path, shift)
    names_file(refused(path, r"probabilities_ of column 2 sums to 1\.1.* over its 3 levels, not 1"), path)
    # a level more in categories_ than the table holds
    _, path = saved(tmp_path / "b", "categorical")
    edit_json(path, lambda d: d["fitted_meta"]["categories_"][0].append("later"))
    refused(path, re.escape("probabilities_ has shape (2, 3, 3) but n_components=2 and categories_"))
    edit_json(path, lambda d: d["fitted_meta"]["categories_"].pop())
    refused(path, r"categories_ lists the levels of 2 columns but n_features_in_=3")


def test_mixed_padding_and_column_families_are_checked(tmp_path):
    model, path = saved(tmp_path, "mixed-diag")
    assert model.category_probabilities_.shape == (2, 1, 2)
    edit_json(path, lambda d: d["fitted_meta"]["column_families_"].update(n="student-t"))
    refused(path, r"column_families_ gives unknown families \{'n': 'student-t'\}")
    _, path = saved(tmp_path / "b", "mixed-diag")
    edit_json(path, lambda d: d["fitted_meta"]["column_families_"].update(n="gaussian"))
    refused(path, re.escape("means_ has shape (2, 2) but n_components=2 and column_families_ (3 gaussian columns) need (2, 3)"))


# -- only declared attributes ---------------------------------------------------------------------


@pytest.mark.parametrize("section", ["fitted", "fitted_meta"])
@pytest.mark.parametrize("attr", ["predict", "__class__", "score_samples", "model_"])
def test_undeclared_fitted_attributes_are_refused(section, attr, tmp_path):
    model, path = saved(tmp_path, "imputer-full")
    edit_json(path, lambda d: d[section].update({attr: 1}))
    message = refused(path, rf"{re.escape(attr)} in {section} is not a fitted attribute of EMImputer")
    names_file(message, path, json_file=True)
    assert callable(type(model).predict)


def test_undeclared_arrays_are_refused(tmp_path):
    _, path = saved(tmp_path, "bernoulli")
    edit_arrays(path, lambda a: a.update(predict=np.zeros(3)))
    message = refused(path, r"predict is not a fitted array of BernoulliMixture, which declares")
    names_file(message, path)
    _, path = saved(tmp_path / "b", "bernoulli")
    edit_arrays(path, lambda a: a.pop("probabilities_"))
    refused(path, r"probabilities_ is missing from the arrays file")


def test_common_fitted_values_are_checked(tmp_path):
    _, path = saved(tmp_path)
    for change, expected in [
        ({"n_iter_": -3}, r"n_iter_ = -3 must be a non-negative integer"),
        ({"converged_": "yes"}, r"converged_ = 'yes' must be true or false"),
        ({"lower_bound_": float("nan")}, r"lower_bound_ = nan must be a number"),
        ({"_columns": ["a", "b", 3]}, r"_columns must be a list of column names"),
        ({"feature_names_in_": {"__ndarray__": ["x", "y", "z"], "dtype": "object", "shape": [3]}},
         r"feature_names_in_ must be the list of column names of _columns"),
    ]:
        original = read_doc(path)
        edit_json(path, lambda d: d["fitted"].update(change))
        refused(path, expected, REMEDY)
        write_doc(path, original)
    edit_json(path, lambda d: d["history"].update(lower_bounds=[-1.0, "x"]))
    refused(path, r"history\.lower_bounds must be a list of numbers")


# -- arguments ------------------------------------------------------------------------------------


def test_arguments_must_be_valid_constructor_arguments(tmp_path):
    _, path = saved(tmp_path)
    for change, expected in [
        ({"tol": float("nan")}, r"argument tol holds nan: numbers must be finite"),
        ({"reg_covar": float("inf")}, r"argument reg_covar holds inf"),
        ({"reg_covar": -1.0}, r"reg_covar=-1\.0 must be >= 0"),
        ({"warm_start": "yes"}, r"argument warm_start = 'yes' must be true or false"),
        ({"covariance_type": "banded"}, r"covariance_type='banded' is not one of"),
        ({"random_state": -4}, r"argument random_state = -4 must be null or a non-negative integer"),
        ({"means_init": [[0.0, 1.0]]}, r"means_init must have shape \(3, 3\)"),
        ({"max_iter": 2**70}, r"argument max_iter holds the integer"),
    ]:
        original = read_doc(path)
        edit_json(path, lambda d: d["params"].update(change))
        refused(path, expected)
        write_doc(path, original)
    emdask.load(path)  # the original again


# -- bounded decompression ------------------------------------------------------------------------


def _npy_header(shape, dtype="<f8"):
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def _bomb_npz(path, huge_shape, filler=8 * 2**20):
    """The model's arrays file with ``means_.npy`` replaced by a deflated member whose
    header declares ``huge_shape`` and whose data is ``filler`` bytes of zeros."""
    arrays = read_arrays(path)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for key, a in arrays.items():
            if key == "means_":  # streamed: the zeros are never held whole
                info = zipfile.ZipInfo("means_.npy")
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as member:
                    member.write(_npy_header(huge_shape))
                    zeros = bytes(2**20)
                    for _ in range(filler // 2**20):
                        member.write(zeros)
            else:
                member_buf = io.BytesIO()
                np.lib.format.write_array(member_buf, a)
                zf.writestr(f"{key}.npy", member_buf.getvalue())
    return out.getvalue()


def _load_measured(path):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFileError) as info:
            emdask.load(path)
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return str(info.value), elapsed, peak


def test_a_zip_bomb_is_refused_before_decompressing(tmp_path):
    _, path = saved(tmp_path)
    huge = (2**17, 2**17)  # 128 GiB of float64
    raw = _bomb_npz(path, huge)
    assert len(raw) < 64 * 2**10  # a few KB on disk
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        info = zf.getinfo("means_.npy")
        assert info.file_size > 8 * 2**20 and info.file_size / info.compress_size > 500
        with zf.open(info) as f:  # the member really declares the huge shape
            np.lib.format.read_magic(f)
            assert np.lib.format.read_array_header_1_0(f)[0] == huge
    # model.json unchanged: means_ recorded as (3, 3)
    write_npz_bytes(path, raw)
    message, elapsed, peak = _load_measured(path)
    assert re.search(r"means_ declares \d+ bytes uncompressed, but its shape \(3, 3\) of <f8 needs 72", message)
    names_file(message, path)
    assert elapsed < 0.5, elapsed
    assert peak < 16 * 2**20, peak  # the 8 MiB of zeros were never decompressed
    # model.json edited to record the huge shape too: refused against n_components
    doc = read_doc(path)
    doc["arrays"]["entries"]["means_"]["shape"] = list(huge)
    write_doc(path, doc)
    message, elapsed, peak = _load_measured(path)
    assert "means_ has shape (131072, 131072) but n_components=3 and n_features_in_=3 need (3, 3)" in message
    assert elapsed < 0.5 and peak < 16 * 2**20


def test_a_member_expanding_beyond_the_ratio_limit_is_refused(tmp_path):
    # a wide model: probabilities_ (2, 5000) takes 80 KB
    rng = np.random.default_rng(0)
    X = (rng.random((40, 5000)) < 0.5).astype(float)
    model = quiet_fit(BernoulliMixture(2, random_state=0, max_iter=2), X)
    path = model.save(tmp_path / "wide")
    arrays = read_arrays(path)
    arrays["probabilities_"] = np.full((2, 5000), 0.5)  # valid values, compressing 500-fold
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_npz_bytes(path, buf.getvalue())
    names_file(refused(path, r"probabilities_ expands \d+ times .* more than the 100 allowed"), path)
    # the same values stored as emdask stores them load (and are what was written)
    edit_arrays(path, lambda a: None)
    np.testing.assert_array_equal(emdask.load(path).probabilities_, 0.5)


def test_the_memory_cap_and_oversized_files(tmp_path):
    model, path = saved(tmp_path)
    refused(path, r"take \d+ bytes, more than the limit of 100 .*MAX_ARRAY_BYTES", max_bytes=100)
    np.testing.assert_array_equal(emdask.load(path, max_bytes=10**6).means_, model.means_)
    # bytes appended to the arrays file beyond what its arrays need
    doc = read_doc(path)
    raw = (path / doc["arrays"]["file"]).read_bytes()
    write_npz_bytes(path, raw + bytes(4 * 2**20))
    refused(path, r"the arrays file is \d+ bytes, more than the \d+ its arrays recorded in model.json need")


def test_a_compressed_archive_of_a_valid_model_still_loads(tmp_path):
    model, path = saved(tmp_path, "gaussian-tied")
    arrays = read_arrays(path)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_npz_bytes(path, buf.getvalue())
    np.testing.assert_array_equal(emdask.load(path).covariances_, model.covariances_)
    # arrays numpy stores in Fortran order
    edit_arrays(path, lambda a: a.update(means_=np.asfortranarray(a["means_"])))
    loaded = emdask.load(path)
    np.testing.assert_array_equal(loaded.means_, model.means_)
    loaded.means_[0, 0] = 1.0  # writable, as np.load gives them


# -- checkpoints go through the same checks ----------------------------------------------------


def _checkpoint(tmp_path, name="gaussian-full", iterations=3):
    path = tmp_path / "ckpt"

    def stop(info):
        return info.iteration >= iterations

    args = {"random_state": 0, "max_iter": 50, "n_init": 2}
    est = {
        "gaussian-full": lambda: GaussianMixture(3, **args),
        "categorical": lambda: CategoricalMixture(2, **args),
    }[name]
    X = overlapping_table() if name.startswith("gaussian") else discrete_tables()["categorical"]
    quiet_fit(est(), X, checkpoint=path, callbacks=[stop])
    return est, X, path


def test_a_checkpoint_with_bad_arrays_is_neither_loaded_nor_resumed(tmp_path):
    est, X, path = _checkpoint(tmp_path)
    edit_arrays(path, lambda a: a.update({"model1.weights_": np.array([0.9, 0.9, -0.8])}))
    message = refused(path, r"model1\.weights_ holds the negative weight -0\.8")
    assert "fit again with resume=False" in message
    with pytest.raises(ModelFileError, match=r"model1\.weights_ holds the negative weight"):
        quiet_fit(est(), X, checkpoint=path, resume=True)
    # resume=False replaces it
    quiet_fit(est(), X, checkpoint=path)
    emdask.load(path)


def test_a_checkpoint_may_hold_only_its_models_arrays(tmp_path):
    est, X, path = _checkpoint(tmp_path, "categorical")
    edit_arrays(path, lambda a: a.update({"model0.predict": np.zeros(2)}))
    refused(path, r"model0\.predict is not a fitted array of CategoricalMixture")
    est, X, path = _checkpoint(tmp_path / "b", "categorical")
    doc = read_doc(path)
    doc["models"] = doc["models"] * 2
    write_doc(path, doc)
    refused(path, r"models holds 4 models but n_init=2")


def test_accelerator_state_of_a_checkpoint_is_bounded_and_checked(tmp_path):
    est, X, path = _checkpoint(tmp_path, iterations=4)
    doc = read_doc(path)
    assert any("squarem" in m for m in doc["models"])
    vectors = [k for k in doc["arrays"]["entries"] if k.startswith("squarem")]
    assert vectors
    key = vectors[0]
    edit_arrays(path, lambda a: a.update({key: a[key][:-1]}))
    with pytest.raises(ModelFileError, match=rf"{re.escape(key)} has \d+ values but model \d has \d+ free parameters"):
        quiet_fit(est(), X, checkpoint=path, resume=True)
    edit_arrays(path, lambda a: a.update({key: np.zeros(10**6)}))
    refused(path, rf"{re.escape(key)} has dtype <f8 and shape \(1000000,\), but the accelerator state is a vector of at most")
    edit_arrays(path, lambda a: a.update({key: np.full(10, np.nan)}))
    refused(path, rf"{re.escape(key)} holds NaN or infinite values")
    edit_arrays(path, lambda a: a.pop("squarem0.pending"))
    refused(path, r"squarem0\.pending is missing, but models\[0\]\.squarem\.phase=2 needs it")


# -- files written by emdask still load, unchanged -------------------------------------------------


def assert_same_model(a, b):
    assert type(a) is type(b)
    for name in a._fitted_arrays:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in tuple(a._fitted_meta) + tuple(a._common_fitted):
        assert hasattr(a, name) == hasattr(b, name), name
        if hasattr(a, name):
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, np.ndarray):
                assert x.tolist() == y.tolist(), name
            else:
                assert x == y, name


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "missing"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_round_trips(name, missing, tmp_path):
    model, path = saved(tmp_path, name, missing)
    loaded = emdask.load(path)
    assert_same_model(model, loaded)


def test_numpy_input_and_starting_values_round_trip(tmp_path):
    X = gaussian_table().to_numpy()
    means = X[[0, 100, 200]]
    model = quiet_fit(GaussianMixture(3, means_init=means, weights_init=[0.2, 0.3, 0.5], random_state=0), X)
    loaded = emdask.load(model.save(tmp_path / "m"))
    assert_same_model(model, loaded)
    np.testing.assert_array_equal(loaded.means_init, means)


def test_models_of_select_components_round_trip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = emdask.select_components(
            GaussianMixture(covariance_type="diag", random_state=0, max_iter=20), gaussian_table(), [1, 2, 3]
        )
    for k, model in result.estimators_.items():
        assert_same_model(model, emdask.load(model.save(tmp_path / f"k{k}")))


@pytest.mark.parametrize("name", ["gaussian-full", "categorical"])
def test_checkpoints_load_and_resume(name, tmp_path):
    est, X, path = _checkpoint(tmp_path, name)
    loaded = emdask.load(path)
    assert loaded.n_iter_ == 3
    resumed = quiet_fit(est(), X, checkpoint=path, resume=True)
    whole = quiet_fit(est(), X)
    np.testing.assert_allclose(resumed.weights_, whole.weights_, rtol=1e-10)
