"""``emdask impute`` on the column types real warehouses hold: numbers stored as text, nullable
integers, categories of many levels, booleans written without pandas metadata, and values too
large to model. Each is published in its own type, or refused up front with exit status 2."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipeline_data import published_dir, tree_digest, write_dataset


def table(n=240, seed=0):
    """Two correlated numeric answers, some of ``y`` missing."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n)
    df = pd.DataFrame({
        "rid": np.arange(1000, 1000 + n, dtype=np.int64),
        "x": x,
        "y": 2.0 * x + rng.normal(0, 0.5, n),
    })
    df.loc[rng.random(n) < 0.15, "y"] = np.nan
    return df


def as_text(values):
    return pd.Series([None if np.isnan(v) else repr(float(v)) for v in values], dtype=object)


def impute(tmp_path, name, source, dask_address, *options):
    dest = tmp_path / f"out-{name}"
    status = main(["impute", str(source), str(dest), "--id", "rid", "--dask-address",
                   dask_address, *options])
    return status, dest


def published(dest):
    return pd.read_parquet(published_dir(dest) / "data")


def test_numbers_stored_as_text_are_published_as_the_numbers_are(api, dask_address, tmp_path, capsys):
    df = table()
    numeric = write_dataset(df, tmp_path / "numeric", npartitions=2)
    text = write_dataset(df.assign(y=as_text(df["y"])), tmp_path / "text", npartitions=2)
    assert pd.api.types.is_string_dtype(pd.read_parquet(text)["y"].dtype)  # stored as text

    status, dest_numeric = impute(tmp_path, "numeric", numeric, dask_address)
    assert status == 0
    status, dest_text = impute(tmp_path, "text", text, dask_address, "--columns", "x,y")
    out = capsys.readouterr()
    assert status == 0, out.err[-2000:]
    assert "EMImputer" in out.out  # a Gaussian model, not a category of 200 levels
    expected, got = published(dest_numeric), published(dest_text)
    assert got["y"].dtype == np.float64 and not got["y"].isna().any()
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


def test_a_text_column_of_numbers_with_a_word_is_refused_naming_it(api, dask_address, tmp_path, capsys):
    df = table().assign(y=lambda d: as_text(d["y"]))
    df.loc[31, "y"] = "12,5"
    src = write_dataset(df, tmp_path / "survey", npartitions=2)
    digest = tree_digest(src)
    status, dest = impute(tmp_path, "bad", src, dask_address, "--columns", "x,y")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("emdask impute: error: ")
    assert "column 'y'" in err[-1] and "'12,5'" in err[-1]
    assert not dest.exists() and tree_digest(src) == digest


def test_nullable_integers_are_published_as_integers(api, dask_address, tmp_path, capsys):
    rng = np.random.default_rng(1)
    df = table()
    counts = np.round(5 + 3 * df["x"].to_numpy() + rng.normal(0, 1, len(df)))
    df["k"] = pd.array(counts.astype(np.int64), dtype="Int64")
    df.loc[rng.random(len(df)) < 0.2, "k"] = pd.NA
    src = write_dataset(df, tmp_path / "ints", npartitions=2)
    floats = write_dataset(df.assign(k=df["k"].astype("float64")), tmp_path / "floats", npartitions=2)

    status, dest = impute(tmp_path, "ints", src, dask_address)
    assert status == 0, capsys.readouterr().err[-2000:]
    status, dest_float = impute(tmp_path, "floats", floats, dask_address)
    assert status == 0
    out, reference = published(dest), published(dest_float)
    assert out["k"].dtype == "Int64" and not out["k"].isna().any()
    missing = df["k"].isna().to_numpy()
    fills = reference["k"].to_numpy()[missing]
    assert (fills != np.round(fills)).any()  # the float run's fills are fractional
    assert np.array_equal(out["k"].to_numpy(dtype=np.int64)[missing], np.round(fills).astype(np.int64))
    assert np.array_equal(out["k"].to_numpy(dtype=np.int64)[~missing],
                          df["k"].to_numpy(dtype=np.int64, na_value=0)[~missing])


def test_a_category_of_300_levels_round_trips(api, dask_address, tmp_path, capsys):
    rng = np.random.default_rng(2)
    n = 900
    levels = [f"c{i:03d}" for i in range(300)]
    df = table(n)
    df["c"] = pd.Categorical(np.array(levels)[rng.integers(0, 300, n)], categories=levels)
    df.loc[rng.random(n) < 0.1, "c"] = None
    src = write_dataset(df, tmp_path / "cats", npartitions=2)
    status, dest = impute(tmp_path, "cats", src, dask_address)
    assert status == 0, capsys.readouterr().err[-2000:]
    out = published(dest)
    source = pd.read_parquet(src)
    assert out["c"].dtype == source["c"].dtype  # same 300 categories, same order
    assert not out["c"].isna().any()
    seen = source["c"].notna().to_numpy()
    assert (out["c"][seen] == source["c"][seen]).all()


def test_booleans_with_nulls_written_by_pyarrow_round_trip(api, dask_address, tmp_path, capsys):
    rng = np.random.default_rng(3)
    df = table()
    flag = df["x"].to_numpy() > 0
    values = [bool(v) if rng.random() > 0.2 else None for v in flag]
    src = tmp_path / "flags"
    os.makedirs(src)
    for i, rows in enumerate((slice(0, 120), slice(120, None))):  # no pandas metadata
        pq.write_table(pa.table({
            "rid": pa.array(df["rid"].to_numpy()[rows]),
            "x": pa.array(df["x"].to_numpy()[rows]),
            "b": pa.array(values[rows], type=pa.bool_()),
        }), src / f"part.{i}.parquet", store_schema=False)
    status, dest = impute(tmp_path, "flags", src, dask_address, "-k", "2")
    assert status == 0, capsys.readouterr().err[-2000:]
    data = published_dir(dest) / "data"
    schema = pq.read_schema(next(data.glob("*.parquet")))
    assert schema.field("b").type == pa.bool_()
    out = pd.read_parquet(data)
    assert not out["b"].isna().any()
    seen = np.array([v is not None for v in values])
    assert out["b"].to_numpy(dtype=bool)[seen].tolist() == [v for v in values if v is not None]
    # filled from x: True on the positive side
    assert (out["b"].to_numpy(dtype=bool)[~seen] == flag[~seen]).mean() > 0.9


def test_values_too_large_to_model_are_refused_naming_the_column(api, dask_address, tmp_path, capsys):
    df = table()
    df["x"] *= 1e300
    src = write_dataset(df, tmp_path / "huge", npartitions=2)
    status, dest = impute(tmp_path, "huge", src, dask_address)
    err = capsys.readouterr().err
    assert status == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("emdask impute: error: ") and "'x'" in line and "rescale" in line
    assert "Retry" not in err  # bad input is not retried as I/O
    assert published_dir(dest) is None
