"""Pytest fixtures over the real servers of `servers`: S3 (moto), PostgreSQL, Iceberg catalogs.

Use with ``from warehouse_fixtures import *`` in a test module (or list the module in
``pytest_plugins``). The servers are session-scoped; each catalog fixture gives a test a
catalog of its own (own name, own warehouse) and sets its ``PYICEBERG_CATALOG__*``
variables for the duration of the test.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest

from servers import (
    apply_catalog_env,
    postgres_catalog_env,
    postgres_server,
    s3_catalog_props,
    s3_server,
    sqlite_catalog_env,
)

__all__ = ["CatalogHandle", "s3", "postgres", "sqlite_catalog", "postgres_catalog",
           "s3_catalog"]


@dataclass
class CatalogHandle:
    """A pyiceberg SQL catalog configured through environment variables.

    Attributes
    ----------
    name : str
        Catalog name for ``pyiceberg.catalog.load_catalog(name)``.
    env : dict of str
        Its ``PYICEBERG_CATALOG__<NAME>__*`` variables (plus, for an S3 warehouse, the
        AWS variables of the server), for child processes.
    warehouse : str
        Warehouse location.
    """

    name: str
    env: dict
    warehouse: str
    _catalogs: list = field(default_factory=list, repr=False)

    def load(self):
        """Return ``load_catalog(name)``; its database connections are closed at teardown."""
        from pyiceberg.catalog import load_catalog

        catalog = load_catalog(self.name)
        self._catalogs.append(catalog)
        return catalog

    def close(self):
        """Dispose the SQLAlchemy engines of the catalogs returned by `load`."""
        for catalog in self._catalogs:
            engine = getattr(catalog, "engine", None)
            if engine is not None:
                engine.dispose()
        self._catalogs.clear()


def _unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3():
    """Session-wide moto server; yields a `servers.S3Server`."""
    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """Session-wide PostgreSQL server; yields a `servers.PostgresServer`."""
    with postgres_server(tmp_path_factory.mktemp("pg")) as server:
        yield server


def _catalog(monkeypatch, name, env, warehouse, extra_env=None):
    apply_catalog_env(monkeypatch, env)
    for key, value in (extra_env or {}).items():
        monkeypatch.setenv(key, value)
    handle = CatalogHandle(name, {**env, **(extra_env or {})}, warehouse)
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def sqlite_catalog(tmp_path, monkeypatch):
    """SQL catalog in a SQLite file, warehouse ``file://`` under `tmp_path`.

    Yields
    ------
    CatalogHandle
    """
    name = _unique("sqlite")
    env = sqlite_catalog_env(name, tmp_path)
    warehouse = (tmp_path / "warehouse").resolve().as_uri()
    yield from _catalog(monkeypatch, name, env, warehouse)


@pytest.fixture
def postgres_catalog(postgres, tmp_path, monkeypatch):
    """SQL catalog in the session PostgreSQL database, warehouse ``file://`` under `tmp_path`.

    Yields
    ------
    CatalogHandle
    """
    name = _unique("pg")
    directory = tmp_path / "warehouse"
    directory.mkdir()
    warehouse = directory.resolve().as_uri()
    yield from _catalog(monkeypatch, name, postgres_catalog_env(name, postgres, warehouse),
                        warehouse)


@pytest.fixture
def s3_catalog(s3, tmp_path, monkeypatch):
    """SQL catalog in a SQLite file, warehouse ``s3://<new bucket>/wh`` on the moto server.

    The AWS variables of the server are set as well.

    Yields
    ------
    CatalogHandle
    """
    name = _unique("s3")
    bucket = s3.make_bucket(_unique("wh"))
    warehouse = f"s3://{bucket}/wh"
    env = sqlite_catalog_env(name, tmp_path, warehouse=warehouse, **s3_catalog_props(s3))
    yield from _catalog(monkeypatch, name, env, warehouse, extra_env=s3.env)
