"""Fixtures several test modules share. Modules that need another kind of hub define their own."""
import os

import pytest
import trustme
from azure.iot.device import exceptions
from sdk_support import bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.fakehub.hub import LOOP_ENV

# The test extra installs uvloop, which `auto` would pick for every hub. Most users run plain
# asyncio (the examples extra has no uvloop), so the suite's hubs do too unless the environment
# says otherwise; the uvloop cases ask for it by name, and tests/test_examples.py runs the
# examples on `auto`.
os.environ.setdefault(LOOP_ENV, "asyncio")


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


@pytest.fixture
def client(hub, device):
    """A connected SDK client for `device`, shut down afterwards (modules may define their own)."""
    c = make_client(hub, device)
    bounded(c.connect)
    yield c
    try:
        bounded(c.shutdown)
    except exceptions.ClientError:
        pass  # a client the hub refused for good may complain on shutdown
