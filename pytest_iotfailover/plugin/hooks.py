"""The plugin's hooks: options and markers, each test's time limit, its record of faults and
deliveries, and the scrubbing of secrets from whatever pytest reports.

Nothing here imports the hub, the SDK or the certificate tools: pytest loads this module for every
run where the plugin is installed, and most runs never open a hub (the fixtures import them). The
per-test record (reporting), the watchdog and the CI gate (gate, and through it the SLO, baseline
and timeline modules) are imported on first use too: with the first test that uses the hub, or with
a gate option or a marker's `slo=` (plugin/gating.py decides without importing the gate).
"""
from __future__ import annotations

from typing import Any

import pytest

from ..errors import FaultNotSupported, SettingsError
from ..redaction import redact, release_retired
from .gating import needed, wanted
from .keys import BASELINE, LIMIT, RECORD, SETTINGS, VIEW, WATCHDOG, settings_of
from .markers import check_marker, marker_timeout, register
from .options import OPTIONS, resolve
from .redact import (
    redact_handlers,
    remember_connection_string_keys,
    scrub_report,
    scrub_suite_properties,
    scrub_warning,
)
from .summary import Summary

# the watchdog is made when the first test that uses the hub starts; this key says whether it may
# be (not under --pdb or --trace, where a test stopped at a prompt is not stuck)
_WATCHDOG_ALLOWED: pytest.StashKey[bool] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("iothub failover", "iothub failover (pytest-iotfailover)")
    for opt in OPTIONS:
        if opt.flag_only:
            group.addoption(opt.flag, dest=opt.name, default=None, action="store_true",
                            help=f"{opt.help} [env {opt.env}; ini {opt.name}]")
        else:
            group.addoption(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                            help=f"{opt.help} [env {opt.env}; ini {opt.name}]")
        parser.addini(opt.name, help=f"{opt.help} (also {opt.flag}, env {opt.env})", default=None)


def pytest_configure(config: pytest.Config) -> None:
    register(config)
    try:
        settings = resolve(config.getoption, config.getini)
    except SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS] = settings
    remember_connection_string_keys(settings)
    # the SDK builds its TLS contexts the deprecated way on every connect; that is not the user's to fix
    config.addinivalue_line("filterwarnings", "ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")
    config.pluginmanager.register(Summary(), f"iotfailover-summary-{id(config)}")
    if wanted(settings):
        from . import gate
        config.stash[BASELINE] = gate.load_baseline(settings)
        config.pluginmanager.register(gate.Gate(config, settings), f"iotfailover-gate-{id(config)}")
    config.stash[_WATCHDOG_ALLOWED] = not (config.getoption("usepdb", False) or config.getoption("trace", False))


def _watchdog(config: pytest.Config) -> Any:
    """The run's watchdog, made on first use; None under --pdb or --trace."""
    watchdog = config.stash.get(WATCHDOG, None)
    if watchdog is None and config.stash.get(_WATCHDOG_ALLOWED, False):
        from .watchdog import Watchdog
        watchdog = config.stash[WATCHDOG] = Watchdog(last_resort=_last_resort(config))
    return watchdog


def pytest_unconfigure(config: pytest.Config) -> None:
    watchdog = config.stash.get(WATCHDOG, None)
    if watchdog is not None:
        watchdog.close()


def _last_resort(config: pytest.Config) -> Any:
    def finish(message: str) -> None:
        capman = config.pluginmanager.getplugin("capturemanager")
        try:
            if capman is not None:
                capman.suspend_global_capture(in_=True)  # else the message goes to a capture file
        finally:
            from .watchdog import _exit_process
            _exit_process(redact(message))  # source lines in the stacks may hold a connection string
    return finish


