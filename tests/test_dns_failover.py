"""region_failover(dns=True): the hub's host name moves to another address and the old one goes
dark (azure-iot-sdk-csharp #1312), through the unmodified azure-iot-device client.

Devices dial `hub.dns.name` (GatewayHostName), which this process resolves while the hub runs
(fakehub/dns.py). Clients use keep_alive 1 s and connection_retry_interval=1, the SDK's floors, so
each scenario fits in a few seconds.
"""
import asyncio
import socket
import threading

import pytest
from azure.iot.device import Message, exceptions
from sdk_support import bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.errors import FaultNotSupported
from pytest_iotfailover.fakehub import dns
from pytest_iotfailover.model import RegionFailover, check_support

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hub():
    with FakeHub("testhub", dns=True) as h:
        yield h


@pytest.fixture
def device(hub):
    return hub.add_device("dev1")


def _shutdown(client):
    try:
        bounded(client.shutdown)
    except exceptions.ClientError:
        pass


def _dark_refusals(hub, since, address):
    return [e for e in hub.events if e.kind == "connect_refused" and e.detail.get("how") == "dns"
            and e.at >= since and e.detail["address"] == address]


def _address(name):
    return socket.getaddrinfo(name, 8883, 0, socket.SOCK_STREAM)[0][4][0]


def test_devices_get_the_name_and_the_certificate_covers_it(hub, device):
    assert f"GatewayHostName={hub.dns.name}" in device.connection_string
    assert hub.dns.name.endswith(".iotfailover.invalid") and hub.dns.name in hub.certificates.names
    assert _address(hub.dns.name) == hub.gateway_host == hub.dns.address


def test_device_follows_the_name_to_the_new_address_and_its_messages_are_delivered(hub, device):
    old = hub.dns.address
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        bounded(c.send_message, Message("before", message_id="before"))
        hub.wait_for_telemetry(1, device.device_id)
        fo = hub.faults.region_failover(outage=1, dns=True, unread=0)
        new = hub.dns.address
        assert new != old and fo.params["dns"] is True
        # during the outage the name still points at the old address, where nothing answers
        assert hub.dns.resolve() == old and hub.dns.is_dark(old)
        fo.wait(10)
        back = hub.wait_for_event("connect", device.device_id, after=fo.ended_at, timeout=20)
        assert _address(hub.dns.name) == new and hub.dns.resolve() == new
        assert _dark_refusals(hub, fo.started_at, old), "the device's retries met the dark old address"
        assert not _dark_refusals(hub, back.at, new)
        bounded(c.send_message, Message("after", message_id="after"))
        hub.wait_for_telemetry(2, device.device_id)
        assert [t.message_id for t in hub.telemetry(device.device_id)] == ["before", "after"]
        report = fo.wait_recovered(10).report()
        assert report.recovered and report.devices[device.device_id].reconnected_at == back.at
    finally:
        _shutdown(c)


def test_a_later_dns_failover_moves_the_name_again(hub, device):
    first = hub.dns.address
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        addresses = []
        for _ in range(2):
            fo = hub.faults.region_failover(outage=0.5, dns=True, unread=0)
            addresses.append(hub.dns.address)
            fo.wait(10)
            hub.wait_for_event("connect", device.device_id, after=fo.ended_at, timeout=20)
            assert hub.dns.resolve() == addresses[-1]
        assert len({first, *addresses}) == 3
        assert hub.dns.is_dark(first) and hub.dns.is_dark(addresses[0]) and not hub.dns.is_dark(addresses[1])
        bounded(c.send_message, Message("after both", message_id="m"))
        hub.wait_for_telemetry(1, device.device_id)
    finally:
        _shutdown(c)


def test_a_scheduled_dns_failover_moves_nothing_until_it_starts(hub, device):
    old = hub.dns.address
    fo = hub.faults.region_failover(outage=1, dns=True, at=300)
    assert fo.state == "pending" and hub.dns.resolve() == old == hub.dns.address
    fo.cancel()
    assert fo.state == "cancelled" and hub.dns.resolve() == old and not hub.dns.is_dark(old)
    c = make_client(hub, device)
    try:
        bounded(c.connect)
    finally:
        _shutdown(c)


