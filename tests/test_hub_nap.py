"""The hub's nap (fakehub/nap.py): with it on or off the hub acknowledges and delivers as before.

What the nap saves is CPU per message under load, measured by bench/bench_fair.py, not here; these
tests only check that the option is honoured and changes nothing a device or a test can observe
apart from timing.
"""
import importlib.util
import threading

import pytest
from azure.iot.device import Message
from sdk_support import Inbox, bounded, make_client, wait_until

from pytest_iotfailover import FakeHub
from pytest_iotfailover.fakehub import cli
from pytest_iotfailover.fakehub import server as hub_server
from pytest_iotfailover.fakehub.nap import DEFAULT_NAP, MAX_NAP, NAP_ENV, NAP_FULL_AT, nap_for, wants_nap

pytestmark = pytest.mark.timeout(60)
pytest_plugins = ["pytester"]

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


class NapSpy:
    """Wraps the hub thread's nap check, which runs once per loop iteration that read device data,
    and records for each: whether more than one connection had sent (`mixed`), how many
    connections' packets waited for it, and the ledger's length before and after it."""

    def __init__(self, hub):
        self.checks = []
        self._server, self._ledger = hub._server, hub.ledger
        self._take = self._server.take_nap
        self._server.take_nap = self

    def __call__(self):
        check = {"mixed": self._server.nap_mixed, "waiting": len(self._server.ready),
                 "before": len(self._ledger)}
        self._take()
        check["after"] = len(self._ledger)
        self.checks.append(check)


def exchange(hub, device_ids, messages=15):
    """Clients of `device_ids` send at once, each gets a C2D message and patches its twin."""
    clients = [make_client(hub, hub.add_device(d)) for d in device_ids]
    inboxes = []
    try:
        for client in clients:
            bounded(client.connect)
            inbox = Inbox()
            client.on_message_received = inbox
            inboxes.append(inbox)
        failures = []

        def send(client, device_id):
            try:
                for i in range(messages):
                    bounded(client.send_message, Message(str(i), message_id=f"{device_id}-{i}"))
            except BaseException as exc:  # reported below, in the test's thread
                failures.append(exc)

        threads = [threading.Thread(target=send, args=(c, d)) for c, d in zip(clients, device_ids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures and not any(t.is_alive() for t in threads), failures
        for device_id in device_ids:
            got = hub.wait_for_telemetry(messages, device_id=device_id)
            assert [t.message_id for t in got] == [f"{device_id}-{i}" for i in range(messages)]
        for client, device_id, inbox in zip(clients, device_ids, inboxes):
            hub.send_c2d(device_id, f"to {device_id}")
            assert inbox.wait(1)[0].data == f"to {device_id}".encode()
            bounded(client.patch_twin_reported_properties, {"fw": device_id})
            assert hub.get_twin(device_id)["reported"]["fw"] == device_id
    finally:
        for client in clients:
            bounded(client.shutdown)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("nap", [0, None, MAX_NAP], ids=["off", "default", "longest"])
def test_devices_are_acknowledged_and_served_with_the_nap_on_and_off(monkeypatch, loop, nap):
    monkeypatch.delenv(NAP_ENV, raising=False)
    with FakeHub("naphub", loop=loop, nap=nap) as hub:
        assert hub.nap == (DEFAULT_NAP if nap is None else nap)
        spy = NapSpy(hub)
        exchange(hub, ["nap-a", "nap-b", "nap-c"])
        # napping is off at 0; otherwise every iteration that read device data considers it
        assert (len(spy.checks) > 0) == bool(hub.nap)
        assert hub.errors == []


def test_env_var_sets_the_nap_and_the_argument_wins(monkeypatch):
    monkeypatch.setenv(NAP_ENV, "0")
    assert FakeHub("naphub").nap == 0
    assert FakeHub("naphub", nap=0.002).nap == 0.002
    monkeypatch.setenv(NAP_ENV, " ")
    assert FakeHub("naphub").nap == DEFAULT_NAP


@pytest.mark.parametrize("value", [-0.001, MAX_NAP * 2, float("nan"), True, "0.001"])
def test_bad_nap_argument_is_refused_by_name(monkeypatch, value):
    monkeypatch.delenv(NAP_ENV, raising=False)
    with pytest.raises((TypeError, ValueError), match=r"\bnap\b"):
        FakeHub("naphub", nap=value)


@pytest.mark.parametrize("text", ["soon", "-1", "1", "inf"])
def test_bad_nap_env_var_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv(NAP_ENV, text)
    with pytest.raises(ValueError, match=NAP_ENV):
        FakeHub("naphub")


def test_cli_nap_option(capsys):
    assert cli.build_parser().parse_args(["--nap", "0"]).nap == 0
    assert cli.build_parser().parse_args(["--nap", "0.002"]).nap == 0.002
    assert cli.build_parser().parse_args([]).nap is None
    for bad in ("soon", "-1", "1"):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["--nap", bad])
        assert exc.value.code == cli.EXIT_USAGE
        assert "--nap" in capsys.readouterr().err


PLUGIN_TEST = """
    from azure.iot.device import Message

    def test_nap(iothub, iothub_device, device_client):
        assert iothub.fake.nap == {expected}
        device_client.send_message(Message("hi", message_id="m-1"))
        got = iothub.fake.wait_for_telemetry(1, device_id=iothub_device.device_id, timeout=15)
        assert got[0].message_id == "m-1"
"""


@pytest.mark.parametrize("how, env, args, expected", [
    ("command line over ini", None, ["--iothub-nap", "0"], 0),
    ("environment over ini", "0.002", [], 0.002),
])
def test_plugin_option_sets_the_session_hubs_nap(pytester, monkeypatch, how, env, args, expected):
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    if env is None:
        monkeypatch.delenv(NAP_ENV, raising=False)
    else:
        monkeypatch.setenv(NAP_ENV, env)
    pytester.makeini("[pytest]\niothub_nap = 0.001\n")
    pytester.makepyfile(PLUGIN_TEST.format(expected=expected))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)


