"""The fault vocabulary both hubs share: one spec per kind, checked once, errors naming the call."""
import pytest

from pytest_iotfailover.model import SPECS, FaultKind, RegionFailover, Throttle, spec_for


def test_every_kind_has_a_spec_with_its_kind():
    assert set(SPECS) == set(FaultKind)
    for kind, cls in SPECS.items():
        assert cls.kind is kind


def test_defaults_and_canonical_values():
    spec = spec_for("region_failover", {"outage": 3})
    assert spec == RegionFailover(outage=3.0)
    assert spec.params() == {"outage": 3.0, "keep_sessions": False, "refuse": None}
    assert spec.lasts == 3.0 and spec.refusal == "tcp"
    assert RegionFailover(device_id="d").refusal == "connack"


def test_changed_params_are_what_a_backend_must_honour():
    assert Throttle(rate=5).changed_params() == {"rate": 5.0}
    assert Throttle(rate=5, burst=3, device_id="d").changed_params() == {"rate": 5.0, "burst": 3, "device_id": "d"}


@pytest.mark.parametrize("kind, kwargs, error, text", [
    ("throttle", {}, TypeError, "failover.throttle() needs rate"),
    ("throttle", {"rate": 0}, ValueError, "rate must be a positive number, got 0"),
    ("drop", {"bogus": 1}, TypeError, "got unexpected argument bogus; it takes device_id, at, after_messages, graceful"),
    ("region_failover", {"outage": -3}, ValueError, "outage must be a non-negative number of seconds, got -3"),
    ("region_failover", {"outage": True}, TypeError, "outage must be a number of seconds, got True"),
    ("region_failover", {"outage": float("nan")}, TypeError, "outage must be a number of seconds"),
    ("region_failover", {"device_id": "d", "refuse": "tcp"}, ValueError, "refuse='tcp' needs the whole hub"),
    ("refuse", {"code": 6}, ValueError, "code must be at most 5"),
    ("blackhole", {"at": 1, "after_messages": 3}, ValueError, "give at= or after_messages=, not both"),
    ("drop_before_ack", {"count": 0}, ValueError, "count must be at least 1"),
    ("delay_acks", {"seconds": "1"}, TypeError, "seconds must be a number of seconds"),
    ("nope", {}, ValueError, "unknown fault 'nope'; the faults are region_failover, drop"),
])
def test_bad_arguments_name_the_call_and_the_value(kind, kwargs, error, text):
    with pytest.raises(error) as info:
        spec_for(kind, kwargs, what=f"failover.{kind}()")
    assert text in str(info.value)


def test_specs_are_immutable():
    spec = RegionFailover()
    with pytest.raises(AttributeError):
        spec.outage = 5  # type: ignore[misc]