def test_dns_stale_keeps_devices_failing_until_the_stale_answer_expires(hub, device):
    old = hub.dns.address
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        fo = hub.faults.region_failover(outage=1, dns=True, dns_stale=4, unread=0)
        new = hub.dns.address
        fo.wait(10)
        # the hub is back in the secondary region, yet the name still gives the dark old address
        assert hub.dns.resolve(now=fo.ended_at + 3.9) == old
        assert hub.dns.resolve(now=fo.ended_at + 4) == new
        stale = hub.wait_for_event("connect_refused", None, after=fo.ended_at, timeout=10,
                                   where=lambda e: e.detail.get("how") == "dns")
        assert stale.detail["address"] == old
        back = hub.wait_for_event("connect", device.device_id, after=fo.started_at, timeout=20)
        assert back.at >= fo.ended_at + 4, "no device can reach the hub before the stale answer expires"
        bounded(c.send_message, Message("after", message_id="after"))
        assert [t.message_id for t in hub.wait_for_telemetry(1, device.device_id)] == ["after"]
        report = fo.wait_recovered(10).report()
        assert report.devices[device.device_id].downtime >= fo.ended_at + 4 - fo.started_at
    finally:
        _shutdown(c)


def test_aio_client_follows_the_name_too(hub, device):
    async def scenario():
        c = make_client(hub, device, aio=True, keep_alive=1)
        await asyncio.wait_for(c.connect(), 10)
        try:
            fo = hub.faults.region_failover(outage=0.5, dns=True, dns_stale=1, unread=0)
            await asyncio.get_running_loop().run_in_executor(None, fo.wait_recovered, 20)
            await asyncio.wait_for(c.send_message(Message("aio after", message_id="aio")), 10)
            assert hub.dns.resolve() == hub.dns.address
        finally:
            await asyncio.wait_for(c.shutdown(), 10)
    asyncio.run(scenario())
    assert [t.message_id for t in hub.telemetry(device.device_id)] == ["aio"]


def test_the_patch_answers_only_each_hubs_own_name_and_is_undone_at_stop():
    original = socket.getaddrinfo
    plain = original("localhost", 8883, 0, socket.SOCK_STREAM)
    a = FakeHub("testhub", dns=True).start()
    try:
        b = FakeHub("testhub", dns=True).start()
        try:
            assert a.dns.name != b.dns.name and socket.getaddrinfo is not original
            assert _address(a.dns.name) == a.gateway_host != b.gateway_host == _address(b.dns.name)
            assert _address(a.dns.name.upper() + ".") == a.gateway_host  # names are case-insensitive
            assert socket.getaddrinfo("localhost", 8883, 0, socket.SOCK_STREAM) == plain
            assert _address("127.0.0.9") == "127.0.0.9"
            with pytest.raises(socket.gaierror):
                socket.getaddrinfo("testhub-0." + dns.DNS_SUFFIX, 8883)
        finally:
            b.stop()
        assert socket.getaddrinfo is not original and _address(a.dns.name) == a.gateway_host
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(b.dns.name, 8883)
    finally:
        a.stop()
    assert socket.getaddrinfo is original and dns.resolved_names() == []


