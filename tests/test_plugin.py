"""The pytest plugin, driven through pytester: options, fixtures, timeouts, failure text, summary."""

import re
import threading
import time

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(60)

SECRET = "SharedAccessKey=c2VjcmV0LXNlY3JldC1zZWNyZXQ="


@pytest.fixture
def run(pytester, monkeypatch):
    for var in ("IOTHUB_CONNECTION_STRING", "IOTFAILOVER_HUB_NAME", "IOTFAILOVER_KEEP_ALIVE",
                "IOTFAILOVER_RETRY_INTERVAL", "IOTFAILOVER_TIMEOUT", "IOTFAILOVER_OUTAGE"):
        monkeypatch.delenv(var, raising=False)

    def run(*args, **kwargs):
        # a subprocess: each run gets its own hub thread, SDK threads and pytest-timeout alarms
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, **kwargs)
    return run


def test_options_show_in_help(run):
    result = run("--help")
    out = result.stdout.str()
    assert "iothub failover" in out
    for flag in ("--iothub-connection", "--iothub-hub-name", "--iothub-keep-alive",
                 "--iothub-retry-interval", "--iothub-timeout", "--iothub-outage"):
        assert flag in out
    assert "IOTHUB_CONNECTION_STRING" in out


def test_precedence_cli_over_env_over_ini(pytester, run, monkeypatch):
    pytester.makeini("[pytest]\niothub_keep_alive = 7\niothub_retry_interval = 3\niothub_hub_name = from-ini\n")
    monkeypatch.setenv("IOTFAILOVER_RETRY_INTERVAL", "4")
    monkeypatch.setenv("IOTFAILOVER_HUB_NAME", "from-env")
    pytester.makepyfile("""
        def test_settings(iothub_settings, iothub):
            assert iothub_settings.keep_alive == 7          # ini
            assert iothub_settings.retry_interval == 4      # env beats ini
            assert iothub_settings.hub_name == "from-cli"   # cli beats env
            assert iothub.hostname == "from-cli.azure-devices.net"
            assert iothub.client_kwargs()["keep_alive"] == 7
            assert iothub.client_kwargs()["connection_retry_interval"] == 4
    """)
    run("--iothub-hub-name", "from-cli").assert_outcomes(passed=1)


