"""Fixtures of the pipeline tests: one Prefect test API and one Dask cluster for the session.

Flows run for real against Prefect's test harness (a local API server on loopback with a
temporary database) and a Dask cluster listening on 127.0.0.1 over TCP, so that processes
started by a test (the command line, a served deployment) reach both.
"""

from __future__ import annotations

import os
import sys

import pytest

# the servers of tests/servers.py (S3, PostgreSQL, Iceberg catalogs) serve these tests too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api():
    """The URL of a Prefect API started for the session (flows in this process use it)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def dask_address():
    """Address of a small Dask cluster on loopback (threads in this process, reached over TCP).

    Its worker does not sample its threads' stacks (Dask's statistical profiler): walking the
    frames of another thread of the same process as a call returns can crash CPython 3.11,
    and here that process is the test session's."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.profile.enabled": False}), LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
        host="127.0.0.1", dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture()
def api(prefect_api):
    """Use the session's Prefect API in a test."""
    return prefect_api


def pytest_collection_modifyitems(config, items):
    # Dask's Parquet writer calls a pandas method that pandas now deprecates; not ours to fix
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.filterwarnings(
                "ignore:The inplace keyword in DataFrame.reset_index:DeprecationWarning"))
