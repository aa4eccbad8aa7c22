"""A C2D message whose sender set its expiry carries it to the device as `$.exp` in the delivery
topic (iothub/c2d_lifecycle.py), which the unmodified SDK hands over as `Message.expiry_time_utc`."""
import datetime

import pytest
from azure.iot.device import IoTHubDeviceClient
from sdk_support import CLIENT_KWARGS, Inbox, bounded

from pytest_iotfailover import FakeHub

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def received():
    with FakeHub("exphub", tier=None) as hub:
        dev = hub.add_device("dev1")
        client = IoTHubDeviceClient.create_from_connection_string(
            dev.connection_string, server_verification_cert=hub.ca_pem, **CLIENT_KWARGS)
        inbox = Inbox()
        client.on_message_received = inbox
        bounded(client.connect)
        try:
            yield hub, inbox
        finally:
            bounded(client.shutdown)


def _utc(text):
    # seven fractional digits, as .NET writes them; Python's parser takes six
    assert text.endswith("Z") and len(text.split(".")[1]) == 8, text
    return datetime.datetime.strptime(text[:-2], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.UTC)


def test_an_absolute_expiry_reaches_the_sdk_as_expiry_time_utc(received):
    hub, inbox = received
    expiry = datetime.datetime.now(datetime.UTC).replace(microsecond=250000) + datetime.timedelta(hours=3)
    hub.send_c2d("dev1", b"x", {"kind": "timed"}, message_id="timed", expiry_time=expiry)
    msg = inbox.wait_for(lambda m: m.message_id == "timed")
    assert msg.expiry_time_utc == expiry.strftime("%Y-%m-%dT%H:%M:%S") + ".2500000Z"
    assert msg.custom_properties == {"kind": "timed"}  # a system property, not an application one


def test_a_ttl_is_delivered_as_the_absolute_expiry_it_became(received):
    hub, inbox = received
    before = datetime.datetime.now(datetime.UTC)
    hub.send_c2d("dev1", b"x", message_id="ttl", ttl=600)
    after = datetime.datetime.now(datetime.UTC)
    msg = inbox.wait_for(lambda m: m.message_id == "ttl")
    # the hub's clock read between the two readings here, plus 600 s
    window = datetime.timedelta(seconds=600)
    slack = datetime.timedelta(microseconds=1)  # float seconds to microseconds, both ways
    assert before + window - slack <= _utc(msg.expiry_time_utc) <= after + window + slack


def test_without_a_sender_expiry_the_default_ttl_is_not_in_the_topic(received):
    hub, inbox = received
    hub.send_c2d("dev1", b"x", message_id="plain")
    msg = inbox.wait_for(lambda m: m.message_id == "plain")
    assert msg.expiry_time_utc is None
