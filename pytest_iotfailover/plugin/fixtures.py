"""The plugin's fixtures. The hub, the SDK and the backends are imported inside the fixtures that
need them, so that loading the plugin costs a pytest run that never opens a hub next to nothing."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ..redaction import redact
from .keys import VIEW, WATCHDOG, record_of, settings_of


@pytest.fixture(scope="session")
def iothub_settings(pytestconfig: pytest.Config) -> Any:
    """The resolved pytest-iotfailover Settings (command line > environment > ini > default)."""
    return settings_of(pytestconfig)


def _progress(config: pytest.Config) -> Any:
    def say(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[iothub] {line}")
        elif sys.__stderr__ is not None:  # a pytest-xdist worker has no terminal of its own
            sys.__stderr__.write(f"[iothub] {line}\n")
    return say


@pytest.fixture(scope="session")
def _iothub_backend(pytestconfig: pytest.Config) -> Iterator[Any]:
    from ..backends import RealHubUnavailable, open_backend
    settings = settings_of(pytestconfig)
    try:
        backend = open_backend(settings, state_store=getattr(pytestconfig, "cache", None),
                               progress=_progress(pytestconfig))
    except RealHubUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    except Exception as exc:
        pytest.fail(f"could not open the IoT hub: {redact(f'{type(exc).__name__}: {exc}')}", pytrace=False)
    try:
        yield backend
    finally:
        watchdog = pytestconfig.stash.get(WATCHDOG, None)
        if watchdog is not None:
            # the end of the session, not part of the last test: a real failback takes minutes
            watchdog.disarm()
        try:
            backend.finish(failback=settings.failback)
        finally:
            backend.close()


@pytest.fixture
def iothub(request: pytest.FixtureRequest, _iothub_backend: Any) -> Iterator[Any]:
    """The session's hub, narrowed to this test's devices (removed afterwards)."""
    from ..testing.view import HubView
    from .reporting import begin
    s = settings_of(request.config)
    # request.getfixturevalue("iothub") is not in the test's fixture names: no record yet
    record = record_of(request.node) or begin(request.node)
    # the view carries the test's record, so the assertions report through it (no module global)
    view = HubView(_iothub_backend, request.node.name,
                   {"keep_alive": s.keep_alive, "connection_retry_interval": s.retry_interval},
                   recorder=record)
    request.node.stash[VIEW] = view
    yield view
    view.end_faults()
    view.close()


@pytest.fixture
def iothub_device(iothub: Any) -> Any:
    """A fresh device identity: `.device_id`, `.connection_string`."""
    return iothub.add_device()


@pytest.fixture
def device_client(iothub: Any, iothub_device: Any) -> Iterator[Any]:
    """A connected azure.iot.device.IoTHubDeviceClient for `iothub_device`."""
    from .factory import CONNECT_TIMEOUT, make_client, run_bounded, shutdown_quietly
    client = make_client(iothub, iothub_device)
    iothub.register_client(iothub_device.device_id, client)
    try:
        run_bounded(client.connect, CONNECT_TIMEOUT, "device_client connect")
        yield client
    finally:
        shutdown_quietly(client, "device_client")


@pytest.fixture
def device_client_factory(iothub: Any) -> Iterator[Any]:
    """`device_client_factory(count=1, pooled=False, **sdk_kwargs)`."""
    from .factory import DeviceClientFactory
    factory = DeviceClientFactory(iothub)
    yield factory
    factory.close()


@pytest.fixture
def failover(request: pytest.FixtureRequest, iothub: Any) -> Iterator[Any]:
    """Fault trigger: `failover()`, `.outage(s)`, `.drop()`, `.blackhole(s)`, `.refuse(code, s)`, ..."""
    from ..testing.failover import Failover
    marker = request.node.get_closest_marker("failover")
    outage = marker.kwargs.get("outage") if marker else None
    record = iothub.recorder
    trigger = Failover(iothub, outage if outage is not None else settings_of(request.config).outage, record)
    yield trigger
    trigger.end_all()
    if record is not None:
        record.faults = trigger.reports()


def _async_device_client_fixture() -> Any:
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - depends on the environment
        @pytest.fixture(name="async_device_client")
        def needs_pytest_asyncio() -> None:
            """Needs pytest-asyncio: pip install pytest-asyncio."""
            pytest.fail("async_device_client needs pytest-asyncio (pip install pytest-asyncio)", pytrace=False)
        return needs_pytest_asyncio

    @pytest_asyncio.fixture
    async def async_device_client(iothub: Any, iothub_device: Any) -> Any:
        """A connected azure.iot.device.aio.IoTHubDeviceClient for `iothub_device`."""
        import asyncio

        from .factory import CONNECT_TIMEOUT, make_client
        client = make_client(iothub, iothub_device, aio=True)
        iothub.register_client(iothub_device.device_id, client)
        try:
            await asyncio.wait_for(client.connect(), CONNECT_TIMEOUT)
            yield client
        finally:
            try:
                await asyncio.wait_for(client.shutdown(), 10)
            except Exception:
                pass
    return async_device_client


async_device_client = _async_device_client_fixture()
