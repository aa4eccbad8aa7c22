"""A device survives a dropped connection without losing telemetry — against the embedded hub.

Run: pytest examples
"""
import time

import pytest
from azure.iot.device import IoTHubDeviceClient, Message

from pytest_iotfailover import FakeHub


@pytest.fixture
def hub():
    with FakeHub("example") as hub:
        yield hub


@pytest.mark.timeout(30)
def test_device_reports_and_takes_commands(hub):
    device = hub.add_device("thermostat-1")
    client = IoTHubDeviceClient.create_from_connection_string(
        device.connection_string, server_verification_cert=hub.ca_pem,
        keep_alive=5, connection_retry_interval=1)
    received = []
    client.on_message_received = received.append
    try:
        client.connect()
        for i in range(10):
            client.send_message(Message(f'{{"reading": {i}}}', message_id=f"r-{i}"))
        client.patch_twin_reported_properties({"firmware": "1.0.3"})
        hub.send_c2d("thermostat-1", "set-point 21")

        delivered = hub.wait_for_telemetry(10, device_id="thermostat-1", timeout=10)
        assert [t.message_id for t in delivered] == [f"r-{i}" for i in range(10)]
        assert hub.get_twin("thermostat-1")["reported"]["firmware"] == "1.0.3"
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)  # the SDK hands C2D to a callback; poll that list with a deadline
        assert [m.data for m in received] == [b"set-point 21"]
    finally:
        client.shutdown()
