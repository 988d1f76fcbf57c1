"""Local sources, folder destinations and validation (no Prefect, no server involved)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import validation
from pipelines.errors import InputError, ValidationError
from pipelines.sources import open_source
from pipelines.versions import open_destination
from pipeline_data import survey_frame, tree_digest, write_dataset


@pytest.fixture()
def survey(tmp_path):
    return write_dataset(survey_frame(120), tmp_path / "survey", npartitions=3)


# -- sources -------------------------------------------------------------------------------


def test_source_kinds(tmp_path, survey):
    assert open_source(survey).format == "parquet"
    csv = tmp_path / "t.csv"
    survey_frame(20).to_csv(csv, index=False)
    info = open_source(str(csv))
    assert info.format == "csv" and info.files == (str(csv.resolve()),)
    assert info.identity() == open_source(str(csv)).identity()  # a digest of the bytes
    table = info.open_table().compute()
    assert len(table) == 20 and list(table.columns) == ["rid", "x", "y", "z"]
    glob = open_source(str(Path(survey) / "part.*.parquet"))
    assert glob.format == "parquet" and len(glob.files) == 3
    assert open_source(f"file://{survey}").identity() == open_source(survey).identity()


def test_the_run_key_follows_the_content_not_the_modification_time(tmp_path, survey):
    import os

    before = open_source(survey).identity()
    for f in Path(survey).glob("*.parquet"):
        os.utime(f, (0, 0))
    assert open_source(survey).identity() == before  # touched: same key
    df = survey_frame(120)
    df.loc[0, "x"] = 123.0
    write_dataset(df, survey, npartitions=3)
    assert open_source(survey).identity() != before


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
        open_source(make(tmp_path))


def test_columns_checked_against_the_table(survey):
    dtypes = open_source(survey).open_table().dtypes
    assert validation.check_table_columns(dtypes, "rid") == ["x", "y", "z"]
    assert validation.check_table_columns(dtypes, "rid", ["y"]) == ["y"]
    with pytest.raises(InputError, match="id column 'id' is not in the table"):
        validation.check_table_columns(dtypes, "id")
    with pytest.raises(InputError, match=r"column\(s\) \['w'\] not in the table"):
        validation.check_table_columns(dtypes, "rid", ["x", "w"])
    with pytest.raises(InputError, match="names the id column"):
        validation.check_table_columns(dtypes, "rid", ["rid", "x"])
    with pytest.raises(InputError, match="names a column twice"):
        validation.check_table_columns(dtypes, "rid", ["x", "x"])
    dated = pd.Series({"rid": np.dtype("int64"), "when": np.dtype("datetime64[ns]")})
    with pytest.raises(InputError, match="types no model takes"):
        validation.check_table_columns(dated, "rid", ["when"])


def test_profile_counts_rows_and_missing_cells(survey):
    df = survey_frame(120)
    profile = validation.profile_table(survey, "rid", ["x", "y", "z"])
    assert profile.rows == 120
    assert profile.missing == {c: int(df[c].isna().sum()) for c in ["x", "y", "z"]}
    assert profile.missing_rate()["x"] == pytest.approx(df["x"].isna().mean())


def test_profile_rejects_empty_tables_and_bad_ids(tmp_path):
    df = survey_frame(60)
    empty = write_dataset(df.iloc[:0], tmp_path / "empty", npartitions=1)
    with pytest.raises(InputError, match=r"empty table \(0 rows\)"):
        validation.profile_table(empty, "rid", ["x"])
    dup = df.copy()
    dup.loc[40, "rid"] = dup.loc[3, "rid"]
    path = write_dataset(dup, tmp_path / "dup", npartitions=3)
    with pytest.raises(InputError, match=r"id column 'rid' is not unique \(1 value\(s\) repeated, e.g. \[1003\]\)"):
        validation.profile_table(path, "rid", ["x"])
    holes = df.astype({"rid": "float64"})
    holes.loc[5, "rid"] = np.nan
    path = write_dataset(holes, tmp_path / "holes", npartitions=2)
    with pytest.raises(InputError, match="has 1 missing value"):
        validation.profile_table(path, "rid", ["x"])


# -- destinations --------------------------------------------------------------------------


def test_destination_checks(tmp_path, survey):
    info = open_source(survey)
    open_destination(tmp_path / "out").check(info)
    with pytest.raises(InputError, match="is the source or overlaps it"):
        open_destination(survey).check(info)
    with pytest.raises(InputError, match="is the source or overlaps it"):
        open_destination(Path(survey) / "sub").check(info)
    with pytest.raises(InputError, match="is the source or overlaps it"):
        open_destination(tmp_path).check(info)  # would contain the source
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("someone's data")
    with pytest.raises(InputError, match="holds no emdask output"):
        open_destination(tmp_path / "other").check(info)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        open_destination(tmp_path / "file" / "out").check(info)
    with pytest.raises(InputError, match="exists and is not a directory"):
        open_destination(tmp_path / "file").check(info)
    with pytest.raises(InputError, match="PostgreSQL is a source only"):
        open_destination("postgresql://u@127.0.0.1:1/db?table=t")
    with pytest.raises(InputError, match="unknown URL scheme 'nosuch'"):
        open_destination("nosuch://bucket/out")
    with pytest.raises(InputError, match="does not make on http:// stores"):
        open_destination("http://127.0.0.1:9/out").check(info)  # refused before any work
    assert not (tmp_path / "out").exists()  # checking writes nothing


# -- versions ------------------------------------------------------------------------------


def _publish(dest, key, text, keep_versions=5):
    with dest.new_version(key, keep_versions) as version:
        (version.local / "data.txt").write_text(text)
        return version.commit({"run_key": key})


def test_publish_swaps_the_pointer_and_keeps_versions(tmp_path):
    dest = open_destination(tmp_path / "dest")
    assert dest.published() is None
    first = _publish(dest, "a" * 64, "one", keep_versions=2)
    assert dest.published().name == first.name
    assert (Path(first.url) / "data.txt").read_text() == "one"
    assert dest.find("a" * 64).name == first.name
    assert dest.find("b" * 64) is None
    second = _publish(dest, "b" * 64, "two", keep_versions=2)
    third = _publish(dest, "c" * 64, "three", keep_versions=2)
    assert dest.published().name == third.name
    assert dest.list_versions() == [second.name, third.name]  # oldest pruned
    assert not Path(first.url).exists()
    pointer = (tmp_path / "dest" / "CURRENT").read_text().split()
    assert pointer == [third.name, second.name]  # published one first, then the history
    manifest = json.loads((Path(third.url) / "manifest.json").read_text())
    assert manifest["version"] == third.name and manifest["run_key"] == "c" * 64


def test_incomplete_versions_are_never_published(tmp_path):
    dest = open_destination(tmp_path / "dest")
    first = _publish(dest, "a" * 64, "one")
    before = tree_digest(tmp_path / "dest")
    with pytest.raises(OSError, match="disk full"):
        with dest.new_version("b" * 64) as version:
            (version.local / "data.txt").write_text("half")
            version.table_url("data")
            raise OSError("disk full")
    assert dest.published().name == first.name
    assert tree_digest(tmp_path / "dest") == before
    with pytest.raises(RuntimeError, match="without a commit"):
        with dest.new_version("c" * 64):
            pass
    assert tree_digest(tmp_path / "dest") == before


def test_concurrent_publishers_lose_no_version(tmp_path):
    """Many threads publish at once: each version is complete and named in the history."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"{i:064x}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda k: _publish(open_destination(tmp_path / "dest"), k, k,
                                                 keep_versions=20).name, keys))
    history = (tmp_path / "dest" / "CURRENT").read_text().split()
    assert sorted(history) == sorted(names)  # nobody's version dropped out of the history
    assert history[0] in names
    for name in names:
        assert json.loads((tmp_path / "dest" / "versions" / name / "manifest.json").read_text())


