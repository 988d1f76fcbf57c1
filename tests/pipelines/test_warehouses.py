"""The flows on real warehouses: an S3 server, Iceberg catalogs, Delta tables, PostgreSQL.

Every server is real and started by the tests on 127.0.0.1 (see ``tests/servers.py``). Each
result is compared with the same flow run on local Parquet files.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from pipeline_data import customers_frame, survey_frame, write_dataset
from pipelines.errors import InputError
from pipelines.impute import impute_survey
from pipelines.segment import segment_customers
from pipelines.sources import open_source
from pipelines.versions import ConcurrentCommitError, open_destination
from warehouse_fixtures import *  # noqa: F401,F403  (s3, postgres, catalog fixtures)

COLUMNS = ["x", "y", "z"]


@pytest.fixture()
def s3_env(s3, monkeypatch):
    """The AWS variables of the local S3 server, as a deployment would set them."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def _upload_dataset(s3, frame, bucket, prefix, npartitions=3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options())
    bounds = np.linspace(0, len(frame), npartitions + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        with fs.open(f"{bucket}/{prefix}/part.{i}.parquet", "wb") as fh:
            frame.iloc[a:b].to_parquet(fh, index=False)
    return f"s3://{bucket}/{prefix}"


def _local_reference(tmp_path, frame, dask_address, npartitions=3, **options):
    src = write_dataset(frame, tmp_path / "reference-src", npartitions=npartitions)
    return impute_survey(src, str(tmp_path / "reference-out"), "rid", dask_address=dask_address,
                         **options)


def _read_s3_parquet(s3, url):
    return pd.read_parquet(url, storage_options=s3.storage_options())


def test_impute_from_s3_to_s3_matches_local_and_reruns_idempotently(api, dask_address, s3_env, tmp_path):
    frame = survey_frame(600)
    bucket = s3_env.make_bucket("survey-a")
    src = _upload_dataset(s3_env, frame, bucket, "in")
    dest = f"s3://{bucket}/out"

    s = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address)
    reference = _local_reference(tmp_path, frame, dask_address, n_components=2)

    assert s["path"] == f"{dest}/versions/{s['version']}"
    out = _read_s3_parquet(s3_env, s["tables"][0])
    expected = pd.read_parquet(reference["tables"][0])
    pd.testing.assert_frame_equal(out.reset_index(drop=True), expected.reset_index(drop=True))
    client = s3_env.client()
    pointer = client.get_object(Bucket=bucket, Key="out/CURRENT")["Body"].read().decode().split()
    assert pointer[0] == s["version"]
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"out/versions/{s['version']}/manifest.json")["Body"].read())
    tokens = [f[2] for f in manifest["source"]["files"]]
    assert all(t.startswith("ETag:") for t in tokens)  # the run key follows the objects' ETags
    assert "testing" not in json.dumps(manifest)  # no credential in the manifest

    again = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address)
    assert again.get("up_to_date") and again["version"] == s["version"]

    # a changed object is a new source: the next run computes a new version
    changed = frame.copy()
    changed.loc[3, "x"] = 42.0
    _upload_dataset(s3_env, changed, bucket, "in")
    third = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address)
    assert not third.get("up_to_date") and third["version"] != s["version"]
    pointer = client.get_object(Bucket=bucket, Key="out/CURRENT")["Body"].read().decode().split()
    assert pointer == [third["version"], s["version"]]


