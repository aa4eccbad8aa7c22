"""Fixtures several test modules share. Modules that need another kind of hub define their own."""
import pytest
import trustme

from pytest_iotfailover import FakeHub


@pytest.fixture
def hub():
    """A fresh embedded hub for one test."""
    with FakeHub("testhub") as h:
        yield h


@pytest.fixture
def device(hub):
    return hub.add_device("dev1")


@pytest.fixture(scope="session")
def ca():
    """A test CA for local HTTPS/AMQP stand-ins of Azure endpoints."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
