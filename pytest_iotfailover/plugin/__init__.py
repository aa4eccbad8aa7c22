"""pytest wiring for pytest-iotfailover: options, markers, fixtures and the summary. Logic lives in
config, backends, factory, failover, assertions and reporting."""
import json
import sys

import pytest

from . import reporting
from ..backends import HubView, RealHubUnavailable, open_backend
from .options import OPTIONS, SettingsError, resolve
from .factory import CONNECT_TIMEOUT, DeviceClientFactory, make_client, run_bounded, shutdown_quietly
from ..testing.failover import Failover
from ..redaction import (redact, redact_handlers, release_retired, remember_connection_string_keys, scrub_report,
                      scrub_warning)

_SETTINGS = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("iothub failover", "iothub failover (pytest-iotfailover)")
    for opt in OPTIONS:
        if opt.flag_only:
            group.addoption(opt.flag, dest=opt.name, default=None, action="store_true",
                            help=f"{opt.help} [env {opt.env}; ini {opt.name}]")
        else:
            group.addoption(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                            help=f"{opt.help} [env {opt.env}; ini {opt.name}]")
        parser.addini(opt.name, help=f"{opt.help} (also {opt.flag}, env {opt.env})", default=None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "failover(outage=None, timeout=None): a test that fails the hub over; outage is the "
        "default outage of failover() in seconds, timeout its pytest-timeout (default --iothub-timeout)")
    config.addinivalue_line(
        "markers", "real_hub: needs a real IoT Hub (--iothub-connection); skipped on the embedded hub")
    try:
        settings = resolve(config.getoption, config.getini)
    except SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_SETTINGS] = settings
    remember_connection_string_keys(settings)
    # the SDK builds its TLS contexts the deprecated way on every connect; that is not the user's to fix
    config.addinivalue_line("filterwarnings", "ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")
    config.pluginmanager.register(_Summary(), f"iotfailover-summary-{id(config)}")


def _settings(config):
    return config.stash[_SETTINGS]