def test_segment_from_s3_to_an_iceberg_table_keeps_the_previous_snapshot(
        api, dask_address, s3_env, sqlite_catalog, tmp_path):
    frame = customers_frame(900)
    bucket = s3_env.make_bucket("customers-a")
    src = _upload_dataset(s3_env, frame, bucket, "in")
    catalog = sqlite_catalog.load()
    catalog.create_namespace("crm")
    dest = f"iceberg://{sqlite_catalog.name}/crm.segments"

    first = segment_customers(src, dest, "cid", n_components=3, dask_address=dask_address)
    table = catalog.load_table(("crm", "segments"))
    snap1 = table.current_snapshot()
    assert snap1.summary.additional_properties["emdask.version"] == first["version"]
    got = table.scan().to_arrow().to_pandas().sort_values("cid").reset_index(drop=True)
    local_src = write_dataset(frame, tmp_path / "local", npartitions=3)
    ref = segment_customers(local_src, str(tmp_path / "ref"), "cid", n_components=3,
                            dask_address=dask_address)
    expected = pd.read_parquet(ref["tables"][0]).sort_values("cid").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[expected.columns], expected, check_dtype=False)

    second = segment_customers(src, dest, "cid", n_components=3, random_state=1, n_init=2,
                               dask_address=dask_address)
    table = catalog.load_table(("crm", "segments"))
    assert table.current_snapshot().summary.additional_properties["emdask.version"] == second["version"]
    old = table.scan(snapshot_id=snap1.snapshot_id).to_arrow().to_pandas()
    assert len(old) == 900 and set(old["cid"]) == set(frame["cid"])  # time travel still works
    assert len(table.scan().to_arrow()) == 900  # replaced, not appended
    # the same run again does nothing
    again = segment_customers(src, dest, "cid", n_components=3, random_state=1, n_init=2,
                              dask_address=dask_address)
    assert again.get("up_to_date")
    assert catalog.load_table(("crm", "segments")).current_snapshot().snapshot_id == table.current_snapshot().snapshot_id


def test_impute_from_iceberg_source_at_a_snapshot_to_delta(api, dask_address, sqlite_catalog, tmp_path):
    import pyarrow as pa
    from deltalake import DeltaTable

    frame = survey_frame(400)
    catalog = sqlite_catalog.load()
    catalog.create_namespace("survey")
    table = catalog.create_table(("survey", "answers"), schema=pa.Schema.from_pandas(frame, preserve_index=False))
    table.append(pa.Table.from_pandas(frame.iloc[:200], preserve_index=False))
    table.append(pa.Table.from_pandas(frame.iloc[200:], preserve_index=False))
    snapshot = table.current_snapshot().snapshot_id
    table.append(pa.Table.from_pandas(survey_frame(10, seed=9).assign(rid=np.arange(10)), preserve_index=False))

    src = f"iceberg://{sqlite_catalog.name}/survey.answers@{snapshot}"
    assert len(open_source(src).open_table().compute()) == 400
    dest = tmp_path / "delta-out"
    s = impute_survey(src, f"delta+{dest}", "rid", dask_address=dask_address)
    dt = DeltaTable(str(dest))
    assert dt.history(1)[0]["emdask.version"] == s["version"]
    got = dt.to_pandas().sort_values("rid").reset_index(drop=True)
    ref = _local_reference(tmp_path, frame, dask_address, npartitions=2)
    expected = pd.read_parquet(ref["tables"][0]).sort_values("rid").reset_index(drop=True)
    np.testing.assert_allclose(got[COLUMNS].to_numpy(), expected[COLUMNS].to_numpy(), rtol=1e-6)
    assert not got[COLUMNS].isna().any().any()

    # a second version of the Delta table; the first stays readable
    again = impute_survey(src, str(dest), "rid", dask_address=dask_address)
    assert again.get("up_to_date")
    forced = impute_survey(src, str(dest), "rid", n_components=2, dask_address=dask_address)
    dt = DeltaTable(str(dest))
    assert dt.version() == 1 and dt.history(1)[0]["emdask.version"] == forced["version"]
    assert len(dt.to_pandas()) == 400
    assert len(DeltaTable(str(dest), version=0).to_pandas()) == 400

    # the Delta table is a source too, at a version
    delta_src = open_source(f"{dest}@0")
    assert delta_src.identity()["version"] == 0
    assert len(delta_src.open_table().compute()) == 400


