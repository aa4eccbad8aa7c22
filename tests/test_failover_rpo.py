"""A regional failover's data loss as the unmodified azure-iot-device client and a backend see it
(failover-facts.md "Data loss (RPO)"). The same rules on a fake clock: test_failover_rpo_memory.py."""
import pytest
from azure.iot.device import Message, exceptions
from sdk_support import Inbox, bounded, make_client, wait_until

from pytest_iotfailover import DevicePool, HubOperationError, Outbox
from pytest_iotfailover.testing.assertions import DeliveryReport, lost_in_failover_ids

pytestmark = pytest.mark.timeout(30)


def send(client, count, prefix="m"):
    ids = [f"{prefix}{i}" for i in range(count)]
    for mid in ids:
        bounded(client.send_message, Message(mid, message_id=mid))  # PUBACK received
    return ids


def test_acknowledged_unread_telemetry_is_in_the_ledger_not_the_view(hub, device, client):
    ids = send(client, 5)
    f = hub.faults.region_failover(outage=1, unread=300)  # everything so far was still unread
    f.wait(10)
    assert [t.message_id for t in hub.telemetry()] == []
    kept = hub.telemetry(include_lost=True)
    assert [t.message_id for t in kept] == ids and all(t.lost_in_failover for t in kept)
    assert [t.message_id for t in hub.ledger.items()] == ids
    after = send(client, 1, prefix="after")                # the SDK reconnected by itself
    assert [t.message_id for t in hub.wait_for_telemetry(1, timeout=10)] == after
    report = DeliveryReport(ids + after, hub.telemetry(), {}, None, lost_in_failover_ids(hub))
    assert (report.figures.lost_in_failover, report.figures.lost, report.figures.delivered) == (5, 0, 1)
    assert ("5 of 6 were acknowledged by the hub and then lost in the failover (IoT Hub loses unread "
            "device-to-cloud messages)") in "\n".join(report.describe())


def test_unread_zero_is_the_old_behaviour(hub, device, client):
    ids = send(client, 3)
    hub.faults.region_failover(outage=1, unread=0).wait(10)
    assert [t.message_id for t in hub.telemetry()] == ids


@pytest.mark.parametrize("keep_c2d", [False, True])
def test_queued_c2d_is_dropped_unless_kept(hub, device, client, keep_c2d):
    received = Inbox()
    client.on_message_received = received
    bounded(client.disconnect)
    hub.send_c2d(device.device_id, "queued while offline")
    f = hub.faults.region_failover(outage=1, keep_sessions=True, keep_c2d=keep_c2d)
    f.wait(10)
    bounded(client.connect)
    hub.send_c2d(device.device_id, "after")
    expected = [b"queued while offline", b"after"] if keep_c2d else [b"after"]
    received.wait(len(expected))
    assert [m.data for m in received.items] == expected   # C2D arrives in order: nothing older is coming
    loss = hub.wait_for_event("failover_data_loss")
    assert loss.detail["c2d_dropped"] == (0 if keep_c2d else 1)


@pytest.fixture
def old_device(hub):
    # registered outside the replication window: straight into the registry, which add_device's
    # record of creation times (what rpo= forgets) does not see
    return hub.registry.add("old")


def test_rpo_rolls_back_the_desired_version(hub, old_device):
    client = make_client(hub, old_device)
    bounded(client.connect)
    device = old_device
    hub.update_desired(device.device_id, {"rate": 1})
    assert hub.get_twin(device.device_id)["desired"]["$version"] == 2
    hub.faults.region_failover(outage=1, rpo=60).wait(10)
    twin = hub.get_twin(device.device_id)
    assert twin["desired"] == {"$version": 1}
    assert bounded(client.get_twin)["desired"]["$version"] == 1   # what the device reads back
    bounded(client.shutdown)


def test_rpo_forgets_a_device_created_just_before(hub):
    fresh = hub.add_device("fresh")
    c = make_client(hub, fresh)
    bounded(c.connect)
    try:
        f = hub.faults.region_failover(outage=1, rpo=60)
        f.wait(10)
        refused = hub.wait_for_event("auth_failure", after=f.ended_at, timeout=10)
        assert refused.detail["return_code"] == 5 and "not registered" in refused.detail["reason"]
        assert "fresh" not in {d.device_id for d in hub.devices}
    finally:
        try:
            bounded(c.shutdown)
        except exceptions.ClientError:
            pass