@pytest.mark.parametrize("args, env, message", [
    (["--iothub-keep-alive", "0"], {}, "--iothub-keep-alive must be between 1 and 1740, got 0"),
    (["--iothub-retry-interval", "soon"], {}, "--iothub-retry-interval must be a whole number"),
    (["--iothub-timeout", "-3"], {}, "--iothub-timeout must be a positive number"),
    ([], {"IOTFAILOVER_OUTAGE": "nan"}, "IOTFAILOVER_OUTAGE (environment) must be a positive number"),
    (["--iothub-hub-name", "Bad_Name"], {}, "--iothub-hub-name must be 3-50 lower-case"),
    (["--iothub-connection", "HostName=h.azure-devices.net;Bogus=1;" + SECRET], {}, "unknown key 'Bogus'"),
    (["--iothub-allow-failover", "myhub"], {"IOTHUB_CONNECTION_STRING": "HostName=h.azure-devices.net;"
                                                                        "SharedAccessKeyName=o;" + SECRET},
     "--iothub-allow-failover needs --iothub-subscription and --iothub-resource-group"),
    (["--iothub-allow-failover", "myhub", "--iothub-subscription", "s", "--iothub-resource-group", "g"], {},
     "apply to a real hub: give --iothub-connection too"),
    ([], {"IOTFAILOVER_FAILBACK": "perhaps"}, "IOTFAILOVER_FAILBACK (environment) must be true or false"),
    # the whole sentence: redaction must not cut it, and it names the variable the user set
    ([], {"IOTHUB_CONNECTION_STRING": "HostName=h.azure-devices.net;" + SECRET},
     ("IOTHUB_CONNECTION_STRING (environment) has neither SharedAccessKeyName nor DeviceId; give a service "
      "connection string (HostName, SharedAccessKeyName and SharedAccessKey) or a device one "
      "(HostName, DeviceId and SharedAccessKey)\n")),
    (["--iothub-connection", "HostName=;DeviceId=d;" + SECRET], {}, "--iothub-connection: HostName is empty"),
    (["--iothub-connection", "HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=c2VjcmV0*!"], {},
     "--iothub-connection: its SharedAccessKey is not valid base64"),
    (["--iothub-resource-group", "bad/name"], {}, "--iothub-resource-group is not a valid Azure name"),
])
def test_bad_values_are_usage_errors_naming_the_option(pytester, run, monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    pytester.makepyfile("def test_nothing(): pass")
    result = run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "c2VjcmV0" not in result.stdout.str() + result.stderr.str()
    if not args:
        assert "--iothub-" not in result.stderr.str(), "names an option the user did not give"


def test_service_connection_string_without_the_real_extra_names_the_extra(pytester, run, monkeypatch):
    # An environment where azure-iot-hub is not installed: a conftest hides it from imports.
    pytester.makeconftest("""
        import sys

        class HideAzureIotHub:
            def find_spec(self, name, path=None, target=None):
                if name == "azure.iot.hub" or name.startswith("azure.iot.hub."):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, HideAzureIotHub())
    """)
    pytester.makepyfile("def test_nothing(): pass")
    monkeypatch.setenv("IOTHUB_CONNECTION_STRING", "HostName=h.azure-devices.net;SharedAccessKeyName=o;" + SECRET)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "IOTHUB_CONNECTION_STRING (environment): running against a real IoT Hub needs the 'real' extra: " \
           "pip install 'pytest-iotfailover[real]' (missing: azure-iot-hub)" in err
    assert "c2VjcmV0" not in err + result.stdout.str()


def test_unreachable_real_hub_fails_clearly_without_echoing_secrets(pytester, run, monkeypatch):
    # No network here: the hub name cannot resolve, so opening the real backend fails. Tests that
    # need the hub error with the reason; others still pass; no key is printed anywhere.
    monkeypatch.setenv("IOTHUB_CONNECTION_STRING",
                       "HostName=nowhere-iotfo.azure-devices.net;SharedAccessKeyName=iothubowner;" + SECRET)
    pytester.makepyfile("""
        def test_needs_hub(iothub_device):
            pass

        def test_plain():
            pass
    """)
    result = run("--junitxml=out.xml", "-rA")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str() + result.stderr.str()
    assert "could not open the IoT hub" in out
    assert "c2VjcmV0" not in out + (pytester.path / "out.xml").read_text()


def test_fixtures_clean_up_devices_connections_and_threads(pytester, run):
    pytester.makepyfile("""
        import threading, time
        from azure.iot.device import Message
        seen = {}

        # "pipeline" and "callback" are the SDK's process-wide executors, shared by every client;
        # the plugin's watchdog is one thread for the whole run
        KEPT = ("FakeHub", "MainThread", "pipeline", "callback", "iotfailover-watchdog")

        def sdk_threads():
            return {t for t in threading.enumerate() if not t.name.startswith(KEPT)}

        def test_a_uses_everything(iothub, iothub_device, device_client, device_client_factory):
            seen["baseline"] = seen.get("baseline", set())
            extra = device_client_factory(count=2)
            for c in [device_client] + extra:
                c.send_message(Message("x"))
            assert len(iothub.wait_for_telemetry(3)) == 3
            assert len(iothub.devices) == 3
            seen["devices"] = iothub.device_ids
            seen["hub"] = iothub.fake

        def test_b_after_teardown(iothub):
            hub = seen["hub"]
            assert all(hub.registry.get(d) is None for d in seen["devices"])
            assert hub.connected_devices() == []
            assert iothub.telemetry() == [], "a new test sees none of the last test's telemetry"
            deadline = time.monotonic() + 10
            while sdk_threads() and time.monotonic() < deadline:
                time.sleep(0.05)  # SDK threads end shortly after shutdown returns
            assert not sdk_threads(), sorted(t.name for t in sdk_threads())
    """)
    run("-p", "no:randomly").assert_outcomes(passed=2)


def test_a_hung_sdk_call_fails_the_test_instead_of_hanging(pytester, run):
    # The inner test blocks in send_message against a silent hub; --iothub-timeout=3 ends it.
    pytester.makepyfile("""
        from azure.iot.device import Message

        def test_hangs(device_client, failover):
            failover.blackhole()
            device_client.send_message(Message("never acknowledged"))
    """)
    result = run("--iothub-timeout", "3")
    result.assert_outcomes(failed=1)
    assert "Timeout" in result.stdout.str()


def test_failover_marker_sets_outage_and_timeout(pytester, run):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.failover(outage=0.5, timeout=7)
        def test_marked(request, failover, device_client, iothub):
            assert request.node.get_closest_marker("timeout").args == (7,)
            handle = failover()
            assert handle.params["outage"] == 0.5
            handle.wait(5)

        def test_fixture_only(request, failover):
            assert request.node.get_closest_marker("timeout").args == (60.0,)
    """)
    run().assert_outcomes(passed=2)


def test_failure_text_and_summary_and_junit(pytester, run):
    pytester.makepyfile("""
        import pytest
        from azure.iot.device import Message
        from azure.iot.device.exceptions import NoConnectionError
        from pytest_iotfailover import assert_all_delivered, assert_no_duplicates

        def send_through_the_drop(client, mid):
            # the hub keeps the first copy and drops the connection before its PUBACK; the client
            # sends it again once reconnected, or raises NoConnectionError when its re-send races the
            # reconnect (seen with azure-iot-device 2.x; a copy may still have gone out): then the
            # test sends it again, so the hub holds two copies, or three
            try:
                client.send_message(Message(mid, message_id=mid))
            except NoConnectionError:
                client.send_message(Message(mid, message_id=mid))

        def test_lossy(iothub, device_client, failover):
            for i in range(3):
                device_client.send_message(Message(str(i), message_id=f"m{i}"))
            failover.drop_before_ack()
            send_through_the_drop(device_client, "dup")
            iothub.wait_for_telemetry(5)  # the re-sent copy too, however slow the machine
            assert_all_delivered(iothub, ["m0", "m1", "m2", "dup"] + [f"never-{i}" for i in range(12)], timeout=0.5)

        def test_dups(iothub, device_client, failover):
            failover.drop_before_ack()
            send_through_the_drop(device_client, "dup")
            iothub.wait_for_telemetry(2)
            assert_no_duplicates(iothub)
    """)
    result = run("--junitxml=out.xml")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert "12 of 16 sent messages were not delivered within 0.5 s" in out
    assert "missing (12): never-0, never-1" in out and "... and 2 more" in out
    assert re.search(r"duplicated \(1\): dup x[23]\b", out)
    assert "latency:" not in out  # ids given as a list carry no send times
    assert "fault: drop_before_ack from" in out
    assert "1 messages were delivered more than once" in out
    assert "=== iothub failover ===" in out.replace("=" * 10, "===")
    assert "FAILED  test_failure_text_and_summary_and_junit.py::test_lossy: drop_before_ack" in out
    assert re.search(r"sent 16 delivered 4 duplicates [12] lost 12\b", out)
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="iothub_fault" value="drop_before_ack"' in xml
    assert 'name="iothub_lost" value="12"' in xml


def test_secrets_never_reach_terminal_junit_or_logs(pytester, run):
    # A careless test prints, logs and asserts on a connection string; pytest must show none of the key.
    pytester.makepyfile("""
        import logging
        from pytest_iotfailover.sas import make_sas_token

        def test_careless(iothub, iothub_device):
            cs = iothub_device.connection_string
            key = cs.split("SharedAccessKey=")[1].split(";")[0]
            open("key.txt", "w").write(key)
            token = make_sas_token("h/devices/d", key)
            print("connecting with", cs)
            logging.getLogger("app").warning("token %s", token)
            assert cs == "something else"
    """)
    result = run("--junitxml=out.xml", "--showlocals", "-rA")
    result.assert_outcomes(failed=1)
    key = (pytester.path / "key.txt").read_text()
    everything = result.stdout.str() + result.stderr.str() + (pytester.path / "out.xml").read_text()
    assert len(key) > 20 and key not in everything
    assert "SharedAccessKey=<redacted>" in everything and "sig=<redacted>" in everything


# --- limits: pytest-timeout and the plugin's watchdog ----------------------------------------------

def test_a_teardown_that_hangs_after_the_body_failed_ends_with_a_stack_dump(pytester, run):
    # pytest-timeout stops its timer when the body fails; the watchdog still ends the stuck teardown
    # at the test's limit, shows where it was stuck, and the run goes on.
    pytester.makepyfile("""
        import threading
        import pytest

        def stop_app():
            threading.Event().wait()  # a shutdown that never completes

        @pytest.fixture
        def app(iothub):
            yield
            stop_app()

        @pytest.mark.failover(timeout=3)
        def test_fails_then_hangs(app):
            assert False, "the body failed"

        def test_next(iothub):
            pass
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(failed=1, errors=1, passed=1)
    out = result.stdout.str()
    assert "ERROR at teardown of test_fails_then_hangs" in out
    assert "Timeout (>3s): test_a_teardown_that_hangs_after_the_body_failed_ends_with_a_stack_dump.py::" \
           "test_fails_then_hangs uses the IoT hub" in out
    assert "it was stuck in teardown" in out
    assert "Thread MainThread (running the test):" in out
    assert ", in stop_app" in out


def test_watchdog_alone_with_pytest_timeout_disabled_and_strict_markers(pytester, run):
    # -p no:timeout: @pytest.mark.timeout is still a known marker and the watchdog honours it
    pytester.makepyfile("""
        import threading
        import pytest

        def wait_for_completion():
            threading.Event().wait()

        @pytest.mark.timeout(2)
        def test_hangs_in_body(iothub):
            wait_for_completion()

        def test_plain():
            pass
    """)
    result = run("-p", "no:timeout", "--strict-markers", "-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out + result.stderr.str()
    assert "Timeout (>2s)" in out and "it was stuck in the test body" in out
    assert ", in wait_for_completion" in out


@pytest.mark.parametrize("how", ["command line", "ini"])
def test_pytest_timeout_setting_wins_over_the_plugin_default(pytester, run, how):
    # the plugin's default would be 60 s; the user's 2 s is what ends the test, in pytest-timeout's words
    pytester.makepyfile("""
        import threading

        def test_hangs(request, iothub):
            assert request.node.get_closest_marker("timeout") is None  # nothing overrides the user's
            threading.Event().wait()
    """)
    if how == "ini":
        pytester.makeini("[pytest]\ntimeout = 2\n")
        result = run()
    else:
        result = run("--timeout", "2")
    result.assert_outcomes(failed=1)
    assert "Timeout (>2.0s) from pytest-timeout" in result.stdout.str()


def test_limit_precedence(pytester, run):
    # failover(timeout=) > @pytest.mark.timeout > --iothub-timeout > --timeout > the default
    pytester.makepyfile("""
        import pytest

        def limit(request):
            return request.node.get_closest_marker("timeout").args[0]

        @pytest.mark.failover(timeout=7)
        @pytest.mark.timeout(8)
        def test_marker_first(request, iothub):
            assert limit(request) == 7

        @pytest.mark.timeout(8)
        def test_timeout_marker_next(request, iothub):
            assert limit(request) == 8

        def test_then_iothub_timeout(request, iothub):
            assert limit(request) == 9
    """)
    run("--timeout", "30", "--iothub-timeout", "9", "-p", "no:randomly").assert_outcomes(passed=3)


def test_faults_started_through_any_api_end_at_teardown(pytester, run):
    pytester.makepyfile("""
        seen = {}

        def test_a_leaves_faults_running(iothub, _iothub_backend):
            seen["fake"] = iothub.fake.faults.blackhole()
            seen["session"] = _iothub_backend.fakehub.faults.region_failover(outage=600)

        def test_b_starts_on_a_healthy_hub(iothub, device_client):
            assert seen["fake"].state == "ended" and seen["session"].state == "ended"
            assert iothub.fake.faults.active() == []
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert "test_a_leaves_faults_running: blackhole" in result.stdout.str()


@pytest.mark.parametrize("written, message", [
    ("failover(5)", ("@pytest.mark.failover(5): the failover marker takes keywords only: "
                     "@pytest.mark.failover(outage=SECONDS, timeout=SECONDS, slo='recover<=10s, ...')")),
    ("failover(bogus=1)", "@pytest.mark.failover(bogus=1): unknown keyword 'bogus'"),
    ("failover(timeout=-1)", "@pytest.mark.failover(timeout=-1): timeout must be a positive number of seconds"),
    ("failover(outage=-3)", ("@pytest.mark.failover(outage=-3): outage must be a non-negative number of "
                             "seconds, got -3")),
])
def test_a_bad_failover_marker_is_a_collection_error_naming_it(pytester, run, written, message):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.{written}
        def test_marked(failover):
            failover()
    """)
    result = run()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str()
    assert "ERROR collecting" in out
    assert "::test_marked: " + message in out
    assert "passed" not in out


def test_mistaken_calls_name_what_the_user_wrote(pytester, run):
    pytester.makepyfile("""
        import pytest
        from azure.iot.device import Message
        from pytest_iotfailover import Outbox, assert_all_delivered

        def test_unknown_device(failover, device_client):
            with pytest.raises(ValueError) as e:
                failover.outage(2, device_id="no-such-device")
            assert str(e.value) == "failover.outage(): device_id='no-such-device': no such device on this hub"

        def test_unknown_keyword(failover):
            with pytest.raises(TypeError) as e:
                failover.outage(2, bogus=1)
            assert str(e.value).startswith("failover.outage() got an unexpected keyword argument 'bogus'")
            assert "Faults" not in str(e.value)

        def test_bad_value_names_the_call(failover):
            with pytest.raises(ValueError) as e:
                failover.outage(-3)
            assert str(e.value) == "failover.outage(): seconds must be a non-negative number of seconds, got -3"

        def test_fault_arguments_are_the_vocabularys(failover):
            with pytest.raises(TypeError) as e:
                failover.expire_tokens(seconds=1)
            assert str(e.value).startswith("failover.expire_tokens() got an unexpected keyword argument 'seconds'")
            with pytest.raises(ValueError) as e:
                failover.throttle(burst=2)
            assert str(e.value).startswith("failover.throttle(): burst= only apply with rate=")
            with pytest.raises(TypeError) as e:
                failover.drop(graceful="yes")
            assert str(e.value) == "failover.drop(): graceful must be True or False, got 'yes'"
            with pytest.raises(TypeError) as e:
                failover.outage(2, outage=3)
            assert "failover.outage() got an unexpected keyword argument 'outage'" in str(e.value)

        def test_overlapping_outages(failover, device_client):
            first = failover.outage(30)
            with pytest.raises(ValueError) as e:
                failover()
            assert str(e.value).startswith("failover(): a region failover of the whole hub is already running")
            first.cancel()
            failover(0.5).wait(10)  # one after the other is fine

        def test_assert_all_delivered_given_a_client(iothub, device_client):
            with pytest.raises(TypeError) as e:
                assert_all_delivered(iothub, device_client)
            assert "sent must be an Outbox or a list of message ids" in str(e.value)
            assert "IoTHubDeviceClient" in str(e.value)

        def test_pending_is_not_lost(iothub, device_client, failover):
            outbox = Outbox(device_client, send_timeout=5)
            try:
                failover.outage(30)
                ids = [outbox.send(Message(str(i))) for i in range(3)]
                assert iothub.wait_until(lambda: outbox.failures, 20), "the SDK never reported a failure"
                with pytest.raises(AssertionError) as e:
                    assert_all_delivered(iothub, outbox, timeout=0.1)
                text = str(e.value)
                assert "3 of 3 sent messages were not delivered within 0.1 s (3 still pending in the Outbox, 0 lost)" in text
                assert "pending, not yet acknowledged by the hub (3): " + ", ".join(ids) in text
                assert "last send failure" in text
                assert "missing (" not in text
            finally:
                outbox.close(timeout=1)
    """)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=7)


def test_a_fault_the_hub_cannot_honour_skips_with_the_reason(pytester, run):
    # the embedded hub honours everything, so the inner test narrows its table the way a real hub's is
    pytester.makepyfile("""
        from pytest_iotfailover.backends import fake
        from pytest_iotfailover.model import FaultKind, Support

        def test_shaped_throttle(failover, monkeypatch):
            monkeypatch.setitem(fake.SUPPORT, FaultKind.THROTTLE, Support(
                honours=frozenset({"device_id", "at", "seconds"}), cannot={"rate": "it has no rate here"}))
            failover.throttle(seconds=1).wait(5)   # honoured
            failover.throttle(10, seconds=1)       # not: the test skips
            raise AssertionError("not reached")
    """)
    result = run("-rs")
    result.assert_outcomes(skipped=1)
    reason = "*failover.throttle(): throttle(rate=10.0) cannot be honoured on the embedded hub: it has no rate here*"
    result.stdout.fnmatch_lines([reason])


def test_a_test_that_swallows_every_interruption_ends_its_worker_not_the_run(pytester, run):
    # The last resort: the stuck teardown ignores the watchdog's interruptions, so the process ends
    # with the stacks on stderr; pytest-xdist reports the crash and goes on with a new worker.
    pytester.makepyfile("""
        import threading
        import pytest

        def stop_app():
            while True:
                try:
                    threading.Event().wait()
                except BaseException:
                    pass  # an app that swallows everything, even pytest's outcomes

        @pytest.fixture
        def app(iothub):
            yield
            stop_app()

        @pytest.mark.failover(timeout=2)
        def test_swallows(app):
            assert False

        def test_next(iothub):
            pass
    """)
    result = run("-n", "1", "-p", "no:randomly")
    out = result.stdout.str() + result.stderr.str()
    assert "the test did not stop when interrupted 3 times; ending the process" in out
    assert ", in stop_app" in out
    assert "worker 'gw0' crashed while running" in out
    assert result.parseoutcomes().get("passed") == 1


def test_watchdog_interrupts_a_test_running_outside_the_main_thread():
    # No signal can reach another thread: the watchdog raises into it asynchronously instead,
    # which lands as soon as the thread runs Python again.
    from pytest_iotfailover.plugin.watchdog import HubTestTimeout, Watchdog

    outcome = {}
    done = threading.Event()
    ended = []
    watchdog = Watchdog(grace=1, last_resort=ended.append)

    def busy_teardown():
        while not done.is_set():
            time.sleep(0.01)  # stuck polling something that never comes

    def runner():
        watchdog.arm("t.py::test_in_a_thread", 0.5, covered_by_pytest_timeout=False)
        watchdog.phase("teardown")
        try:
            busy_teardown()
        except HubTestTimeout as exc:
            outcome["message"] = str(exc)
        finally:
            watchdog.disarm()
            done.set()

    t = threading.Thread(target=runner, name="xdist-like-runner")
    t.start()
    try:
        assert done.wait(30), "the watchdog never interrupted the thread"
    finally:
        done.set()
        t.join(10)
        watchdog.close()
    text = outcome["message"]
    assert text.startswith("Timeout (>0.5s): t.py::test_in_a_thread uses the IoT hub")
    assert "it was stuck in teardown" in text
    assert "Thread xdist-like-runner (running the test):" in text and ", in busy_teardown" in text
    assert ended == []


def test_a_fault_the_hub_cannot_produce_skips_the_test(pytester, run):
    # a suite written for every hub: the real one cannot produce some faults, the test is skipped there
    pytester.makepyfile("""
        import pytest
        from pytest_iotfailover.errors import FaultNotSupported

        def cannot(*args, **kwargs):
            raise FaultNotSupported("this hub has no such fault")

        @pytest.fixture
        def dropped(iothub, failover, monkeypatch):
            monkeypatch.setattr(iothub.hub, "start_fault", cannot)
            return failover.drop()

        def test_in_the_body(iothub, failover, monkeypatch):
            monkeypatch.setattr(iothub.hub, "start_fault", cannot)
            failover.blackhole(1)
            raise AssertionError("not reached")

        def test_in_a_fixture(dropped):
            raise AssertionError("not reached")
    """)
    result = run("-rs")
    result.assert_outcomes(skipped=2)
    out = result.stdout.str()
    # the reason names the call the test made
    assert "the hub cannot produce this fault: failover.blackhole(): this hub has no such fault" in out
    assert "the hub cannot produce this fault: failover.drop(): this hub has no such fault" in out
    # the test's own location, not the plugin's
    assert "test_a_fault_the_hub_cannot_produce_skips_the_test.py:" in out and "hooks.py" not in out


def test_a_delivery_failure_points_at_the_test_line(pytester, run):
    pytester.makepyfile("""
        from pytest_iotfailover import assert_all_delivered, assert_in_order

        def test_missing(iothub):
            iothub.add_device()
            assert_all_delivered(iothub, ["never"], timeout=0.1)

        def test_misuse(iothub):
            assert_in_order(iothub, "one-id")
    """)
    result = run()
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert '>       assert_all_delivered(iothub, ["never"], timeout=0.1)' in out
    assert '>       assert_in_order(iothub, "one-id")' in out
    assert "1 of 1 sent messages were not delivered within 0.1 s" in out
    assert "assertions.py" not in out, out


def test_summary_line_shows_the_failovers_loss_apart_from_lost():
    from pytest_iotfailover.plugin.reporting import summary_lines
    fault = {"fault": "region_failover", "target": None, "outage": 2.0, "time_to_detect": 0.01,
             "time_to_recover": 0.02, "devices": 1, "recovered": True, "never_disconnected": 0}
    delivery = {"sent": 100, "delivered": 81, "duplicates": 0, "lost": 0, "lost_in_failover": 19, "pending": 0}
    [line] = summary_lines([("t", "xfailed", {"faults": [fault], "delivery": delivery})])
    assert line.endswith("; sent 100 delivered 81 duplicates 0 lost 0 lost in failover 19")
    [line] = summary_lines([("t", "passed", {"faults": [fault], "delivery": dict(delivery, lost_in_failover=0)})])
    assert "in failover" not in line