@pytest.hookimpl(hookwrapper=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> Any:
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


def _pytest_timeout_default(config: pytest.Config) -> float | None:
    """pytest-timeout's own setting (--timeout, PYTEST_TIMEOUT, ini timeout), None if unset
    or if pytest-timeout is not loaded."""
    plugin = config.pluginmanager.get_plugin("timeout")
    if plugin is None:
        return None
    try:
        return plugin.get_env_settings(config).timeout
    except Exception:
        return None


def _uses_hub(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return item.get_closest_marker("failover") is not None or "iothub" in names or "_iothub_backend" in names


def _limit(item: pytest.Item, settings: Any, global_timeout: float | None) -> tuple[float, float | None, float | None]:
    """(the test's limit, the timeout marker to add for pytest-timeout or None, what pytest-timeout
    enforces or None).

    Precedence: failover(timeout=) > @pytest.mark.timeout > --iothub-timeout > pytest-timeout's
    --timeout / ini timeout > the plugin's default; a 0 turns pytest-timeout off for the test,
    never the watchdog."""
    marker = item.get_closest_marker("failover")
    default = settings.failover_timeout(marker.kwargs.get("outage") if marker else None)
    own = item.get_closest_marker("timeout")
    add = None
    if marker is not None and marker.kwargs.get("timeout") is not None:
        limit = add = float(marker.kwargs["timeout"])
    elif own is not None:
        limit = marker_timeout(own) or default
    elif settings.timeout is not None:
        limit = add = settings.timeout
    elif global_timeout is not None:
        limit = global_timeout if global_timeout > 0 else default
    else:
        limit = add = default
    effective = add if add is not None else (marker_timeout(own) if own is not None else global_timeout)
    return limit, add, effective


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    settings = settings_of(config)
    has_pytest_timeout = config.pluginmanager.has_plugin("timeout")
    global_timeout = _pytest_timeout_default(config)
    for item in items:
        if not _uses_hub(item):
            continue
        limit, add, effective = _limit(item, settings, global_timeout)
        if add is not None and has_pytest_timeout:
            item.add_marker(pytest.mark.timeout(add), append=False)
        item.stash[LIMIT] = (limit, has_pytest_timeout and bool(effective))
    if settings.backend == "fake":
        skip = pytest.mark.skip(reason="needs a real IoT Hub: pass --iothub-connection")
        for item in items:
            if item.get_closest_marker("real_hub"):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    # the previous test is fully reported (teardown report, its warnings): its removed devices' keys
    # need no hiding any more, once what outlives the test is redacted
    scrub_suite_properties(item.config)
    release_retired()
    limit = item.stash.get(LIMIT, None)
    watchdog = _watchdog(item.config) if limit is not None else None
    if watchdog is None or limit is None:
        yield
        return
    watchdog.arm(item.nodeid, limit[0], limit[1])
    try:
        yield
    finally:
        watchdog.disarm()


def pytest_exception_interact(node: Any, call: Any, report: Any) -> None:
    watchdog = node.config.stash.get(WATCHDOG, None)
    if watchdog is not None and isinstance(node, pytest.Item):
        watchdog.failed()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    watchdog = item.config.stash.get(WATCHDOG, None)
    if watchdog is not None:
        watchdog.phase("call")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # a test that never touches the hub gets a record only when the gate wants its entry; the iothub
    # fixture makes one for a test that asks for the hub at run time
    if _uses_hub(item) or needed(item, settings_of(item.config)):
        from . import reporting
        reporting.begin(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    # a new-style wrapper: the gate's verdict is raised after the fixtures' teardown
    watchdog = item.config.stash.get(WATCHDOG, None)
    if watchdog is not None:
        watchdog.phase("teardown")
    view = item.stash.get(VIEW, None)
    record = item.stash.get(RECORD, None)
    if view is not None:
        # before any fixture's finalizer: a client shut down into a still-silent hub would block,
        # and the next test must start on a healthy hub whichever API started the fault
        ended = view.end_faults()
        if record is not None:
            known = {id(getattr(h, "_fault", h)) for h in record.handles}
            record.handles.extend(h for h in ended if id(getattr(h, "_fault", h)) not in known)
    settings = settings_of(item.config)
    lanes: list[Any] = []
    if view is not None and record is not None and needed(item, settings):
        from . import gate
        # before the fixtures' finalizers remove the test's devices from the view
        try:  # the embedded hub also tells what a failover lost; a real hub's view cannot
            telemetry = view.telemetry(include_lost=True)
        except TypeError:
            telemetry = view.telemetry()
        lanes = gate.device_lanes(view.device_ids, view.events, telemetry, record.started_at, [],
                                  outboxes=record.outbox_snapshots())
    try:
        result = yield
    except BaseException:
        _finish_record(item, lanes, settings, fail=False)  # the fixture's error is the one to show
        raise
    _finish_record(item, lanes, settings, fail=True)
    return result


def _finish_record(item: pytest.Item, lanes: list[Any], settings: Any, fail: bool) -> None:
    if RECORD not in item.stash:
        return  # the test never had one: no hub, no gate
    from . import reporting
    record = reporting.end(item)
    if record is None:
        return
    if record.handles and len(record.faults) < len(record.handles):
        from ..testing.failover import Failover
        record.faults = Failover.reports_of(record.handles)
    item.user_properties.extend(record.user_properties())
    if needed(item, settings):
        from . import gate
        gate.at_teardown(item, record, lanes, settings, item.config.stash.get(BASELINE, None), fail=fail)


def _fault_not_supported_as_skip(call: Any) -> None:
    """A fault this hub cannot produce skips the test (as pytest.skip would), rather than failing it:
    the suite runs on the embedded hub and on real ones, which cannot produce every fault."""
    excinfo = call.excinfo
    if excinfo is None or call.when == "teardown" or not isinstance(excinfo.value, FaultNotSupported):
        return
    reason = f"the hub cannot produce this fault: {excinfo.value}"
    try:
        skip = pytest.skip.Exception(reason, _use_item_location=True)  # point at the test, not here
    except TypeError:  # pragma: no cover - a pytest without item locations for skips
        skip = pytest.skip.Exception(reason)
    try:
        raise skip from excinfo.value
    except pytest.skip.Exception:
        call.excinfo = pytest.ExceptionInfo.from_current()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    _fault_not_supported_as_skip(call)  # before the report is made, so pdb and plugins see a skip too
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" and needed(item, settings_of(item.config)):
        from . import gate  # only a test with an entry has a timeline fragment
        gate.html_extra(item, report)
    scrub_report(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    scrub_report(outcome.get_result())


@pytest.hookimpl(tryfirst=True)
def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str, location: Any) -> None:
    # first, so the warnings summary and pytest-xdist's copy to the controller get the redacted text
    scrub_warning(warning_message)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # live logs (--log-cli-level) and --log-file are written as records arrive, not from reports
    logging_plugin = session.config.pluginmanager.get_plugin("logging-plugin")
    if logging_plugin is not None:
        redact_handlers([getattr(logging_plugin, "log_cli_handler", None),
                         getattr(logging_plugin, "log_file_handler", None)])


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    scrub_suite_properties(session.config)
