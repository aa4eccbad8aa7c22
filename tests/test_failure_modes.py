"""The failure modes devices saw during real failovers, through the unmodified azure-iot-device client.

`existing="zombie"` (Azure/iotedge PR #5669), `connect="silent"` (azure-iot-sdk-python #1197) and
`connect="connack3"`; the older `refuse=` spelling keeps working. Clients use keep_alive 1 s and
connection_retry_interval=1 (the SDK's floors) so each scenario fits in a few seconds.
"""
import threading

import pytest
from azure.iot.device import Message, exceptions
from azure.iot.device.common.pipeline import pipeline_stages_mqtt
from sdk_support import bounded, make_client

from pytest_iotfailover.model import RegionFailover, spec_for

pytestmark = pytest.mark.timeout(30)


def _events(hub, kind, device_id, since):
    return [e for e in hub.events if e.kind == kind and e.device_id == device_id and e.at >= since]


def _shutdown(client):
    try:
        bounded(client.shutdown)
    except exceptions.ClientError:
        pass  # a client refused for good may complain on shutdown


def test_zombie_connections_get_no_ack_until_keep_alive_gives_up(hub, device):
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        fo = hub.faults.region_failover(outage=2, existing="zombie")
        done = threading.Event()
        threading.Thread(target=lambda: (c.send_message(Message("unheard", message_id="z")), done.set()),
                         daemon=True).start()
        # the connection stays open: the client itself has to notice that nobody answers
        gone = hub.wait_for_event("disconnect", device.device_id, after=fo.started_at, timeout=10)
        assert gone.reason == "connection_lost"
        assert _events(hub, "connection_zombie", device.device_id, fo.started_at)[0].detail["how"] == "existing"
        assert not [t for t in hub.telemetry(device.device_id) if t.message_id == "z" and t.at < gone.at]
        assert done.wait(20), "the send completes once the client is back after the outage"
        fo.wait(10)
        back = hub.wait_for_event("connect", device.device_id, after=fo.ended_at, timeout=10)
        assert [t.message_id for t in hub.telemetry(device.device_id)] == ["z"]
        assert back.at >= fo.ended_at
    finally:
        _shutdown(c)


def test_silent_connect_makes_the_sdk_watchdog_fire_again_and_again(hub, device, monkeypatch):
    # The SDK's connect watchdog is 60 s (pipeline_stages_mqtt.WATCHDOG_INTERVAL); a shorter one
    # lets the scenario fit in seconds. The SDK's code is unchanged; only the constant is.
    monkeypatch.setattr(pipeline_stages_mqtt, "WATCHDOG_INTERVAL", 1)
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        fo = hub.faults.region_failover(outage=6, connect="silent")
        assert fo.params["connect"] == "silent"
        fo.wait(15)
        ignored = _events(hub, "connect_ignored", device.device_id, fo.started_at)
        assert len(ignored) >= 2, "the SDK gave up on an unanswered CONNECT and tried again"
        assert all(e.at <= fo.ended_at for e in ignored)
        assert not _events(hub, "connect_refused", device.device_id, fo.started_at)
        back = hub.wait_for_event("connect", device.device_id, after=fo.ended_at, timeout=10)
        assert back.at >= fo.ended_at
        bounded(c.send_message, Message("after", message_id="a"))
        assert [t.message_id for t in hub.telemetry(device.device_id)] == ["a"]
    finally:
        _shutdown(c)


def test_connack3_refuses_each_attempt_until_the_outage_ends(hub, device):
    c = make_client(hub, device, keep_alive=1)
    bounded(c.connect)
    try:
        fo = hub.faults.region_failover(outage=2, connect="connack3")
        fo.wait(10)
        refusals = _events(hub, "connect_refused", device.device_id, fo.started_at)
        assert refusals and {e.detail["return_code"] for e in refusals} == {3}
        back = hub.wait_for_event("connect", device.device_id, after=fo.ended_at, timeout=10)
        assert back.at >= fo.ended_at
    finally:
        _shutdown(c)


def test_refuse_is_the_older_spelling_of_connect():
    assert RegionFailover(refuse="tcp").connect_mode == "reset"
    assert RegionFailover(refuse="connack").connect_mode == "connack3"
    assert RegionFailover(device_id="d").connect_mode == "connack3"
    assert RegionFailover(connect="silent").refusal == "silent"
    with pytest.raises(ValueError, match="contradicts connect='silent'"):
        RegionFailover(refuse="tcp", connect="silent")
    with pytest.raises(ValueError, match="needs the whole hub"):
        RegionFailover(device_id="d", connect="reset")
    with pytest.raises(ValueError, match="existing"):
        spec_for("region_failover", {"existing": "ghost"})


def test_failure_modes_through_failover_fixture_kwargs(hub, device):
    from pytest_iotfailover.testing.failover import Failover  # noqa: F401  (public path exists)
    fo = hub.faults.region_failover(outage=0.5, existing="zombie", connect="silent", device_id="dev1")
    assert (fo.params["existing"], fo.params["connect"]) == ("zombie", "silent")
    fo.wait(5)
