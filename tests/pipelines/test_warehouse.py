"""Reading, checking, validating and publishing warehouse tables (no Prefect involved)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import warehouse
from pipelines.warehouse import InputError, ValidationError
from pipeline_data import survey_frame, tree_digest, write_dataset


@pytest.fixture()
def survey(tmp_path):
    return write_dataset(survey_frame(120), tmp_path / "survey", npartitions=3)


# -- sources -------------------------------------------------------------------------------


def test_source_kinds(tmp_path, survey):
    assert warehouse.check_source(survey).format == "parquet"
    csv = tmp_path / "t.csv"
    survey_frame(20).to_csv(csv, index=False)
    info = warehouse.check_source(str(csv))
    assert info.format == "csv" and info.files == (str(csv.resolve()),)
    table = warehouse.open_table(info).compute()
    assert len(table) == 20 and list(table.columns) == ["rid", "x", "y", "z"]
    glob = warehouse.check_source(str(Path(survey) / "part.*.parquet"))
    assert glob.format == "parquet" and len(glob.files) == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "nope"), "does not exist"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "empty directory"),
        (lambda p: str(p / "f.parquet") if (p / "f.parquet").write_text("not parquet") else "", "neither a Parquet"),
        (lambda p: str(p / "*.parquet"), "matches no file"),
        (lambda p: "  ", "source is empty"),
    ],
)
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        warehouse.check_source(make(tmp_path))


def test_columns_checked_against_the_table(survey):
    dtypes = warehouse.open_table(survey).dtypes
    assert warehouse.check_table_columns(dtypes, "rid") == ["x", "y", "z"]
    assert warehouse.check_table_columns(dtypes, "rid", ["y"]) == ["y"]
    with pytest.raises(InputError, match="id column 'id' is not in the table"):
        warehouse.check_table_columns(dtypes, "id")
    with pytest.raises(InputError, match=r"column\(s\) \['w'\] not in the table"):
        warehouse.check_table_columns(dtypes, "rid", ["x", "w"])
    with pytest.raises(InputError, match="names the id column"):
        warehouse.check_table_columns(dtypes, "rid", ["rid", "x"])
    with pytest.raises(InputError, match="names a column twice"):
        warehouse.check_table_columns(dtypes, "rid", ["x", "x"])
    dated = pd.Series({"rid": np.dtype("int64"), "when": np.dtype("datetime64[ns]")})
    with pytest.raises(InputError, match="types no model takes"):
        warehouse.check_table_columns(dated, "rid", ["when"])


def test_profile_counts_rows_and_missing_cells(survey):
    df = survey_frame(120)
    profile = warehouse.profile_table(survey, "rid", ["x", "y", "z"])
    assert profile.rows == 120
    assert profile.missing == {c: int(df[c].isna().sum()) for c in ["x", "y", "z"]}
    assert profile.missing_rate()["x"] == pytest.approx(df["x"].isna().mean())


def test_profile_rejects_empty_tables_and_bad_ids(tmp_path):
    df = survey_frame(60)
    empty = write_dataset(df.iloc[:0], tmp_path / "empty", npartitions=1)
    with pytest.raises(InputError, match=r"empty table \(0 rows\)"):
        warehouse.profile_table(empty, "rid", ["x"])
    dup = df.copy()
    dup.loc[40, "rid"] = dup.loc[3, "rid"]
    path = write_dataset(dup, tmp_path / "dup", npartitions=3)
    with pytest.raises(InputError, match=r"id column 'rid' is not unique \(1 value\(s\) repeated, e.g. \[1003\]\)"):
        warehouse.profile_table(path, "rid", ["x"])
    holes = df.astype({"rid": "float64"})
    holes.loc[5, "rid"] = np.nan
    path = write_dataset(holes, tmp_path / "holes", npartitions=2)
    with pytest.raises(InputError, match="has 1 missing value"):
        warehouse.profile_table(path, "rid", ["x"])


# -- destinations --------------------------------------------------------------------------


def test_destination_checks(tmp_path, survey):
    info = warehouse.check_source(survey)
    assert warehouse.check_destination(tmp_path / "out", info) == (tmp_path / "out").resolve()
    with pytest.raises(InputError, match="is the source or overlaps it"):
        warehouse.check_destination(survey, info)
    with pytest.raises(InputError, match="is the source or overlaps it"):
        warehouse.check_destination(Path(survey) / "sub", info)
    with pytest.raises(InputError, match="is the source or overlaps it"):
        warehouse.check_destination(tmp_path, info)  # would contain the source
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("someone's data")
    with pytest.raises(InputError, match="holds no emdask output"):
        warehouse.check_destination(tmp_path / "other", info)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        warehouse.check_destination(tmp_path / "file" / "out", info)
    with pytest.raises(InputError, match="exists and is not a directory"):
        warehouse.check_destination(tmp_path / "file", info)
    assert not (tmp_path / "out").exists()  # checking writes nothing


# -- versions ------------------------------------------------------------------------------


def _stage(dest, key, text):
    staged = warehouse.new_staging(dest, key)
    (staged / "data.txt").write_text(text)
    warehouse.write_manifest(staged, {"run_key": key})
    return staged


def test_publish_swaps_the_pointer_and_keeps_versions(tmp_path):
    dest = tmp_path / "dest"
    assert warehouse.published_path(dest) is None
    first = warehouse.publish(dest, _stage(dest, "a" * 64, "one"), keep_versions=2)
    assert warehouse.published_path(dest) == first
    assert (first / "data.txt").read_text() == "one"
    assert warehouse.find_published(dest, "a" * 64) == first
    assert warehouse.find_published(dest, "b" * 64) is None
    second = warehouse.publish(dest, _stage(dest, "b" * 64, "two"), keep_versions=2)
    third = warehouse.publish(dest, _stage(dest, "c" * 64, "three"), keep_versions=2)
    assert warehouse.published_path(dest) == third
    assert warehouse.list_versions(dest) == [second.name, third.name]  # oldest pruned
    assert not first.exists()
    assert not (dest / warehouse.STAGING).exists()
    manifest = json.loads((third / "manifest.json").read_text())
    assert manifest["version"] == third.name and manifest["run_key"] == "c" * 64


def test_incomplete_versions_are_never_published(tmp_path):
    dest = tmp_path / "dest"
    first = warehouse.publish(dest, _stage(dest, "a" * 64, "one"))
    before = tree_digest(dest / "versions")
    staged = warehouse.new_staging(dest, "b" * 64)
    (staged / "data.txt").write_text("half")
    with pytest.raises(RuntimeError, match="no manifest"):
        warehouse.publish(dest, staged)
    warehouse.discard_staging(staged)
    assert not staged.exists()
    assert warehouse.published_path(dest) == first
    assert tree_digest(dest / "versions") == before


def test_pointer_edited_by_hand_is_reported(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "CURRENT").write_text("../../etc\n")
    with pytest.raises(InputError, match="does not name a version"):
        warehouse.published_path(dest)


# -- validation ----------------------------------------------------------------------------


def _write_like_source(source, frame, target):
    """Write ``frame`` (the source's rows, in order) with the source's partitions."""
    import dask
    import dask.dataframe as dd

    table = warehouse.open_table(source)
    lengths = dask.compute(*[dask.delayed(len)(p) for p in table.to_delayed()])
    bounds = np.cumsum([0, *lengths])
    parts = [frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    dd.from_delayed([dask.delayed(p) for p in parts], meta=frame.iloc[:0]).to_parquet(
        str(target), write_index=False
    )


def test_validation_of_a_filled_table(tmp_path, survey):
    df = warehouse.open_table(survey).compute().reset_index(drop=True)
    cols = ["x", "y", "z"]
    filled = df.copy()
    for c in cols:
        filled[c] = filled[c].fillna(0.5)
    marks = pd.DataFrame({"rid": df["rid"], **{c: df[c].isna() for c in cols}})
    _write_like_source(survey, filled, tmp_path / "good")
    _write_like_source(survey, marks, tmp_path / "marks")
    checked = warehouse.validate_filled(survey, tmp_path / "good", "rid", cols, mask_dir=tmp_path / "marks")
    assert checked == {"rows": 120, "missing_after": {"x": 0, "y": 0, "z": 0}}

    changed = filled.copy()
    row = int(np.flatnonzero(df["y"].notna())[7])
    changed.loc[row, "y"] = np.nextafter(changed.loc[row, "y"], np.inf)  # one bit of one cell
    _write_like_source(survey, changed, tmp_path / "changed")
    with pytest.raises(ValidationError, match="observed cells of column 'y' changed"):
        warehouse.validate_filled(survey, tmp_path / "changed", "rid", cols)

    shuffled = filled.copy()
    shuffled["rid"] = shuffled["rid"].to_numpy()[::-1]
    _write_like_source(survey, shuffled, tmp_path / "shuffled")
    with pytest.raises(ValidationError, match="ids differ"):
        warehouse.validate_filled(survey, tmp_path / "shuffled", "rid", cols)

    left = df.copy()
    _write_like_source(survey, left, tmp_path / "left")
    checked = warehouse.validate_filled(survey, tmp_path / "left", "rid", cols)
    assert checked["missing_after"] == {c: int(df[c].isna().sum()) for c in cols}
