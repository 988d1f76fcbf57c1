"""A cluster that requires encryption: mutual TLS on loopback, with generated certificates.

The scheduler and workers are started with ``--protocol tls`` and certificates signed by a
CA made for the test; clients must present a certificate from the same CA. A fit goes
through it; plain TCP, a client without certificates and a client with a certificate from
another CA are all turned away.
"""

import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pytest
from distributed.security import Security

from cluster_helpers import ProcessCluster, make_certificates, mixture_table, write_parquet_parts
from emdask import ConvergenceWarning, GaussianMixture
from emdask.engine.cluster import SchedulerUnreachable, connect

COLUMNS = [f"x{j}" for j in range(4)]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certificates):
    with ProcessCluster(
        tmp_path_factory.mktemp("tls-cluster"), n_workers=2, memory_limit="1GiB", tls=certificates
    ) as c:
        yield c


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    frame = mixture_table(12_000, n_features=4, k=2, seed=5)
    return write_parquet_parts(frame, tmp_path_factory.mktemp("tls-table") / "t", 6)


def fit(X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(2, random_state=0, max_iter=5, tol=0).fit(X, columns=COLUMNS)


def test_fit_through_a_cluster_that_requires_tls(tls_cluster, certificates, table):
    address = tls_cluster.address
    assert address.startswith("tls://127.0.0.1:")
    with dask.config.set(scheduler="synchronous"):
        local = fit(dd.read_parquet(table))
    with connect(address, timeout=20, security=certificates.security()) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and all(a.startswith("tls://") for a in workers)
        model = fit(dd.read_parquet(table))
    np.testing.assert_allclose(model.means_, local.means_, rtol=1e-10)
    np.testing.assert_allclose(model.covariances_, local.covariances_, rtol=1e-10)
    assert {ip for ip, _ in tls_cluster.listening_addresses()} == {"127.0.0.1"}


def test_tls_credentials_from_the_dask_configuration(tls_cluster, certificates, table):
    """How a flow gets them: DASK_DISTRIBUTED__COMM__TLS__* environment variables."""
    config = {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": str(certificates.ca_file),
        "distributed.comm.tls.client.cert": str(certificates.cert_file),
        "distributed.comm.tls.client.key": str(certificates.key_file),
    }
    with dask.config.set(config), connect(tls_cluster.address, timeout=20) as client:
        assert client.submit(sum, [1, 2, 3]).result() == 6


def test_clients_without_the_cluster_certificates_are_refused(tls_cluster, tmp_path):
    address = tls_cluster.address
    # plain TCP to the TLS port
    with pytest.raises(SchedulerUnreachable, match=address.replace("tls://", "tcp://")):
        connect(address.replace("tls://", "tcp://"), timeout=3)
    # TLS without any certificate
    with pytest.raises(SchedulerUnreachable, match="certificates"):
        connect(address, timeout=3, security=Security())
    # a certificate that another CA signed: the scheduler requires the cluster's CA
    stranger = make_certificates(tmp_path / "stranger", name="stranger")
    with pytest.raises(SchedulerUnreachable, match=address):
        connect(address, timeout=3, security=stranger.security())


def test_local_cluster_with_temporary_certificates():
    security = Security.temporary()
    with connect(None, n_workers=1, threads_per_worker=1, memory_limit="1GiB",
                 security=security) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        X = mixture_table(3000, n_features=4, k=2, seed=2)[COLUMNS]
        model = fit(X)
    with dask.config.set(scheduler="synchronous"):
        local = fit(X)
    np.testing.assert_allclose(model.means_, local.means_, rtol=1e-10)