def test_postgres_source_read_in_ranges_gives_the_local_result(api, dask_address, postgres, monkeypatch, tmp_path):
    frame = survey_frame(500)
    postgres.execute("DROP TABLE IF EXISTS public.answers")
    postgres.execute("CREATE TABLE public.answers (rid bigint PRIMARY KEY, x double precision, "
                     "y double precision, z double precision)")
    with postgres.connect() as conn, conn.cursor() as cur:
        with cur.copy("COPY public.answers (rid, x, y, z) FROM STDIN") as copy:
            for row in frame.itertuples(index=False):
                copy.write_row([int(row.rid)] + [None if pd.isna(v) else float(v) for v in row[1:]])
        conn.commit()
    for key, value in postgres.env.items():
        monkeypatch.setenv(key, value)
    url = f"{postgres.url}?table=public.answers&partitions=4"
    source = open_source(url)
    assert source.partition_on == "rid" and len(source.ranges) == 4  # the primary key
    assert source.open_table().npartitions == 4
    assert postgres.password not in repr(source)

    s = impute_survey(url, str(tmp_path / "out"), "rid", dask_address=dask_address)
    out = pd.read_parquet(s["tables"][0]).sort_values("rid").reset_index(drop=True)
    ref = _local_reference(tmp_path, frame, dask_address, npartitions=4)
    expected = pd.read_parquet(ref["tables"][0]).sort_values("rid").reset_index(drop=True)
    np.testing.assert_allclose(out[COLUMNS].to_numpy(), expected[COLUMNS].to_numpy(), rtol=1e-8)
    # no watermark: the source has no version of its own, every run computes
    assert not impute_survey(url, str(tmp_path / "out"), "rid", dask_address=dask_address).get("up_to_date")
    marked = f"{url}&watermark=2026-12-01"
    impute_survey(marked, str(tmp_path / "out"), "rid", dask_address=dask_address)
    assert impute_survey(marked, str(tmp_path / "out"), "rid", dask_address=dask_address).get("up_to_date")


# -- bad input ---------------------------------------------------------------------------------


def test_bad_warehouse_urls_fail_fast_with_a_clear_message(s3_env, postgres, sqlite_catalog, monkeypatch, tmp_path):
    import time

    from pipelines.impute import check_inputs

    src = write_dataset(survey_frame(50), tmp_path / "src", npartitions=1)
    cases = [
        ("nosuch://x/y", str(tmp_path / "o"), "unknown URL scheme 'nosuch'"),
        ("s3://no-such-bucket/in", str(tmp_path / "o"), "s3://no-such-bucket/in"),
        (src, "s3://no-such-bucket/out", "bucket 'no-such-bucket' does not exist"),
        (f"iceberg://{sqlite_catalog.name}/nope.t", str(tmp_path / "o"), "has no table nope.t"),
        (src, f"iceberg://{sqlite_catalog.name}/nope.t", "has no namespace 'nope'"),
        (f"{postgres.url}?table=public.nope", str(tmp_path / "o"), "public.nope"),
        (f"{postgres.url}?query=SELEC 1", str(tmp_path / "o"), "syntax error"),
    ]
    for key, value in postgres.env.items():
        monkeypatch.setenv(key, value)
    for source, dest, message in cases:
        with pytest.raises(InputError, match=message) as info:
            check_inputs(source, dest, "rid")
        assert "\n" not in str(info.value)
    sqlite_catalog.load().create_namespace("ns")
    catalog = sqlite_catalog.load()
    import pyarrow as pa

    catalog.create_table(("ns", "noid"), schema=pa.schema([("a", pa.float64())])).append(
        pa.table({"a": [1.0, None]}))
    with pytest.raises(InputError, match="id column 'rid' is not in the table"):
        check_inputs(f"iceberg://{sqlite_catalog.name}/ns.noid", str(tmp_path / "o"), "rid")

    # wrong credentials: names the source, prints no secret
    monkeypatch.setenv("PGPASSWORD", "wrong-secret-123")
    with pytest.raises(InputError) as info:
        check_inputs(f"{postgres.url}?table=public.answers", str(tmp_path / "o"), "rid")
    assert postgres.url.split("@")[1].split("/")[0] in str(info.value)
    assert "wrong-secret-123" not in str(info.value) and postgres.password not in str(info.value)
    with pytest.raises(InputError) as info:
        check_inputs(f"postgresql://emdask:hunter2@127.0.0.1:{postgres.port}/warehouse?table=t",
                     str(tmp_path / "o"), "rid")
    assert "hunter2" not in str(info.value)

    # an unreachable endpoint: bounded time, names the URL
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(InputError, match="s3://survey/in"):
        check_inputs("s3://survey/in", str(tmp_path / "o"), "rid")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "o").exists()  # nothing written by any of them