def test_service_calls_fail_with_service_unavailable_during_the_outage(hub, device):
    f = hub.faults.region_failover(outage=60)
    calls = [lambda: hub.send_c2d(device.device_id, "x"),
             lambda: hub.invoke_method(device.device_id, "m", timeout=5),
             lambda: hub.get_twin(device.device_id),
             lambda: hub.update_desired(device.device_id, {"a": 1}),
             lambda: hub.add_device("later")]
    for call in calls:
        with pytest.raises(HubOperationError, match="failing over") as info:
            call()
        assert info.value.error_code == 503001
    f.cancel()
    assert hub.get_twin(device.device_id)["desired"]["$version"] == 1


def run_outbox(hub, client, **outbox_kwargs):
    """30 messages through an Outbox, a failover after the 10th; the ids the backend can read."""
    f = hub.faults.region_failover(outage=2, after_messages=10, unread=60)
    with Outbox(client, send_timeout=5, **outbox_kwargs) as outbox:
        ids = [outbox.send(Message(f"r{i}", message_id=f"r{i}")) for i in range(30)]
        outbox.flush(timeout=20)
    f.wait(10)
    return ids, {t.message_id for t in hub.telemetry()}, outbox


def test_plain_outbox_loses_what_the_failover_ate(hub, device, client):
    ids, readable, _ = run_outbox(hub, client)
    assert lost_in_failover_ids(hub) == set(ids[:10]) and not readable & set(ids[:10])
    assert readable == set(ids[10:])


def test_delivery_assertion_fails_at_once_when_the_outbox_has_nothing_left_to_send(hub, device, client):
    from pytest_iotfailover import assert_all_delivered
    _, _, outbox = run_outbox(hub, client)
    assert outbox.pending == 0
    # without the early verdict this would sit out its 120 s and say "not delivered within 120 s"
    with pytest.raises(AssertionError, match=r"10 of 30 sent messages can never be delivered: the Outbox "
                                             r"has nothing left to send") as err:
        assert_all_delivered(hub, outbox, timeout=120)
    assert "10 of 30 were acknowledged by the hub and then lost in the failover" in str(err.value)


def test_outbox_replay_restores_end_to_end_delivery(hub, device, client):
    ids, readable, outbox = run_outbox(hub, client, replay=120)
    assert readable == set(ids)                          # nothing lost from what the backend reads
    assert set(outbox.replayed_ids) == set(ids[:10])     # what was acknowledged before the failover
    assert lost_in_failover_ids(hub) == set(ids[:10])    # the first copies are still gone


def test_pool_replay_covers_lanes_that_saw_no_stall(hub):
    """A failover is hub-wide: lane b had nothing waiting through it, so it never stalled, yet
    what it had acknowledged just before is lost all the same and must go again."""
    a, b = hub.add_device("lane-a"), hub.add_device("lane-b")
    pool = DevicePool([a, b], server_verification_cert=hub.ca_pem, max_backoff=0.5)
    try:
        pool.connect(timeout=20)
        with Outbox(pool, send_timeout=2, replay=120, replay_outage=1) as outbox:
            before = [outbox.send(Message(f"{d.device_id}-{i}", message_id=f"{d.device_id}-{i}"),
                                  device_id=d.device_id) for d in (a, b) for i in range(3)]
            outbox.flush(timeout=20)
            f = hub.faults.region_failover(outage=60, unread=60)
            during = outbox.send(Message("a-during", message_id="a-during"), device_id=a.device_id)
            # one attempt on lane a ran out its 2 s send timeout: a stall past replay_outage
            wait_until(lambda: any(mid == during for mid, _, _ in outbox.failures), 20,
                       "a failed send on lane a during the outage")
            f.cancel()
            outbox.flush(timeout=30)
        assert set(outbox.replayed_ids) == set(before)
        assert {t.message_id for t in hub.telemetry()} == set(before) | {during}
    finally:
        pool.close(timeout=10)


@pytest.mark.parametrize("kwargs, message", [
    ({"replay": -1}, "replay must be a non-negative"),
    ({"replay": 5, "replay_outage": 0}, "replay_outage must be a positive"),
])
def test_bad_replay_arguments_are_named(hub, device, client, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Outbox(client, **kwargs)