def test_plugin_option_refuses_a_bad_nap_and_is_in_help(pytester, monkeypatch):
    monkeypatch.delenv(NAP_ENV, raising=False)
    pytester.makepyfile(PLUGIN_TEST.format(expected=0))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--iothub-nap", "1")
    assert result.ret != 0
    assert "--iothub-nap must be 0 (off) to 0.05 seconds" in result.stdout.str() + result.stderr.str()
    assert "--iothub-nap" in pytester.runpytest_subprocess("--help").stdout.str()


def test_a_lone_sender_is_never_held_and_a_second_sender_makes_the_hub_consider_a_nap(monkeypatch):
    """One connection that waits on each PUBACK gains nothing from a nap; two sending can.
    Whether a nap is then taken also depends on time (wants_nap, tested below); here only what
    the connections did decides."""
    monkeypatch.delenv(NAP_ENV, raising=False)
    with FakeHub("naphub", nap=MAX_NAP) as hub:
        clients = [make_client(hub, hub.add_device(d)) for d in ("lone", "other")]
        try:
            for client in clients:
                bounded(client.connect)
            # the first message after the other device's traffic counts as a second sender
            bounded(clients[0].send_message, Message("first", message_id="lone-first"))
            spy = hub._call(lambda: NapSpy(hub))
            naps = hub._call(lambda: hub._server.naps)
            for i in range(30):
                bounded(clients[0].send_message, Message(str(i), message_id=f"lone-{i}"))
            lone = hub._call(lambda: [c["mixed"] for c in spy.checks])
            assert lone and not any(lone)
            assert hub._call(lambda: hub._server.naps) == naps  # never held
            bounded(clients[1].send_message, Message("other", message_id="other-1"))
            # the check runs in the loop iteration after the read that recorded the message
            wait_until(lambda: hub._call(lambda: len(spy.checks)) > len(lone), 20, "the nap check after it")
            assert hub._call(lambda: spy.checks[len(lone)]["mixed"]) is True
            assert hub._call(lambda: hub._server.naps) <= naps + 1
        finally:
            for client in clients:
                bounded(client.shutdown)
        assert hub.errors == []