def test_two_runs_committing_to_one_iceberg_table_never_overwrite_blindly(sqlite_catalog, tmp_path):
    import dask.dataframe as dd

    sqlite_catalog.load().create_namespace("ns")
    dest_a = open_destination(f"iceberg://{sqlite_catalog.name}/ns.t")
    dest_b = open_destination(f"iceberg://{sqlite_catalog.name}/ns.t")
    frame = pd.DataFrame({"id": np.arange(10), "v": np.arange(10.0)})

    def write(version, values):
        url = version.table_url("data", primary=True)
        dd.from_pandas(frame.assign(v=values), npartitions=2).to_parquet(url, write_index=False)

    with dest_a.new_version("a" * 64) as first:
        write(first, 1.0)
        first.commit({"run_key": "a" * 64})
    with pytest.raises(ConcurrentCommitError, match="another run committed"):
        with dest_a.new_version("b" * 64) as slow:
            write(slow, 2.0)
            with dest_b.new_version("c" * 64) as fast:  # commits while the first one runs
                write(fast, 3.0)
                fast.commit({"run_key": "c" * 64})
            slow.commit({"run_key": "b" * 64})
    table = sqlite_catalog.load().load_table(("ns", "t"))
    values = table.scan().to_arrow().to_pandas()["v"]
    assert (values == 3.0).all() and len(values) == 10  # the fast run's, whole
    assert dest_a.published().name == fast.name
    assert not any(slow.name in p for p in _files_under(table.location()))  # nothing left behind


def _files_under(location):
    from pipelines.sources import filesystem

    fs, path = filesystem(location)
    return fs.find(path)


# -- the command line, as a user runs it ---------------------------------------------------------


def _cli(args, env, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_impute_s3_to_s3_and_to_iceberg_then_nothing_to_do(api, dask_address, s3_env, tmp_path):
    """``emdask impute s3://survey/in/ s3://survey/out`` and ``... iceberg://default/survey.imputed``
    with the endpoint and the catalog given by environment variables alone."""
    from pyiceberg.catalog import load_catalog

    from servers import s3_catalog_props, sqlite_catalog_env

    s3 = s3_env
    frame = survey_frame(300)
    bucket = s3.make_bucket("survey")
    _upload_dataset(s3, frame, bucket, "in")
    catalog_env = sqlite_catalog_env("default", tmp_path, warehouse="s3://survey/wh",
                                     **s3_catalog_props(s3))
    env = {**os.environ, **s3.env, **catalog_env, "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DASK_SCHEDULER_ADDRESS": dask_address}
    work = tmp_path / "empty-cwd"
    work.mkdir()
    catalog = load_catalog("default", **{k.split("__")[-1].lower(): v for k, v in catalog_env.items()
                                         if k.split("__")[-1] in ("URI", "WAREHOUSE", "TYPE")},
                           **s3_catalog_props(s3))
    catalog.create_namespace("survey")

    for dest in ("s3://survey/out", "iceberg://default/survey.imputed"):
        first = _cli(["impute", "s3://survey/in/", dest, "--id", "rid"], env, work)
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"impute-survey: published {dest if dest.startswith('iceberg') else dest + '/versions/'}" in first.stdout
        second = _cli(["impute", "s3://survey/in/", dest, "--id", "rid"], env, work)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "already published" in second.stdout and "nothing to do" in second.stdout
        assert "testing" not in first.stdout + first.stderr  # the secret key is never printed
    assert list(work.iterdir()) == []  # nothing written to the working directory

    table = catalog.load_table(("survey", "imputed"))
    got = table.scan().to_pandas().sort_values("rid").reset_index(drop=True)
    folder = open_destination("s3://survey/out", s3.storage_options()).published()
    on_s3 = _read_s3_parquet(s3, f"{folder.url}/data").sort_values("rid").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[on_s3.columns], on_s3, check_dtype=False)
    assert len([s for s in table.snapshots()]) == 1  # the second run committed nothing

    bad = _cli(["impute", "s3://survey/in/", "iceberg://default/nope.t", "--id", "rid"], env, work)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "has no namespace 'nope'" in bad.stderr


