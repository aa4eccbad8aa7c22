"""Tests that need a real IoT Hub; skipped (with the reason in the summary) on the embedded one.

    pytest examples --iothub-connection "$SERVICE_CONNECTION_STRING" \
                    --iothub-eventhub-connection "$EVENTHUB_COMPATIBLE_CONNECTION_STRING"

The other examples run against the real hub too: their devices are created for the run and
deleted afterwards, delivery is read from the hub's built-in Event Hub-compatible endpoint, and
`failover.drop()` becomes IoT Hub's own fault injection (KillTcp). Regional failovers need
`--iothub-allow-failover <hub> --iothub-subscription … --iothub-resource-group …`.
"""
import threading

import pytest
from azure.iot.device import MethodResponse

from pytest_iotfailover import Outbox, assert_all_delivered

pytestmark = pytest.mark.real_hub


def test_telemetry_reaches_the_builtin_endpoint(iothub, device_client):
    with Outbox(device_client) as outbox:
        for i in range(20):
            outbox.send({"seq": i})
        assert_all_delivered(iothub, outbox, timeout=60)


def test_service_fault_injection_kill_tcp_loses_nothing(iothub, device_client, failover):
    with Outbox(device_client) as outbox:
        for i in range(10):
            outbox.send({"seq": i})
        failover.drop().wait(120)
        for i in range(10, 20):
            outbox.send({"seq": i})
        assert_all_delivered(iothub, outbox, timeout=120)


def test_direct_method_and_c2d_through_the_service_api(iothub, iothub_device, device_client):
    arrived = threading.Event()
    device_client.on_message_received = lambda message: arrived.set()
    device_client.on_method_request_received = lambda r: device_client.send_method_response(
        MethodResponse.create_from_method_request(r, 200, {"pong": True}))
    assert iothub.invoke_method(iothub_device.device_id, "ping", timeout=30).payload == {"pong": True}
    iothub.send_c2d(iothub_device.device_id, "hello from the cloud")
    assert arrived.wait(60), "the C2D message did not arrive within 60 s"
