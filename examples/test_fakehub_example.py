"""FakeHub on its own, without the plugin's fixtures: a device reports, takes a twin update and a C2D command.

Run: pytest examples
"""
import threading

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
    arrived = threading.Event()
    client.on_message_received = lambda message: (received.append(message), arrived.set())
    try:
        client.connect()
        for i in range(10):
            client.send_message(Message(f'{{"reading": {i}}}', message_id=f"r-{i}"))
        client.patch_twin_reported_properties({"firmware": "1.0.3"})
        hub.send_c2d("thermostat-1", "set-point 21")

        delivered = hub.wait_for_telemetry(10, device_id="thermostat-1", timeout=10)
        assert [t.message_id for t in delivered] == [f"r-{i}" for i in range(10)]
        assert hub.get_twin("thermostat-1")["reported"]["firmware"] == "1.0.3"
        assert arrived.wait(10), "no C2D message within 10 s"
        assert [m.data for m in received] == [b"set-point 21"]
    finally:
        client.shutdown()