def test_segment_an_image_on_s3_into_an_s3_folder(api, dask_address, s3_env, tmp_path):
    import io

    from PIL import Image

    from pipeline_data import image_array
    from pipelines.image import segment_image

    bucket = s3_env.make_bucket("images")
    buffer = io.BytesIO()
    Image.fromarray(image_array(64, 48)).save(buffer, format="PNG")
    s3_env.client().put_object(Bucket=bucket, Key="in/picture.png", Body=buffer.getvalue())
    local = tmp_path / "picture.png"
    local.write_bytes(buffer.getvalue())

    s = segment_image(f"s3://{bucket}/in/picture.png", f"s3://{bucket}/out", n_components=3,
                      dask_address=dask_address)
    ref = segment_image(str(local), str(tmp_path / "out"), n_components=3, dask_address=dask_address)
    labels = np.load(io.BytesIO(s3_env.client().get_object(
        Bucket=bucket, Key=f"out/versions/{s['version']}/labels.npy")["Body"].read()))
    np.testing.assert_array_equal(labels, np.load(ref["labels"]))
    assert segment_image(f"s3://{bucket}/in/picture.png", f"s3://{bucket}/out", n_components=3,
                         dask_address=dask_address).get("up_to_date")


def test_an_iceberg_catalog_on_postgresql_takes_the_same_commits(api, dask_address, postgres_catalog, tmp_path):
    frame = survey_frame(300)
    src = write_dataset(frame, tmp_path / "src", npartitions=2)
    catalog = postgres_catalog.load()
    catalog.create_namespace("survey")
    dest = f"iceberg://{postgres_catalog.name}/survey.imputed"
    first = impute_survey(src, dest, "rid", dask_address=dask_address)
    assert impute_survey(src, dest, "rid", dask_address=dask_address).get("up_to_date")
    second = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address)
    table = catalog.load_table(("survey", "imputed"))
    versions = [s.summary.additional_properties.get("emdask.version") for s in table.snapshots()]
    assert first["version"] in versions and versions[-1] == second["version"]
    got = table.scan().to_pandas()
    assert sorted(got["rid"]) == sorted(frame["rid"]) and not got[COLUMNS].isna().any().any()