def test_a_store_publishes_by_compare_and_swap(tmp_path):
    """The memory store stands for any fsspec store: the same layout, history and pruning."""
    dest = open_destination("memory://emdask-test/out")
    first = _publish(dest, "a" * 64, "one", keep_versions=1)
    second = _publish(dest, "b" * 64, "two", keep_versions=1)
    assert dest.published().name == second.name and dest.list_versions() == [second.name]
    assert dest.fs.cat_file(f"{second.url}/data.txt") == b"two"
    assert not dest.fs.exists(first.url)


def test_leftovers_of_a_killed_run_are_removed_once_stale(tmp_path, monkeypatch):
    import pipelines.versions

    dest = open_destination(tmp_path / "dest")
    _publish(dest, "a" * 64, "one")
    killed = tmp_path / "dest" / "versions" / "20200101T000000000000Z-deadbeef"
    (killed / "data").mkdir(parents=True)
    (killed / "data" / "part.0.parquet").write_bytes(b"half")
    import os

    os.utime(killed / "data" / "part.0.parquet", (0, 0))
    young = tmp_path / "dest" / "versions" / pipelines.versions.version_name("f" * 64)
    young.mkdir()  # another run still writing
    slow = tmp_path / "dest" / "versions" / "20200101T000000000000Z-0badcafe"
    (slow / "data").mkdir(parents=True)
    (slow / "data" / "part.0.parquet").write_bytes(b"being written")  # started long ago, still writing
    _publish(dest, "b" * 64, "two")
    assert not killed.exists() and young.exists() and slow.exists()


