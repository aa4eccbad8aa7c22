"""Helpers for tests that drive the real azure-iot-device client against a FakeHub."""
import threading
import time

from azure.iot.device import IoTHubDeviceClient
from azure.iot.device.aio import IoTHubDeviceClient as AioIoTHubDeviceClient

from pytest_iotfailover.plugin.factory import run_bounded

# Short enough that a lost connection is noticed within a test's budget; the SDK's floor is 1 s.
CLIENT_KWARGS = {"keep_alive": 5, "connection_retry_interval": 1}


def make_client(hub, device, aio=False, **kwargs):
    cls = AioIoTHubDeviceClient if aio else IoTHubDeviceClient
    options = dict(CLIENT_KWARGS, server_verification_cert=hub.ca_pem)
    options.update(kwargs)
    return cls.create_from_connection_string(device.connection_string, **options)


def bounded(fn, *args, timeout=10.0):
    """Run a blocking SDK call with a deadline: the SDK's send_message and get_twin have none."""
    return run_bounded(lambda: fn(*args), timeout, getattr(fn, "__name__", repr(fn)))


class Inbox:
    """Collects what an SDK handler receives; `wait(n)` blocks until n items arrived."""

    def __init__(self):
        self.items = []
        self._cond = threading.Condition()

    def __call__(self, item):
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait(self, count=1, timeout=10.0):
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise TimeoutError(f"expected {count} items within {timeout:g} s, got {len(self.items)}")
            return list(self.items)

    def wait_for(self, predicate, timeout=10.0):
        """The first item matching `predicate`, waiting up to `timeout` s for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: any(predicate(i) for i in self.items), timeout):
                raise TimeoutError(f"nothing matching arrived within {timeout:g} s; got {self.items!r}")
            return next(i for i in self.items if predicate(i))


def wait_until(predicate, timeout, what):
    """Poll a condition no event signals, up to `timeout` s, and return its first true value;
    TimeoutError naming `what` if unmet."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:g} s")
        time.sleep(0.02)
    return value
