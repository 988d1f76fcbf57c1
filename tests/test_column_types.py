"""The column-type rules of the estimators: numbers stored as text, integer and boolean
columns filled in their own dtype, values too large to model, and a fit that stops rather than
return a non-finite model."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from emdask import EMImputer, GaussianMixture, MixedMixture
from emdask.engine import EMModel, prepare, run_em
from emdask.engine import columns as column_rules
from emdask.engine.columns import DataError, NonFiniteParameters, NotNumeric
from emdask.families.gaussian import GaussianFamily


def numbers(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n)
    df = pd.DataFrame({"x": x, "y": 2 * x + rng.normal(0, 0.5, n)})
    df.loc[rng.random(n) < 0.15, "y"] = np.nan
    return df


def as_text(values):
    """Floats written as text the way a CSV export writes them (NaN as a missing cell)."""
    return pd.Series([None if np.isnan(v) else repr(float(v)) for v in values], dtype=object)


# -- numbers stored as text -------------------------------------------------------------------


@pytest.mark.parametrize("text_dtype", [object, "string"])
def test_a_named_text_column_of_numbers_fits_and_fills_like_the_numbers(text_dtype):
    df = numbers()
    text = df.assign(y=as_text(df["y"]).astype(text_dtype))
    ref = EMImputer(random_state=0).fit(df, columns=["x", "y"])
    imp = EMImputer(random_state=0).fit(text, columns=["x", "y"])
    np.testing.assert_array_equal(imp.means_, ref.means_)
    np.testing.assert_array_equal(imp.covariances_, ref.covariances_)
    out = imp.transform(text)
    assert out["y"].dtype == np.float64  # published parsed
    pd.testing.assert_frame_equal(out, ref.transform(df))
    # lazily, partition by partition, the same
    lazy = imp.transform(dd.from_pandas(text, npartitions=3)).compute()
    pd.testing.assert_frame_equal(lazy, ref.transform(df))


#: dtype -> (table_kind, infer_family, needs a discrete family, read as numbers), by hand
DTYPE_RULES = [
    ("float64", "numeric", "gaussian", False, True),
    ("Float64", "numeric", "gaussian", False, True),
    ("int64", "numeric", "poisson", False, True),  # no range known: the scan decides
    ("Int64", "numeric", "poisson", False, True),
    ("bool", "numeric", "bernoulli", True, True),
    ("boolean", "numeric", "bernoulli", True, True),
    ("object", "categorical", "categorical", True, False),
    ("string", "categorical", "categorical", True, False),
    ("category", "categorical", "categorical", True, False),
    ("datetime64[ns]", None, TypeError, False, False),
    ("complex128", None, TypeError, False, False),
]


@pytest.mark.parametrize("dtype, kind, family, discrete, numeric", DTYPE_RULES)
def test_one_set_of_dtype_rules_decides_every_column_family(dtype, kind, family, discrete, numeric):
    dtype = pd.Series([], dtype=dtype).dtype
    assert column_rules.table_kind(dtype) == kind
    assert column_rules.needs_discrete_family(dtype) is discrete
    assert column_rules.is_numeric(dtype) is numeric
    if family is TypeError:
        with pytest.raises(TypeError, match="'c'"):
            column_rules.infer_family("c", dtype)
    else:
        assert column_rules.infer_family("c", dtype) == family


def test_an_integer_column_family_follows_its_range():
    int64 = np.dtype(np.int64)
    assert column_rules.infer_family("c", int64, (0, 1)) == "bernoulli"
    assert column_rules.infer_family("c", int64, (0, 7)) == "poisson"
    assert column_rules.infer_family("c", int64, (-1, 7)) == "gaussian"


def test_a_named_text_column_with_a_word_is_an_error_naming_column_and_value():
    df = numbers().assign(y=lambda d: as_text(d["y"]))
    df.loc[17, "y"] = "n/a?"
    for X in (df, dd.from_pandas(df, npartitions=2)):
        for est in (GaussianMixture(1), EMImputer()):
            with pytest.raises(NotNumeric, match=r"column 'y' is not numeric.*'n/a\?'"):
                est.fit(X, columns=["x", "y"])


def test_gaussian_mixture_is_explicit_about_a_named_column_of_labels():
    df = numbers().assign(label="abc")  # one string: not numbers
    with pytest.raises(DataError, match=r"column 'label'.*'abc'"):
        GaussianMixture(1).fit(df, columns=["x", "label"])
    # columns=None takes the numeric columns, as it always has
    assert GaussianMixture(1).fit(df).feature_names_in_.tolist() == ["x", "y"]


def test_mixed_mixture_reads_text_numbers_as_gaussian_and_words_as_categories():
    rng = np.random.default_rng(3)
    df = numbers(400).assign(
        t=lambda d: as_text(d["x"] * 3 + rng.normal(0, 0.1, len(d))),
        colour=rng.choice(["red", "blue"], 400).astype(object),
    )
    df.loc[::11, "t"] = None
    m = MixedMixture(2, random_state=0).fit(df)
    assert m.column_families_ == {"x": "gaussian", "y": "gaussian", "t": "gaussian",
                                  "colour": "categorical"}
    out = m.impute(df)
    assert out["t"].dtype == np.float64 and not out["t"].isna().any()
    seen = df["t"].notna()
    np.testing.assert_array_equal(out.loc[seen, "t"], df.loc[seen, "t"].astype(float))
    # a column the user declares Gaussian must be all numbers
    bad = df.copy()
    bad.loc[5, "t"] = "seven"
    with pytest.raises(DataError, match=r"column 't'.*'seven'"):
        MixedMixture(2, column_families={"t": "gaussian"}, random_state=0).fit(bad)
    # and undeclared, a text column with a word is a column of labels
    assert MixedMixture(1, random_state=0).fit(bad).column_families_["t"] == "categorical"


# -- integer and boolean columns keep their dtype ------------------------------------------------


def test_integer_columns_are_filled_with_rounded_expectations_in_their_dtype():
    rng = np.random.default_rng(4)
    n = 400
    x = rng.normal(5, 2, n)
    k = np.round(x * 3 + rng.normal(0, 1, n))
    df = pd.DataFrame({"x": x, "k": pd.array(k.astype(np.int64), dtype="Int64")})
    df.loc[rng.random(n) < 0.2, "k"] = pd.NA
    as_float = df.assign(k=df["k"].astype("float64"))
    imp = EMImputer(random_state=0).fit(df)
    out = imp.transform(df)
    assert out["k"].dtype == "Int64" and not out["k"].isna().any()
    expected = EMImputer(random_state=0).fit(as_float).transform(as_float)["k"]
    missing = df["k"].isna().to_numpy()
    assert np.array_equal(out["k"].to_numpy(dtype=np.int64)[missing],
                          np.round(expected.to_numpy()[missing]).astype(np.int64))
    assert (out["k"][~missing] == df["k"][~missing]).all()
    lazy = imp.transform(dd.from_pandas(df, npartitions=3))
    assert lazy.dtypes["k"] == "Int64"
    pd.testing.assert_frame_equal(lazy.compute(), out)


def test_nullable_booleans_held_as_objects_keep_their_dtype():
    rng = np.random.default_rng(5)
    n = 300
    g = rng.integers(0, 2, n).astype(bool)
    b = pd.Series([bool(v) for v in g], dtype=object)
    b[rng.random(n) < 0.2] = None
    df = pd.DataFrame({"x": np.where(g, 3.0, -3.0) + rng.normal(0, 1, n), "b": b})
    m = MixedMixture(2, random_state=0).fit(df)
    out = m.impute(df)
    assert out["b"].dtype == object and not out["b"].isna().any()
    assert {type(v) for v in out["b"]} == {bool}
    filled = df["b"].isna().to_numpy()
    # the fill is the other column's side: x > 0 goes with True
    assert (out["b"][filled].to_numpy(dtype=bool) == (df["x"][filled] > 0).to_numpy()).mean() > 0.95


# -- values too large, non-finite models -------------------------------------------------------------


def test_values_whose_squares_overflow_are_refused_naming_the_column():
    rng = np.random.default_rng(6)
    df = pd.DataFrame({
        "x": rng.normal(0, 1, 200) * 1e300,
        "b": pd.array(rng.random(200) < 0.5, dtype="boolean"),
    })
    df.loc[::10, "b"] = pd.NA
    for est in (MixedMixture(2, random_state=0), GaussianMixture(2, random_state=0)):
        with pytest.raises(DataError, match=r"\['x'\].*rescale"):
            est.fit(df if isinstance(est, MixedMixture) else df[["x"]])
    # a column at 1e150 still squares finitely and fits
    ok = GaussianMixture(1).fit(pd.DataFrame({"x": rng.normal(0, 1, 200) * 1e150}))
    assert np.isfinite(ok.covariances_).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow itself
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_a_start_that_overflows_stops_the_fit_naming_the_component(covariance_type):
    # every component 1e200 away from data of unit spread: squared distances overflow
    X = np.random.default_rng(7).normal(size=(200, 1))
    gm = GaussianMixture(2, covariance_type=covariance_type, means_init=[[1e200], [-1e200]],
                         algorithm="em")
    with pytest.raises(NonFiniteParameters, match=r"of component 0 is not finite") as info:
        gm.fit(X)
    assert "rescale" in str(info.value)
    assert not hasattr(gm, "weights_")  # no NaN model is left behind


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_driver_checks_every_m_step():
    X = np.random.default_rng(8).normal(size=(100, 1))
    family = GaussianFamily(2, "diag", 1e-6)
    data = prepare(X, persist=False)
    start = family.make_params(np.array([0.5, 0.5]), np.array([[1e200], [-1e200]]),
                               np.array([[1.0], [1.0]]))
    models = [EMModel(family, start)]
    with pytest.raises(NonFiniteParameters, match=r"at EM iteration 1: .* of component 0 is not"):
        run_em(data, models, max_iter=5)
    assert models[0].params is start and models[0].lower_bounds == []  # nothing NaN was kept
