"""Devices made many at once go to the embedded hub in bulk (backends/fake.py, testing/view.py):
with --iothub-throttle-setup one registry call per 100 devices, as IoT Hub's bulk registry API
takes, rather than one call (and one wait) per device. Counted with `throttle_stats()`."""
import contextlib

import pytest

from pytest_iotfailover.backends.fake import FakeBackend
from pytest_iotfailover.errors import HubOperationError
from pytest_iotfailover.testing.view import HubView

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def _view(**backend_kwargs):
    """An embedded-hub backend and one test's view of it; the backend is closed afterwards."""
    backend = FakeBackend("bulkhub", **backend_kwargs)
    try:
        yield backend, HubView(backend, "test_bulk")
    finally:
        backend.close()


def _registry_calls(backend):
    stats = backend.fakehub.throttle_stats()["registry_operation"]
    return stats.admitted + stats.delayed + stats.rejected


def test_counted_set_up_is_one_bulk_call_per_hundred_devices():
    # S3's 5,000/min leaves every call within the burst: the count of calls is what is asserted
    with _view(throttle_setup=True, tier="S3") as (backend, view):
        made = view.add_devices(250)
        assert len(made) == 250 == len({d.device_id for d in made}) == len(view.devices)
        assert _registry_calls(backend) == 3  # 100 + 100 + 50
        assert {d.device_id for d in backend.fakehub.devices} == set(view.device_ids)
        view.close()
        assert backend.fakehub.devices == []


def test_uncounted_set_up_is_one_import_job_and_takes_any_number():
    with _view(throttle_setup=False) as (backend, view):
        assert len(view.add_devices([f"given-{i}" for i in range(150)])) == 150
        assert _registry_calls(backend) == 0
        view.close()


def test_a_refused_bulk_set_up_leaves_no_device_behind():
    with _view(throttle_setup=True, tier="S3") as (backend, view):
        failover = backend.fakehub.faults.region_failover(outage=60)
        try:
            with pytest.raises(HubOperationError) as caught:
                view.add_devices(150)
            assert caught.value.error_code == 503001
        finally:
            failover.cancel()
        assert backend.fakehub.devices == [] and view.devices == []
        with pytest.raises(ValueError, match="given twice"):
            view.add_devices(["same", "same"])
        assert backend.fakehub.devices == []


def test_view_add_devices_wants_ids_or_a_positive_count():
    with _view(tier=None) as (_, view):
        for bad in (0, -1, True):
            with pytest.raises(ValueError, match="positive number"):
                view.add_devices(bad)


def test_the_plugins_fixtures_make_their_devices_in_bulk(pytester):
    pytester.makepyfile("""
        def test_bulk(iothub, device_client_factory, iothub_fleet):
            def calls():
                stats = iothub.fake.throttle_stats()["registry_operation"]
                return stats.admitted + stats.delayed + stats.rejected
            device_client_factory(count=3, connect=False)
            assert calls() == 1
            fleet = iothub_fleet(2, rate=1, per_process=2)
            assert fleet.connected() == 2
            assert calls() == 2
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--iothub-throttle-setup")
    result.assert_outcomes(passed=1)