def test_resolution_is_thread_safe_while_hubs_come_and_go():
    with FakeHub("testhub", dns=True) as steady:
        stop = threading.Event()
        wrong: list[str] = []

        def resolve():
            while not stop.is_set():
                got = _address(steady.dns.name)
                if got != steady.gateway_host:
                    wrong.append(got)
        threads = [threading.Thread(target=resolve, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(3):
                with FakeHub("testhub", dns=True) as other:
                    assert _address(other.dns.name) == other.gateway_host
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not wrong


def test_a_hub_without_names_refuses_dns_with_the_reason():
    with FakeHub("testhub") as plain:
        assert plain.dns is None and "GatewayHostName=127." in plain.add_device("d").connection_string
        with pytest.raises(ValueError, match=r"dns=True needs a hub whose devices dial it by name: .*FakeHub\(dns=True\)"):
            plain.faults.region_failover(outage=1, dns=True)
        assert plain.faults.history() == []


@pytest.mark.parametrize("kwargs,words", [
    ({"dns_stale": 5}, "dns_stale= needs dns=True"),
    ({"dns": True, "device_id": "d"}, "dns=True needs the whole hub"),
    ({"dns": True, "connect": "connack3"}, "connect= cannot be combined with dns=True"),
    ({"dns": True, "refuse": "tcp"}, "refuse= cannot be combined with dns=True"),
    ({"dns": True, "dns_stale": -1}, "dns_stale must be a non-negative"),
    ({"dns": "yes"}, "dns must be True or False"),
])
def test_bad_dns_arguments_name_what_is_wrong(kwargs, words):
    with pytest.raises((TypeError, ValueError), match=words):
        RegionFailover(**kwargs)


def test_the_real_backend_refuses_dns_by_name():
    from pytest_iotfailover.backends.real.faults import SUPPORT
    for kwargs, name in (({"dns": True}, "dns"), ({"dns": True, "dns_stale": 3}, "dns")):
        with pytest.raises(FaultNotSupported, match=rf"region_failover\({name}=True\) cannot be honoured on a real"):
            check_support(RegionFailover(**kwargs), SUPPORT, "a real IoT Hub")


def test_the_standalone_hub_refuses_dns_with_the_reason():
    from pytest_iotfailover.fakehub.process import StandaloneHub
    from pytest_iotfailover.iothub.core import HubOperationError
    with StandaloneHub(devices=["d1"]) as standalone:
        with pytest.raises(HubOperationError, match="dns=true cannot be offered by the standalone hub: .*patching "
                                                    "name resolution inside the process that runs the devices"):
            standalone.start_fault("region_failover", outage=1, dns=True)
        assert standalone.request("GET", "/faults") == []


def test_plugin_option_lets_failover_move_the_name(pytester, monkeypatch):
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("IOTFAILOVER_DNS", raising=False)
    pytester.makepyfile("""
        import pytest

        def test_dns(iothub, iothub_device, device_client, failover):
            name = iothub.fake.dns.name
            assert "GatewayHostName=" + name in iothub_device.connection_string
            fo = failover(outage=0.5, dns=True, dns_stale=0.5, unread=0)
            fo.wait_recovered(30)
            assert iothub.fake.dns.resolve() == iothub.fake.dns.address != iothub.fake.gateway_host

        def test_fleet_refuses(iothub_fleet):
            with pytest.raises(pytest.UsageError, match="iothub_fleet cannot run with --iothub-dns"):
                iothub_fleet(1)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--iothub-dns")
    result.assert_outcomes(passed=2)
    assert "--iothub-dns" in pytester.runpytest_subprocess("--help").stdout.str()


def test_plugin_without_the_option_says_what_to_add(pytester, monkeypatch):
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("IOTFAILOVER_DNS", raising=False)
    pytester.makepyfile("""
        def test_dns(failover):
            failover(outage=0.5, dns=True)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*failover(): dns=True needs a hub whose devices dial it by name*--iothub-dns*"])


def _listeners(hub):
    """The addresses the hub's server listens on, read on the hub thread once the listeners a
    dns failover asked for are serving (their tasks were queued before this coroutine)."""
    async def read():
        if hub.dns._tasks:
            await asyncio.wait(list(hub.dns._tasks))
        return sorted(s.getsockname()[0] for srv in hub._server._servers for s in srv.sockets)
    return asyncio.run_coroutine_threadsafe(read(), hub._loop).result(10)


def test_a_refused_dns_failover_leaves_no_listener_behind(hub, device):
    first = _listeners(hub)
    running = hub.faults.region_failover(outage=30, dns=True, unread=0)
    try:
        secondary = hub.dns.address
        assert _listeners(hub) == sorted([*first, secondary])
        with pytest.raises(ValueError, match="must not overlap"):
            hub.faults.region_failover(outage=1, dns=True)
        [closed] = [e for e in hub.events if e.kind == "dns_listener_closed"]
        assert closed.detail["reason"] == "refused" and closed.detail["address"] not in (*first, secondary)
        assert _listeners(hub) == sorted([*first, secondary])
        # (a connect to the closed address is not tried: another hub on the machine may take it)
        assert hub.dns.listening == [*first, secondary]
    finally:
        running.cancel()


def test_a_dns_failover_cancelled_before_it_starts_closes_its_listener(hub, device):
    first = _listeners(hub)
    pending = hub.faults.region_failover(outage=1, dns=True, at=300)
    assert len(_listeners(hub)) == len(first) + 1
    pending.cancel()
    [closed] = [e for e in hub.events if e.kind == "dns_listener_closed"]
    assert closed.detail["reason"] == "cancelled"
    assert _listeners(hub) == first and hub.dns.listening == first
    # one that ran keeps its address: the name points there now
    ran = hub.faults.region_failover(outage=0.2, dns=True, unread=0).wait(10)
    ran.cancel()
    assert hub.dns.address in _listeners(hub)
    assert len([e for e in hub.events if e.kind == "dns_listener_closed"]) == 1
