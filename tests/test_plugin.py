"""The pytest plugin, driven through pytester: options, fixtures, timeouts, failure text, summary."""

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

        # "pipeline" and "callback" are the SDK's process-wide executors, shared by every client
        KEPT = ("FakeHub", "MainThread", "pipeline", "callback")

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
    assert result.duration < 40


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
        from pytest_iotfailover import assert_all_delivered, assert_no_duplicates

        def test_lossy(iothub, device_client, failover):
            for i in range(3):
                device_client.send_message(Message(str(i), message_id=f"m{i}"))
            failover.drop_before_ack()
            device_client.send_message(Message("dup", message_id="dup"))
            assert_all_delivered(iothub, ["m0", "m1", "m2", "dup"] + [f"never-{i}" for i in range(12)], timeout=0.5)

        def test_dups(iothub, device_client, failover):
            failover.drop_before_ack()
            device_client.send_message(Message("dup", message_id="dup"))
            iothub.wait_for_telemetry(2)
            assert_no_duplicates(iothub)
    """)
    result = run("--junitxml=out.xml")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert "12 of 16 sent messages were not delivered within 0.5 s" in out
    assert "missing (12): never-0, never-1" in out and "... and 2 more" in out
    assert "duplicated (1): dup x2" in out
    assert "latency:" not in out  # ids given as a list carry no send times
    assert "fault: drop_before_ack from" in out
    assert "1 messages were delivered more than once" in out
    assert "=== iothub failover ===" in out.replace("=" * 10, "===")
    assert "FAILED  test_failure_text_and_summary_and_junit.py::test_lossy: drop_before_ack" in out
    assert "sent 16 delivered 4 duplicates 1 lost 12" in out
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="iothub_fault" value="drop_before_ack"' in xml
    assert 'name="iothub_lost" value="12"' in xml


def test_secrets_never_reach_terminal_junit_or_logs(pytester, run):
    # A careless test prints, logs and asserts on a connection string; pytest must show none of the key.
    pytester.makepyfile("""
        import logging
        from pytest_iotfailover.iothub.auth import make_sas_token

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