def test_pointer_edited_by_hand_is_reported(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "CURRENT").write_text("../../etc\n")
    with pytest.raises(InputError, match="does not name a version"):
        open_destination(tmp_path / "dest").published()
    with pytest.raises(InputError, match="does not name a version"):
        open_destination(tmp_path / "dest").check(None)  # before any work


# -- validation ----------------------------------------------------------------------------


def _write_like_source(source, frame, target):
    """Write ``frame`` (the source's rows, in order) with the source's partitions."""
    import dask
    import dask.dataframe as dd

    table = open_source(source).open_table()
    lengths = dask.compute(*[dask.delayed(len)(p) for p in table.to_delayed()])
    bounds = np.cumsum([0, *lengths])
    parts = [frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    dd.from_delayed([dask.delayed(p) for p in parts], meta=frame.iloc[:0]).to_parquet(
        str(target), write_index=False
    )


def test_validation_of_a_filled_table(tmp_path, survey):
    df = open_source(survey).open_table().compute().reset_index(drop=True)
    cols = ["x", "y", "z"]
    filled = df.copy()
    for c in cols:
        filled[c] = filled[c].fillna(0.5)
    marks = pd.DataFrame({"rid": df["rid"], **{c: df[c].isna() for c in cols}})
    _write_like_source(survey, filled, tmp_path / "good")
    _write_like_source(survey, marks, tmp_path / "marks")
    checked = validation.validate_filled(survey, tmp_path / "good", "rid", cols, mask_dir=tmp_path / "marks")
    assert checked == {"rows": 120, "missing_after": {"x": 0, "y": 0, "z": 0}}

    changed = filled.copy()
    row = int(np.flatnonzero(df["y"].notna())[7])
    changed.loc[row, "y"] = np.nextafter(changed.loc[row, "y"], np.inf)  # one bit of one cell
    _write_like_source(survey, changed, tmp_path / "changed")
    with pytest.raises(ValidationError, match="observed cells of column 'y' changed"):
        validation.validate_filled(survey, tmp_path / "changed", "rid", cols)

    shuffled = filled.copy()
    shuffled["rid"] = shuffled["rid"].to_numpy()[::-1]
    _write_like_source(survey, shuffled, tmp_path / "shuffled")
    with pytest.raises(ValidationError, match="ids differ"):
        validation.validate_filled(survey, tmp_path / "shuffled", "rid", cols)

    left = df.copy()
    _write_like_source(survey, left, tmp_path / "left")
    checked = validation.validate_filled(survey, tmp_path / "left", "rid", cols)
    assert checked["missing_after"] == {c: int(df[c].isna().sum()) for c in cols}


def test_source_files_must_agree_on_their_columns_and_types(tmp_path):
    """A file with a column more, a column less or of another type is named, before any work."""
    df = survey_frame(60)

    def dataset(name, parts):
        folder = tmp_path / name
        folder.mkdir()
        for i, part in enumerate(parts):
            part.to_parquet(folder / f"part.{i}.parquet", index=False)
        return str(folder)

    extra = dataset("extra", [df.iloc[:30], df.iloc[30:].assign(w=1.0)])
    with pytest.raises(InputError, match=r"column 'w' is in part.1.parquet but not in part.0.parquet"):
        open_source(extra)
    fewer = dataset("fewer", [df.iloc[:30], df.iloc[30:].drop(columns="z")])
    with pytest.raises(InputError, match=r"column 'z' is in part.0.parquet but not in part.1.parquet"):
        open_source(fewer)
    retyped = dataset("retyped", [df.iloc[:30], df.iloc[30:].astype({"x": str})])
    with pytest.raises(InputError, match=r"column 'x' is double in part.0.parquet but (large_)?string in part.1.parquet"):
        open_source(retyped)
    with pytest.raises(InputError, match="column 'w'"):
        open_source(str(tmp_path / "extra" / "*.parquet"))  # a glob too
    # a column that is all null in one file agrees with any type
    nulls = df.copy()
    nulls["note"] = None
    ok = dataset("ok", [nulls.iloc[:30], nulls.iloc[30:].assign(note="x")])
    assert len(open_source(ok).files) == 2