def pytest_collection_modifyitems(config, items):
    settings = _settings(config)
    for item in items:
        marker = item.get_closest_marker("failover")
        if marker is None and "failover" not in getattr(item, "fixturenames", ()):
            continue
        if item.get_closest_marker("timeout") is not None:
            continue  # the test chose its own
        timeout = marker.kwargs.get("timeout") if marker else None
        if timeout is None:
            timeout = settings.failover_timeout(marker.kwargs.get("outage") if marker else None)
        item.add_marker(pytest.mark.timeout(timeout))
    if settings.backend == "fake":
        skip = pytest.mark.skip(reason="needs a real IoT Hub: pass --iothub-connection")
        for item in items:
            if item.get_closest_marker("real_hub"):
                item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    reporting.begin(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    record = reporting.end()
    if record is not None:
        item.user_properties.extend(record.user_properties())


class _Summary:
    """One per pytest run (pytester runs nest): collects the figures tests left in user_properties,
    which also carries them over from pytest-xdist workers."""

    def __init__(self):
        self.rows = []
        self.outcomes = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            xfail = hasattr(report, "wasxfail")
            self.outcomes[report.nodeid] = ({"skipped": "xfailed", "passed": "xpassed"}.get(report.outcome)
                                            if xfail else report.outcome)
        if report.when == "teardown":
            for name, value in report.user_properties:
                if name == reporting.PROPERTY and json.loads(value).get("faults"):
                    self.rows.append((report.nodeid, self.outcomes.get(report.nodeid, "?"), json.loads(value)))

    def pytest_terminal_summary(self, terminalreporter):
        if self.rows:
            terminalreporter.write_sep("=", "iothub failover")
            for line in reporting.summary_lines(self.rows):
                terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    scrub_report(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    scrub_report(outcome.get_result())


@pytest.hookimpl(tryfirst=True)
def pytest_warning_recorded(warning_message, when, nodeid, location):
    # first, so the warnings summary and pytest-xdist's copy to the controller get the redacted text
    scrub_warning(warning_message)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    # live logs (--log-cli-level) and --log-file are written as records arrive, not from reports
    logging_plugin = session.config.pluginmanager.get_plugin("logging-plugin")
    if logging_plugin is not None:
        redact_handlers([getattr(logging_plugin, "log_cli_handler", None),
                         getattr(logging_plugin, "log_file_handler", None)])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    # the previous test is fully reported (teardown report, its warnings): its removed devices' keys
    # need no hiding any more, once what outlives the test is redacted
    _scrub_suite_properties(item.config)
    release_retired()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    _scrub_suite_properties(session.config)


def _scrub_suite_properties(config):
    # record_testsuite_property values go straight to junit XML at the end, past every report
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - a pytest without it has no such properties
        return
    xml = config.stash.get(xml_key, None)
    if xml is not None and getattr(xml, "global_properties", None):
        xml.global_properties = [(name, redact(str(value))) for name, value in xml.global_properties]


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def iothub_settings(pytestconfig):
    """The resolved pytest-iotfailover Settings (command line > environment > ini > default)."""
    return _settings(pytestconfig)


def _progress(config):
    def say(line):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[iothub] {line}")
        else:  # a pytest-xdist worker has no terminal of its own
            sys.__stderr__.write(f"[iothub] {line}\n")
    return say


@pytest.fixture(scope="session")
def _iothub_backend(pytestconfig):
    settings = _settings(pytestconfig)
    try:
        backend = open_backend(settings, state_store=getattr(pytestconfig, "cache", None),
                               progress=_progress(pytestconfig))
    except RealHubUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    except Exception as exc:  # the real hub could not be reached or set up; say why, without secrets
        pytest.fail(f"could not open the IoT hub: {redact(f'{type(exc).__name__}: {exc}')}", pytrace=False)
    try:
        yield backend
    finally:
        try:
            backend.finish(failback=settings.failback)
        finally:
            backend.close()


@pytest.fixture
def iothub(request, _iothub_backend):
    """The session's hub, narrowed to this test's devices (removed afterwards)."""
    s = _settings(request.config)
    view = HubView(_iothub_backend, request.node.name,
                   {"keep_alive": s.keep_alive, "connection_retry_interval": s.retry_interval})
    yield view
    view.close()


@pytest.fixture
def iothub_device(iothub):
    """A fresh device identity: `.device_id`, `.connection_string`."""
    return iothub.add_device()


@pytest.fixture
def device_client(iothub, iothub_device):
    """A connected azure.iot.device.IoTHubDeviceClient for `iothub_device`."""
    client = make_client(iothub, iothub_device)
    iothub.register_client(iothub_device.device_id, client)
    try:
        run_bounded(client.connect, CONNECT_TIMEOUT, "device_client connect")
        yield client
    finally:
        shutdown_quietly(client, "device_client")


@pytest.fixture
def device_client_factory(iothub):
    """`device_client_factory(count=1, pooled=False, **sdk_kwargs)`."""
    factory = DeviceClientFactory(iothub)
    yield factory
    factory.close()


@pytest.fixture
def failover(request, iothub):
    """Fault trigger: `failover()`, `.outage(s)`, `.drop()`, `.blackhole(s)`, `.refuse(code, s)`, ..."""
    marker = request.node.get_closest_marker("failover")
    outage = marker.kwargs.get("outage") if marker else None
    record = reporting.current()
    trigger = Failover(iothub, outage if outage is not None else _settings(request.config).outage, record)
    yield trigger
    trigger.end_all()
    if record is not None:
        record.faults = trigger.reports()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - depends on the environment
    @pytest.fixture
    def async_device_client():
        """Needs pytest-asyncio: pip install pytest-asyncio."""
        pytest.fail("async_device_client needs pytest-asyncio (pip install pytest-asyncio)", pytrace=False)
else:
    @pytest_asyncio.fixture
    async def async_device_client(iothub, iothub_device):
        """A connected azure.iot.device.aio.IoTHubDeviceClient for `iothub_device`."""
        import asyncio
        client = make_client(iothub, iothub_device, aio=True)
        iothub.register_client(iothub_device.device_id, client)
        try:
            await asyncio.wait_for(client.connect(), CONNECT_TIMEOUT)
            yield client
        finally:
            try:
                await asyncio.wait_for(client.shutdown(), 10)
            except Exception:
                pass  # already dropped by the hub; closed either way
