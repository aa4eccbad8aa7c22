"""pytest wiring for pytest-iotfailover: options, markers, fixtures and the summary. Logic lives in
config, backends, factory, failover, assertions and reporting."""
import json
import sys

import pytest

from . import reporting
from ..backends import HubView, RealHubUnavailable, open_backend
from .options import OPTIONS, SettingsError, resolve
from .factory import CONNECT_TIMEOUT, DeviceClientFactory, make_client, run_bounded, shutdown_quietly
from ..testing.failover import Failover, check_marker
from ..redaction import (redact, redact_handlers, release_retired, remember_connection_string_keys, scrub_report,
                         scrub_warning)
from .watchdog import Watchdog, _exit_process

_SETTINGS = pytest.StashKey()
_LIMIT = pytest.StashKey()      # (seconds, covered by pytest-timeout) of a test that uses the hub
_VIEW = pytest.StashKey()       # the test's HubView, to end its faults first thing at teardown
_WATCHDOG = pytest.StashKey()


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
        "default outage of failover() in seconds, timeout its limit (default --iothub-timeout)")
    if not config.pluginmanager.has_plugin("timeout"):
        # -p no:timeout: the watchdog still reads @pytest.mark.timeout, and --strict-markers must
        # not reject suites written for pytest-timeout
        config.addinivalue_line(
            "markers", "timeout(seconds): limit of a test that uses the IoT hub (pytest-timeout is disabled)")
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
    if not (config.getoption("usepdb", False) or config.getoption("trace", False)):
        config.stash[_WATCHDOG] = Watchdog(last_resort=_last_resort(config))


def pytest_unconfigure(config):
    watchdog = config.stash.get(_WATCHDOG, None)
    if watchdog is not None:
        watchdog.close()


def _last_resort(config):
    def finish(message):
        capman = config.pluginmanager.getplugin("capturemanager")
        try:
            if capman is not None:
                capman.suspend_global_capture(in_=True)  # else the message goes to a capture file
        finally:
            _exit_process(redact(message))  # source lines in the stacks may hold a connection string
    return finish


def _settings(config):
    return config.stash[_SETTINGS]


@pytest.hookimpl(hookwrapper=True)
def pytest_pycollect_makeitem(collector, name, obj):
    # a mistyped failover marker is a collection error of the test that carries it, not a
    # surprise when failover() runs (or never)
    outcome = yield
    result = outcome.get_result()
    items = result if isinstance(result, list) else [result]
    for item in items:
        if isinstance(item, pytest.Item):
            for marker in item.iter_markers("failover"):
                problem = check_marker(marker)
                if problem:
                    raise collector.CollectError(f"{item.nodeid}: {problem}")


def _pytest_timeout_default(config):
    """pytest-timeout's own setting (--timeout, PYTEST_TIMEOUT, ini timeout), None if unset
    or if pytest-timeout is not loaded."""
    plugin = config.pluginmanager.get_plugin("timeout")
    if plugin is None:
        return None
    try:
        return plugin.get_env_settings(config).timeout
    except Exception:  # an older or newer pytest-timeout; it validates its settings itself
        return None


def _marker_timeout(marker):
    """A timeout marker's seconds; None for none (0, negative, or not a number: pytest-timeout
    reports its own marker's mistakes)."""
    value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 and seconds != float("inf") else None


def _uses_hub(item) -> bool:
    names = getattr(item, "fixturenames", ())
    return item.get_closest_marker("failover") is not None or "iothub" in names or "_iothub_backend" in names


def pytest_collection_modifyitems(config, items):
    settings = _settings(config)
    has_pytest_timeout = config.pluginmanager.has_plugin("timeout")
    global_timeout = _pytest_timeout_default(config)
    for item in items:
        if not _uses_hub(item):
            continue
        marker = item.get_closest_marker("failover")
        default = settings.failover_timeout(marker.kwargs.get("outage") if marker else None)
        own = item.get_closest_marker("timeout")
        # precedence: failover(timeout=) > @pytest.mark.timeout > --iothub-timeout > pytest-timeout's
        # --timeout / ini timeout > the plugin's default; a 0 turns pytest-timeout off for the test,
        # never the watchdog
        add = None
        if marker is not None and marker.kwargs.get("timeout") is not None:
            limit = add = float(marker.kwargs["timeout"])
        elif own is not None:
            limit = _marker_timeout(own) or default
        elif settings.timeout is not None:
            limit = add = settings.timeout
        elif global_timeout is not None:
            limit = global_timeout if global_timeout > 0 else default
        else:
            limit = add = default
        effective = add if add is not None else (_marker_timeout(own) if own is not None else global_timeout)
        covered = has_pytest_timeout and bool(effective)
        if add is not None and has_pytest_timeout:
            item.add_marker(pytest.mark.timeout(add), append=False)
        item.stash[_LIMIT] = (limit, bool(covered))
    if settings.backend == "fake":
        skip = pytest.mark.skip(reason="needs a real IoT Hub: pass --iothub-connection")
        for item in items:
            if item.get_closest_marker("real_hub"):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # the previous test is fully reported (teardown report, its warnings): its removed devices' keys
    # need no hiding any more, once what outlives the test is redacted
    _scrub_suite_properties(item.config)
    release_retired()
    watchdog = item.config.stash.get(_WATCHDOG, None)
    limit = item.stash.get(_LIMIT, None)
    if watchdog is None or limit is None:
        yield
        return
    watchdog.arm(item.nodeid, limit[0], limit[1])
    try:
        yield
    finally:
        watchdog.disarm()


def pytest_exception_interact(node, call, report):
    watchdog = node.config.stash.get(_WATCHDOG, None)
    if watchdog is not None and isinstance(node, pytest.Item):
        watchdog.failed()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    watchdog = item.config.stash.get(_WATCHDOG, None)
    if watchdog is not None:
        watchdog.phase("call")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    reporting.begin(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    watchdog = item.config.stash.get(_WATCHDOG, None)
    if watchdog is not None:
        watchdog.phase("teardown")
    view = item.stash.get(_VIEW, None)
    record = reporting.current()
    if view is not None:
        # before any fixture's finalizer: a client shut down into a still-silent hub would block,
        # and the next test must start on a healthy hub whichever API started the fault
        ended = view.end_faults()
        if record is not None:
            known = {id(getattr(h, "_fault", h)) for h in record.handles}
            record.handles.extend(h for h in ended if id(getattr(h, "_fault", h)) not in known)
    yield
    record = reporting.end()
    if record is not None and record.handles and len(record.faults) < len(record.handles):
        record.faults = Failover.reports_of(record.handles)
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
        watchdog = pytestconfig.stash.get(_WATCHDOG, None)
        if watchdog is not None:
            # the end of the session, not part of the last test: a real failback takes minutes
            watchdog.disarm()
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
    request.node.stash[_VIEW] = view
    yield view
    view.end_faults()
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