def test_a_checkpoint_kept_on_the_store_resumes_a_fit_on_another_machine(s3_env, tmp_path, monkeypatch):
    """The flow's disk is gone (a rescheduled pod): the copy on the store carries the fit on."""
    import warnings

    import emdask

    bucket = s3_env.make_bucket("checkpoints")
    dest = open_destination(f"s3://{bucket}/out")
    X = survey_frame(400)[COLUMNS].fillna(0.0).to_numpy()
    monkeypatch.setenv("EMDASK_CHECKPOINT_DIR", str(tmp_path / "machine-1"))
    path, keep_a_copy = dest.checkpoint("k" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emdask.GaussianMixture(2, max_iter=3, tol=0, random_state=0).fit(
            X, checkpoint=path, callbacks=[keep_a_copy])
    assert str(tmp_path / "machine-1") in str(path)

    monkeypatch.setenv("EMDASK_CHECKPOINT_DIR", str(tmp_path / "machine-2"))
    moved, _ = dest.checkpoint("k" * 64)
    assert str(tmp_path / "machine-2") in str(moved) and (moved / "model.json").exists()
    assert emdask.load(moved).n_iter_ >= 2  # one iteration behind at most
    dest.drop_checkpoint("k" * 64)
    assert not s3_env.client().list_objects_v2(Bucket=bucket).get("Contents")


def test_a_table_keeps_the_sidecars_of_its_newest_versions_and_sweeps_what_killed_runs_left(tmp_path):
    import os

    import dask.dataframe as dd
    from deltalake import DeltaTable

    import pipelines.versions as versions

    dest = open_destination(f"delta+{tmp_path / 'table'}")
    frame = pd.DataFrame({"id": np.arange(6), "v": np.arange(6.0)})

    def publish(key, value):
        with dest.new_version(key, keep_versions=2) as version:
            dd.from_pandas(frame.assign(v=value), npartitions=2).to_parquet(
                version.table_url("data", primary=True), write_index=False)
            (version.local / "note.txt").write_text(key)
            return version.commit({"run_key": key})

    a = publish("a" * 64, 1.0)
    killed = "20200101T000000000000Z-deadbeef"  # a run killed before its commit, long ago
    for leftover in (tmp_path / "table" / f"emdask-{killed}", tmp_path / "table" / "_emdask" / "versions" / killed):
        leftover.mkdir(parents=True)
        (leftover / "part.0.parquet").write_bytes(b"half")
        os.utime(leftover / "part.0.parquet", (0, 0))
    young = tmp_path / "table" / f"emdask-{versions.version_name('f' * 64)}"
    young.mkdir()  # a run still writing
    b = publish("b" * 64, 2.0)
    sidecars = sorted(p.name for p in (tmp_path / "table" / "_emdask" / "versions").iterdir())
    assert sidecars == [a.name, b.name]  # the leftover is not counted as a version
    assert not (tmp_path / "table" / f"emdask-{killed}").exists() and young.exists()
    c = publish("c" * 64, 3.0)
    sidecars = sorted(p.name for p in (tmp_path / "table" / "_emdask" / "versions").iterdir())
    assert sidecars == [b.name, c.name]
    assert len(DeltaTable(str(tmp_path / "table"), version=0).to_pandas()) == 6  # time travel intact
    assert (DeltaTable(str(tmp_path / "table")).to_pandas()["v"] == 3.0).all()


def test_the_command_refuses_bad_warehouse_input_in_one_line_with_status_2(
        s3_env, postgres, sqlite_catalog, monkeypatch, tmp_path, capsys):
    from pipelines.cli import main

    src = write_dataset(survey_frame(40), tmp_path / "src", npartitions=1)
    for key, value in postgres.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    cases = [
        (["impute", "gopher://x/y", str(tmp_path / "o"), "--id", "rid"], "unknown URL scheme"),
        (["impute", src, "s3://no-such-bucket/out", "--id", "rid"], "does not exist"),
        (["segment", f"iceberg://{sqlite_catalog.name}/ns.none", str(tmp_path / "o"), "--id", "rid"],
         "has no table"),
        (["impute", f"{postgres.url}?table=public.t", str(tmp_path / "o"), "--id", "rid"],
         "cannot read source postgresql://"),
        (["impute", src, f"{postgres.url}?table=public.t", "--id", "rid"], "PostgreSQL is a source only"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert "not-the-password" not in err
    assert not (tmp_path / "o").exists()
