"""The real test servers of `servers`: moto S3, PostgreSQL, and pyiceberg SQL catalogs on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import botocore.exceptions
import psycopg
import pyarrow as pa
import pytest

from servers import (
    LOOPBACK,
    iceberg_catalog_env,
    postgres_bin_dir,
    postgres_server,
    pyiceberg_env_name,
    s3_server,
    use_s3_env,
)
from warehouse_fixtures import *  # noqa: F403

pytestmark = pytest.mark.timeout(120)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_python(code, env, timeout=60):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _status_code(error):
    return error.response["ResponseMetadata"]["HTTPStatusCode"]


# --------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------


def test_s3_server_env_and_storage_options(s3):
    import s3fs

    assert s3.endpoint_url == f"http://{LOOPBACK}:{s3.port}"
    assert s3.env == {
        "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    bucket = s3.make_bucket("env-and-options")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    fs.pipe_file(f"{bucket}/a/b.txt", b"hello")
    assert fs.cat_file(f"{bucket}/a/b.txt") == b"hello"

    # A child process finds the server through the standard AWS variables alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env)
    out = _run_python("""
        import boto3
        print(boto3.client("s3").get_object(Bucket="env-and-options", Key="a/b.txt")
              ["Body"].read().decode())
    """, env)
    assert out.strip() == "hello"


def test_use_s3_env_restores(s3, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with use_s3_env(s3):
        assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint_url
        assert os.environ["AWS_REGION"] == "us-east-1"
    assert "AWS_ENDPOINT_URL" not in os.environ
    assert os.environ["AWS_REGION"] == "eu-west-3"


def test_s3_conditional_put_boto3(s3):
    client = s3.client()
    bucket = s3.make_bucket("cas-boto3")
    first = client.put_object(Bucket=bucket, Key="ptr", Body=b"1", IfNoneMatch="*")["ETag"]

    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.put_object(Bucket=bucket, Key="ptr", Body=b"x", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert _status_code(err.value) == 412

    second = client.put_object(Bucket=bucket, Key="ptr", Body=b"2", IfMatch=first)["ETag"]
    assert second != first
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.put_object(Bucket=bucket, Key="ptr", Body=b"3", IfMatch=first)
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert _status_code(err.value) == 412
    assert client.get_object(Bucket=bucket, Key="ptr")["Body"].read() == b"2"

    # If-Match on a missing key is NoSuchKey (404), as on AWS.
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.put_object(Bucket=bucket, Key="absent", Body=b"3", IfMatch=first)
    assert _status_code(err.value) == 404


def test_s3_conditional_put_s3fs(s3):
    import s3fs
    from fsspec.asyn import sync

    bucket = s3.make_bucket("cas-s3fs")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())

    def put(body, **conditions):
        return sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key="ptr", Body=body,
                    **conditions)

    first = put(b"1", IfNoneMatch="*")["ETag"]
    # s3fs maps If-None-Match failures to FileExistsError, other 412s to OSError(EINVAL).
    with pytest.raises(FileExistsError) as err:
        put(b"x", IfNoneMatch="*")
    assert _status_code(err.value.__cause__) == 412
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/ptr", b"x", mode="create")

    assert put(b"2", IfMatch=first)["ETag"] != first
    with pytest.raises(OSError) as err:
        put(b"3", IfMatch=first)
    assert err.value.__cause__.response["Error"]["Code"] == "PreconditionFailed"
    assert _status_code(err.value.__cause__) == 412
    assert fs.cat_file(f"{bucket}/ptr") == b"2"


def test_s3_server_reset_and_cleanup_on_error():
    with pytest.raises(RuntimeError, match="body failed"):
        with s3_server() as server:
            pgid = server.process.pid
            server.make_bucket("to-be-reset")
            assert [b["Name"] for b in server.client().list_buckets()["Buckets"]] == [
                "to-be-reset"]
            server.reset()
            assert server.client().list_buckets()["Buckets"] == []
            raise RuntimeError("body failed")
    assert server.process.returncode is not None
    assert not _group_alive(pgid)


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


def test_postgres_password_authentication(postgres, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    assert postgres.url == f"postgresql://emdask@{LOOPBACK}:{postgres.port}/warehouse"
    assert postgres.password not in postgres.url
    assert postgres.env == {"PGPASSWORD": postgres.password, "PGCONNECT_TIMEOUT": "5"}

    with psycopg.connect(postgres.url_with_password) as conn:
        row = conn.execute("SELECT current_user, current_database(), host(inet_server_addr()),"
                           " current_setting('password_encryption')").fetchone()
    assert row == ("emdask", "warehouse", LOOPBACK, "scram-sha-256")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.url, password="wrong", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.url, connect_timeout=5)


def test_postgres_adbc_reads_with_pgpassword(postgres, monkeypatch):
    import adbc_driver_postgresql.dbapi

    postgres.execute("CREATE TABLE adbc_points (id integer PRIMARY KEY, x double precision)")
    postgres.execute("INSERT INTO adbc_points VALUES (%s, %s), (%s, %s)", (1, 0.5, 2, -1.5))
    assert postgres.execute("SELECT count(*) FROM adbc_points") == [(2,)]

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    with pytest.raises(Exception):
        adbc_driver_postgresql.dbapi.connect(postgres.url).close()

    for key, value in postgres.env.items():
        monkeypatch.setenv(key, value)
    with adbc_driver_postgresql.dbapi.connect(postgres.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, x FROM adbc_points ORDER BY id")
        table = cur.fetch_arrow_table()
    assert table.column("id").to_pylist() == [1, 2]
    assert table.column("x").to_pylist() == [0.5, -1.5]


def _path_bin_dir():
    import shutil

    pg_ctl = shutil.which("pg_ctl")
    return None if pg_ctl is None else Path(pg_ctl).resolve().parent


@pytest.mark.parametrize("binaries", ["default", "path"])
def test_postgres_server_runs_unprivileged_and_stops_on_error(tmp_path, binaries):
    bin_dir = postgres_bin_dir() if binaries == "default" else _path_bin_dir()
    if bin_dir is None:
        pytest.skip("no pg_ctl on PATH")
    with pytest.raises(RuntimeError, match="body failed"):
        with postgres_server(tmp_path, bin_dir=bin_dir) as pg:
            pgid = pg.process.pid
            assert pg.bin_dir == bin_dir
            uid = int(Path(f"/proc/{pg.process.pid}/status").read_text()
                      .split("\nUid:")[1].split()[1])
            assert uid != 0
            assert pg.execute("SELECT 1") == [(1,)]
            raise RuntimeError("body failed")
    assert pg.process.returncode is not None
    assert not _group_alive(pgid)


def test_postgres_start_failure_reports_log_tail(tmp_path, monkeypatch):
    import servers

    monkeypatch.setattr(servers, "_PG_CONFIG", servers._PG_CONFIG + "shared_buffers = lots\n")
    with pytest.raises(RuntimeError, match="shared_buffers") as err:
        with postgres_server(tmp_path, timeout=30):
            pass
    assert "exited with code" in str(err.value)


# --------------------------------------------------------------------------------------
# pyiceberg catalogs
# --------------------------------------------------------------------------------------


def test_pyiceberg_env_names_match_pyiceberg_parsing(monkeypatch):
    from pyiceberg.utils.config import Config

    env = iceberg_catalog_env("my-cat", "sqlite:///x.db", "file:///wh", **{
        "s3.endpoint": "http://127.0.0.1:1", "s3.access-key-id": "k",
        "s3.secret-access-key": "s", "s3.region": "us-east-1"})
    assert env["PYICEBERG_CATALOG__MY_CAT__S3__ACCESS_KEY_ID"] == "k"
    assert env["PYICEBERG_CATALOG__MY_CAT__TYPE"] == "sql"
    for key in [k for k in os.environ if k.upper().startswith("PYICEBERG_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Config().get_catalog_config("my-cat") == {
        "type": "sql", "uri": "sqlite:///x.db", "warehouse": "file:///wh",
        "s3.endpoint": "http://127.0.0.1:1", "s3.access-key-id": "k",
        "s3.secret-access-key": "s", "s3.region": "us-east-1"}

    with pytest.raises(ValueError):
        pyiceberg_env_name("my_cat", "uri")
    with pytest.raises(ValueError):
        pyiceberg_env_name("cat", "init_catalog_tables")


SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False), ("label", pa.string()),
                    ("score", pa.float64())])
ROWS = pa.table({"id": [1, 2, 3], "label": ["a", "b", None], "score": [0.5, 1.5, 2.5]},
                schema=SCHEMA)


def _roundtrip(catalog, identifier):
    namespace = identifier.split(".")[0]
    catalog.create_namespace(namespace)
    table = catalog.create_table(identifier, schema=SCHEMA)
    table.append(ROWS)
    table.append(ROWS.slice(0, 1))
    read = catalog.load_table(identifier).scan().to_arrow().sort_by("id")
    return table, read


@pytest.mark.parametrize("kind", ["sqlite_catalog", "postgres_catalog", "s3_catalog"])
def test_iceberg_catalog_from_environment(request, kind):
    from pyiceberg.catalog import load_catalog

    handle = request.getfixturevalue(kind)
    assert all(os.environ[k] == v for k, v in handle.env.items())
    catalog = load_catalog(handle.name)
    try:
        assert type(catalog).__name__ == "SqlCatalog"
        table, read = _roundtrip(catalog, "emdask.points")
        assert read.column("id").to_pylist() == [1, 1, 2, 3]
        assert read.column("label").to_pylist() == ["a", "a", "b", None]
        assert table.location().startswith(handle.warehouse)
        assert catalog.list_tables("emdask") == [("emdask", "points")]
    finally:
        engine = getattr(catalog, "engine", None)
        if engine is not None:
            engine.dispose()


def test_iceberg_s3_catalog_objects_and_child_process(s3_catalog, s3):
    catalog = s3_catalog.load()
    table, _ = _roundtrip(catalog, "emdask.points")
    bucket = s3_catalog.warehouse.removeprefix("s3://").split("/")[0]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("wh/emdask/points/metadata/") for k in keys)
    assert any(k.startswith("wh/emdask/points/data/") and k.endswith(".parquet")
               for k in keys)

    # A child process reads the table through the environment variables alone.
    out = _run_python(f"""
        import json
        from pyiceberg.catalog import load_catalog
        table = load_catalog({s3_catalog.name!r}).load_table("emdask.points")
        print(json.dumps(sorted(table.scan().to_arrow().column("id").to_pylist())))
    """, dict(os.environ))
    assert json.loads(out) == [1, 1, 2, 3]
