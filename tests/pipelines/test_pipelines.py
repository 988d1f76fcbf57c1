"""End-to-end runs of the flows against a real Prefect API and Dask cluster, on real files.

Every output is checked against the library called directly on the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import emdask
import pipelines.impute
import pipelines.versions
from pipelines import errors
from pipelines.image import segment_image
from pipelines.impute import impute_survey
from pipelines.segment import segment_customers
from pipeline_data import customers_frame, image_array, survey_frame, tree_digest, write_dataset, published_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _artifact(key):
    from prefect.artifacts import Artifact

    return Artifact.get(key)


def _versions(dest):
    return sorted(p.name for p in (Path(dest) / "versions").iterdir())


# -- impute-survey ---------------------------------------------------------------------------


def test_impute_survey_matches_the_library_and_reruns_idempotently(api, dask_address, tmp_path):
    src = write_dataset(survey_frame(600), tmp_path / "survey", npartitions=3)
    source_digest = tree_digest(src)
    dest = tmp_path / "imputed"

    s = impute_survey(src, str(dest), "rid", n_components=2, dask_address=dask_address)

    version = published_dir(dest)
    assert s["path"] == str(version) and s["model"] == "EMImputer"
    out = pd.read_parquet(version / "data")
    table = dd.read_parquet(src)
    reference = emdask.EMImputer(2, random_state=0).fit(table, columns=["x", "y", "z"])
    expected = reference.transform(table).compute()
    pd.testing.assert_frame_equal(out.reset_index(drop=True), expected.reset_index(drop=True),
                                  check_exact=False, rtol=1e-10)
    source = table.compute().reset_index(drop=True)
    observed = source.notna().to_numpy()
    assert np.array_equal(out.to_numpy()[observed], source.to_numpy()[observed])  # untouched
    assert not out.isna().any().any()
    marks = pd.read_parquet(version / "filled")
    assert marks["rid"].tolist() == source["rid"].tolist()
    assert (marks[["x", "y", "z"]].to_numpy() == source[["x", "y", "z"]].isna().to_numpy()).all()
    assert s["missing_before"] == {c: int(source[c].isna().sum()) for c in ["x", "y", "z"]}
    assert s["missing_after"] == {"x": 0, "y": 0, "z": 0}
    assert s["filled_cells"] == int(source[["x", "y", "z"]].isna().sum().sum())

    model = emdask.load(version / "model")
    np.testing.assert_allclose(model.means_, reference.means_, rtol=1e-10)
    assert model.lower_bounds_ == pytest.approx(reference.model_.lower_bounds_)
    assert (version / "convergence.png").read_bytes()[:8] == PNG_MAGIC
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["rows"] == 600 and manifest["flow"] == "impute-survey"
    assert manifest["fit"]["n_iter"] == reference.n_iter_
    summary = _artifact("impute-survey-summary")
    assert "Survey imputation" in summary.data and "600" in summary.data
    assert tree_digest(src) == source_digest  # the source is never modified

    # the same run again: nothing to do, the published version stays
    published = tree_digest(dest)
    again = impute_survey(src, str(dest), "rid", n_components=2, dask_address=dask_address)
    assert again["version"] == s["version"]
    assert tree_digest(dest) == published

    # forced: a new version with the same content
    forced = impute_survey(src, str(dest), "rid", n_components=2, dask_address=dask_address, force=True)
    assert forced["version"] != s["version"]
    assert published_dir(dest).name == forced["version"]
    assert _versions(dest) == sorted([s["version"], forced["version"]])
    pd.testing.assert_frame_equal(pd.read_parquet(Path(forced["path"]) / "data"), out)

    # other parameters: a new version
    other = impute_survey(src, str(dest), "rid", n_components=1, dask_address=dask_address,
                          keep_versions=2)
    assert other["version"] not in (s["version"], forced["version"])
    assert _versions(dest) == sorted([forced["version"], other["version"]])


def test_impute_categorical_answers_with_multiple_imputations(api, dask_address, tmp_path):
    src = write_dataset(survey_frame(400, categorical=True), tmp_path / "survey", npartitions=2)
    dest = tmp_path / "imputed"
    s = impute_survey(src, str(dest), "rid", n_components=2, method="multiple", n_imputations=2,
                      dask_address=dask_address)
    assert s["model"] == "MixedMixture"
    table = dd.read_parquet(src)
    model = emdask.MixedMixture(2, covariance_type="full", random_state=0)
    model.fit(table, columns=["x", "y", "z", "colour"])
    expected = model.sample_imputations(table, n_imputations=2, random_state=0)
    version = Path(s["path"])
    assert sorted(p.name for p in (version / "imputations").iterdir()) == ["1", "2"]
    for i, frame in enumerate(expected, start=1):
        out = pd.read_parquet(version / "imputations" / str(i))
        pd.testing.assert_frame_equal(out.reset_index(drop=True), frame.compute().reset_index(drop=True),
                                      check_exact=False, rtol=1e-10)
        assert not out.isna().any().any()
        assert set(out["colour"]) == {"red", "blue"}
    first = pd.read_parquet(version / "imputations" / "1")
    second = pd.read_parquet(version / "imputations" / "2")
    missing = table.compute()["x"].isna().to_numpy()
    assert not np.allclose(first["x"].to_numpy()[missing], second["x"].to_numpy()[missing])


def test_a_run_failing_mid_write_leaves_the_published_version(api, dask_address, tmp_path, monkeypatch):
    src = write_dataset(survey_frame(300), tmp_path / "survey", npartitions=3)
    dest = tmp_path / "imputed"
    first = impute_survey(src, str(dest), "rid", dask_address=dask_address)
    published = tree_digest(dest)
    written = []

    write = pipelines.versions._write_bytes

    def half_written_manifest(fs, path, data):
        if not str(path).endswith("manifest.json"):
            return write(fs, path, data)
        written.extend(p.name for p in Path(path).parent.iterdir())
        Path(path).write_text('{"format": "emdask-data')  # cut short
        raise OSError("No space left on device")

    monkeypatch.setattr(pipelines.versions, "_write_bytes", half_written_manifest)
    with pytest.raises(OSError, match="No space left"):
        impute_survey(src, str(dest), "rid", dask_address=dask_address, force=True)
    assert {"data", "filled", "model", "convergence.png"} <= set(written)  # died mid-write
    assert tree_digest(dest) == published  # previous version intact, nothing partial visible
    assert published_dir(dest).name == first["version"]
    assert sorted(p.name for p in (dest / "versions").iterdir()) == [first["version"]]


def test_output_failing_validation_is_not_published(api, dask_address, tmp_path, monkeypatch):
    src = write_dataset(survey_frame(300), tmp_path / "survey", npartitions=3)
    dest = tmp_path / "imputed"
    fill = pipelines.impute._fill

    def fill_and_alter(model, table):  # a fill that also changes one observed cell
        out = fill(model, table)
        return out.assign(z=out["z"].where(out["rid"] != 1005, -1.0))

    monkeypatch.setattr(pipelines.impute, "_fill", fill_and_alter)
    with pytest.raises(errors.ValidationError, match="observed cells of column 'z' changed"):
        impute_survey(src, str(dest), "rid", dask_address=dask_address)
    assert published_dir(dest) is None
    assert not dest.exists()  # nothing at all was left behind


# -- segment-customers -----------------------------------------------------------------------


def test_segment_customers_chooses_k_like_the_library(api, dask_address, tmp_path):
    src = write_dataset(customers_frame(900), tmp_path / "customers", npartitions=3)
    dest = tmp_path / "segments"
    s = segment_customers(src, str(dest), "cid", k_min=2, k_max=4, dask_address=dask_address)

    table = dd.read_parquet(src)
    result = emdask.select_components(emdask.GaussianMixture(random_state=0), table,
                                      n_components=range(2, 5), columns=["spend", "visits"])
    best = result.best_estimator_
    assert s["n_components"] == best.n_components == 3
    assert s["searched"] == [2, 3, 4]
    version = published_dir(dest)
    out = pd.read_parquet(version / "segments")
    assert list(out.columns) == ["cid", "segment", "p_0", "p_1", "p_2"]
    assert out["cid"].tolist() == table["cid"].compute().tolist()
    labels = best.predict(table).compute().to_numpy()
    assert np.array_equal(out["segment"].to_numpy(), labels)
    np.testing.assert_allclose(out[["p_0", "p_1", "p_2"]].to_numpy(),
                               best.predict_proba(table).compute().to_numpy(), rtol=1e-9, atol=1e-12)
    profile = pd.read_parquet(version / "profile.parquet")
    assert profile["rows"].tolist() == np.bincount(labels, minlength=3).tolist()
    np.testing.assert_allclose(profile["weight"], best.weights_, rtol=1e-10)
    np.testing.assert_allclose(profile[["spend", "visits"]].to_numpy(), best.means_, rtol=1e-10)
    selection = pd.read_csv(version / "selection.csv")
    np.testing.assert_allclose(selection["bic"], result.table_["bic"], rtol=1e-10)
    for name in ("bic.png", "convergence.png"):
        assert (version / name).read_bytes()[:8] == PNG_MAGIC
    assert emdask.load(version / "model").n_components == 3
    assert "Customer segmentation" in _artifact("segment-customers-summary").data


def test_segment_scaled_and_mixed_features(api, dask_address, tmp_path):
    df = customers_frame(600)
    df["channel"] = pd.array(np.where(df["spend"] > 100, "shop", "web"), dtype="string")
    src = write_dataset(df, tmp_path / "customers", npartitions=2)

    scaled = segment_customers(src, str(tmp_path / "scaled"), "cid", features=["spend", "visits"],
                               n_components=3, scale=True, dask_address=dask_address)
    profile = pd.DataFrame(scaled["profile"]).sort_values("spend")
    np.testing.assert_allclose(profile["spend"], [10, 60, 200], atol=1.0)  # original units
    np.testing.assert_allclose(profile["visits"], [2, 8, 20], atol=0.3)
    assert (Path(scaled["path"]) / "scaling.json").exists()

    mixed = segment_customers(src, str(tmp_path / "mixed"), "cid", n_components=2,
                              covariance_type="diag", dask_address=dask_address)
    assert mixed["model"] == "MixedMixture"
    model = emdask.load(Path(mixed["path"]) / "model")
    assert model.column_families_ == {"spend": "gaussian", "visits": "gaussian", "channel": "categorical"}
    profile = pd.read_csv(Path(mixed["path"]) / "profile.csv")
    np.testing.assert_allclose(profile["channel=shop"] + profile["channel=web"], 1.0)
    reference = emdask.MixedMixture(2, covariance_type="diag", random_state=0).fit(
        dd.read_parquet(src), columns=["spend", "visits", "channel"])
    np.testing.assert_allclose(profile["weight"], reference.weights_, rtol=1e-9)


def test_csv_source_gives_the_segments_of_the_same_parquet_table(api, dask_address, tmp_path):
    df = customers_frame(300)
    csv = tmp_path / "customers.csv"
    df.to_csv(csv, index=False)
    parquet = write_dataset(df, tmp_path / "customers", npartitions=1)
    from_csv = segment_customers(str(csv), str(tmp_path / "a"), "cid", n_components=3,
                                 dask_address=dask_address)
    from_parquet = segment_customers(parquet, str(tmp_path / "b"), "cid", n_components=3,
                                     dask_address=dask_address)
    a = pd.read_parquet(Path(from_csv["path"]) / "segments")
    b = pd.read_parquet(Path(from_parquet["path"]) / "segments")
    assert a["cid"].tolist() == df["cid"].tolist()
    assert np.array_equal(a["segment"].to_numpy(), b["segment"].to_numpy())
    np.testing.assert_allclose(a[["p_0", "p_1", "p_2"]].to_numpy(dtype=float),
                               b[["p_0", "p_1", "p_2"]].to_numpy(), rtol=1e-9, atol=1e-12)


# -- segment-image -----------------------------------------------------------------------------


def test_segment_image_labels_pixels_like_the_library(api, dask_address, tmp_path):
    png = tmp_path / "picture.png"
    Image.fromarray(image_array(96, 64)).save(png)
    s = segment_image(str(png), str(tmp_path / "out"), n_components=3, dask_address=dask_address)

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.float64)
    reference = emdask.GaussianMixture(3, random_state=0).fit(pixels)
    version = published_dir(tmp_path / "out")
    labels = np.load(version / "labels.npy")
    assert labels.shape == (64, 96)
    assert np.array_equal(labels.ravel(), reference.predict(pixels))
    segmented = np.asarray(Image.open(version / "segments.png").convert("RGB"))
    colours = np.clip(np.rint(reference.means_), 0, 255).astype(np.uint8)
    assert np.array_equal(segmented, colours[labels])
    assert s["counts"] == np.bincount(labels.ravel(), minlength=3).tolist()
    assert not (version / "work").exists()
    assert "Image segmentation" in _artifact("segment-image-summary").data


def test_segment_image_with_position_and_k_searched(api, dask_address, tmp_path):
    png = tmp_path / "picture.jpg"
    Image.fromarray(image_array(80, 50)).save(png, quality=95)
    s = segment_image(str(png), str(tmp_path / "out"), k_min=2, k_max=4, position=True,
                      position_weight=0.5, dask_address=dask_address)
    assert s["searched"] == [2, 3, 4] and s["n_components"] in (2, 3, 4)
    version = Path(s["path"])
    assert emdask.load(version / "model").means_.shape == (s["n_components"], 5)  # RGB + x, y
    assert (version / "bic.png").read_bytes()[:8] == PNG_MAGIC
    assert np.load(version / "labels.npy").shape == (50, 80)


# -- bad input -------------------------------------------------------------------------------


def _bad_inputs(tmp_path):
    good = write_dataset(survey_frame(50), tmp_path / "good", npartitions=2)
    empty = write_dataset(survey_frame(50).iloc[:0], tmp_path / "empty", npartitions=1)
    dup = survey_frame(50)
    dup.loc[10, "rid"] = dup.loc[0, "rid"]
    dup = write_dataset(dup, tmp_path / "dup", npartitions=2)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "text.png").write_text("not an image")
    out = str(tmp_path / "out")
    return [
        (impute_survey, dict(source=str(tmp_path / "missing"), dest=out, id_column="rid"), "does not exist"),
        (impute_survey, dict(source=empty, dest=out, id_column="rid"), r"empty table \(0 rows\)"),
        (impute_survey, dict(source=good, dest=out, id_column="nope"), "id column 'nope' is not in the table"),
        (impute_survey, dict(source=dup, dest=out, id_column="rid"), "id column 'rid' is not unique"),
        (impute_survey, dict(source=good, dest=out, id_column="rid", columns=["x", "w"]), r"\['w'\] not in the table"),
        (segment_customers, dict(source=good, dest=good, id_column="rid"), "is the source or overlaps it"),
        (segment_customers, dict(source=good, dest=str(tmp_path / "a-file" / "out"), id_column="rid"),
         "a-file is a file, not a directory"),
        (segment_customers, dict(source=good, dest=out, id_column="rid", k_min=5, k_max=3),
         "k_min=5 is larger than k_max=3"),
        (segment_image, dict(image=str(tmp_path / "text.png"), out=out), "is not an image"),
        (segment_image, dict(image=str(tmp_path / "nothing.png"), out=out), "does not exist"),
    ]


def test_bad_input_fails_before_any_work_with_a_clear_message(api, dask_address, tmp_path):
    for flow_fn, kwargs, message in _bad_inputs(tmp_path):
        with pytest.raises(errors.InputError, match=message):
            flow_fn(**kwargs, dask_address=dask_address)
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "good" / "versions").exists()


def test_parameters_are_validated_by_prefect(api, tmp_path):
    from prefect.exceptions import ParameterTypeError

    src = write_dataset(survey_frame(20), tmp_path / "good", npartitions=1)
    with pytest.raises(ParameterTypeError, match="n_components"):
        impute_survey(src, str(tmp_path / "out"), "rid", n_components=0)
    with pytest.raises(ParameterTypeError, match="method"):
        impute_survey(src, str(tmp_path / "out"), "rid", method="median")
    assert not (tmp_path / "out").exists()


def test_segment_marks_and_logs_singular_candidates(api, dask_address, tmp_path, caplog):
    # two groups of customers, and 40 of them with exactly 7 visits and similar spend: a
    # component on them has a visits variance of only reg_covar (a spike, never chosen)
    rng = np.random.default_rng(11)
    n = 600
    group = rng.random(n) < 0.5
    df = pd.DataFrame({
        "cid": np.arange(n),
        "spend": np.where(group, rng.normal(40, 8, n), rng.normal(120, 15, n)),
        "visits": np.round(np.where(group, rng.normal(3, 1.5, n), rng.normal(12, 3, n))),
    })
    df.loc[:39, ["spend", "visits"]] = np.column_stack([rng.normal(80, 2, 40), np.full(40, 7.0)])
    src = write_dataset(df, tmp_path / "customers", npartitions=2)
    dest = tmp_path / "segments"
    with caplog.at_level("WARNING"):
        s = segment_customers(src, str(dest), "cid", k_min=1, k_max=5, covariance_type="diag",
                              dask_address=dask_address)
    selection = pd.read_csv(published_dir(dest) / "selection.csv", keep_default_na=False)
    marked = selection[selection["singular"]]
    assert len(marked), selection  # the spike is found by some candidate ...
    assert s["n_components"] not in set(marked["n_components"])  # ... and never chosen
    for k, why in zip(marked["n_components"], marked["singular_reason"]):
        assert "reg_covar floor" in why or "rows for" in why
        assert f"k={k} is singular and was not considered" in caplog.text