@pytest.mark.parametrize("loop", LOOPS)
def test_with_the_nap_on_the_core_takes_an_iterations_packets_at_its_end(monkeypatch, loop):
    """The read only decodes; the packets reach the core in the nap check that ends the loop
    iteration (HubServer.take_nap), so every message is recorded inside one."""
    monkeypatch.delenv(NAP_ENV, raising=False)
    with FakeHub("naphub", loop=loop, nap=DEFAULT_NAP) as hub:
        client = make_client(hub, hub.add_device("drain"))
        try:
            bounded(client.connect)
            spy = hub._call(lambda: NapSpy(hub))
            for i in range(5):
                bounded(client.send_message, Message(str(i), message_id=f"drain-{i}"))
            seen = hub._call(lambda: [(c["waiting"], c["before"], c["after"]) for c in spy.checks])
        finally:
            bounded(client.shutdown)
        assert sum(after - before for _, before, after in seen) == 5, seen
        assert all(waiting for waiting, before, after in seen if after > before), seen
        assert [t.message_id for t in hub.wait_for_telemetry(5)] == [f"drain-{i}" for i in range(5)]
        assert hub.errors == []


def test_with_the_nap_off_packets_are_handled_as_they_are_read(monkeypatch):
    monkeypatch.delenv(NAP_ENV, raising=False)
    with FakeHub("naphub", nap=0) as hub:
        client = make_client(hub, hub.add_device("inline"))
        try:
            bounded(client.connect)
            for i in range(5):
                bounded(client.send_message, Message(str(i)))
                assert hub._call(lambda: list(hub._server.ready)) == []
        finally:
            bounded(client.shutdown)
        assert len(hub.wait_for_telemetry(5)) == 5


@pytest.mark.parametrize("mixed, since_check, since_open, naps", [
    (True, 0.001, 5.0, True),     # several connections, wake-ups close together, no new device
    (False, 0.001, 5.0, False),   # one connection alone: it waits on each acknowledgement
    (True, 0.003, 5.0, False),    # half a nap or more since the last check: quiet, or saturated
    (True, 0.001, 0.5, False),    # a device connected within STORM_QUIET: a reconnect storm
], ids=["mixed-close", "lone", "spread-out", "storm"])
def test_when_the_hub_naps(mixed, since_check, since_open, naps):
    assert wants_nap(0.005, mixed, since_check, since_open) is naps


@pytest.mark.parametrize("connections, share", [(0, 1), (1, 1), (2, 2), (NAP_FULL_AT - 1, NAP_FULL_AT - 1),
                                                (NAP_FULL_AT, NAP_FULL_AT), (500, NAP_FULL_AT)])
def test_the_nap_grows_with_the_connections_it_can_gather_from(connections, share):
    assert nap_for(0.02, connections) == pytest.approx(0.02 * share / NAP_FULL_AT)
    assert nap_for(0.0, connections) == 0.0


def test_amid_a_few_senders_the_hub_naps_its_share(monkeypatch):
    # two or three devices that each wait on their PUBACK would send only once per nap: the hub
    # must nap for the connections that iteration read, not the whole setting
    monkeypatch.delenv(NAP_ENV, raising=False)
    naps = []

    def recording(nap, connections):
        naps.append((nap, connections, nap_for(nap, connections)))
        return naps[-1][2]
    monkeypatch.setattr(hub_server, "nap_for", recording)
    with FakeHub("naphub", nap=MAX_NAP) as hub:
        exchange(hub, ["few-a", "few-b", "few-c"])
    assert naps, "no nap was considered"
    assert all(nap == MAX_NAP and 1 <= connections <= 3 for nap, connections, _ in naps), naps
    assert max(took for _, _, took in naps) <= MAX_NAP * 3 / NAP_FULL_AT
