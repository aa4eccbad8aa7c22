"""The fault vocabulary both hubs share: one spec per kind, checked once, errors naming the call."""
import pytest

from pytest_iotfailover.errors import FaultNotSupported
from pytest_iotfailover.model import (
    SPECS,
    Drop,
    ExpireTokens,
    FaultKind,
    FaultState,
    RegionFailover,
    Support,
    Throttle,
    check_support,
    spec_for,
)


def test_every_kind_has_a_spec_with_its_kind():
    assert set(SPECS) == set(FaultKind)
    for kind, cls in SPECS.items():
        assert cls.kind is kind


def test_defaults_and_canonical_values():
    spec = spec_for("region_failover", {"outage": 3})
    assert spec == RegionFailover(outage=3.0)
    assert spec.params() == {"outage": 3.0, "keep_sessions": False, "refuse": None,
                             "existing": "reset", "connect": None, "unread": 1.0, "keep_c2d": False, "rpo": 0.0,
                             "dns": False, "dns_stale": 0.0}
    assert spec.lasts == 3.0 and spec.refusal == "tcp"
    assert RegionFailover(device_id="d").refusal == "connack"


def test_changed_params_are_what_a_backend_must_honour():
    assert Throttle(rate=5).changed_params() == {"rate": 5.0}
    assert Throttle(rate=5, burst=3, device_id="d").changed_params() == {"rate": 5.0, "burst": 3, "device_id": "d"}


@pytest.mark.parametrize("kind, kwargs, error, text", [
    ("delay_acks", {}, TypeError, "failover.delay_acks() needs seconds="),
    ("throttle", {"burst": 2}, ValueError, "failover.throttle(): burst= only apply with rate="),
    ("throttle", {"max_delay": 2.0}, ValueError, "max_delay= only apply with rate="),
    ("throttle", {"rate": True}, TypeError, "rate must be a number, got True"),
    ("expire_tokens", {"seconds": 5}, TypeError,
     "failover.expire_tokens() got an unexpected keyword argument 'seconds'; it takes device_id=, at=, after_messages="),
    ("drop", {"device_id": ""}, TypeError, "device_id must be a non-empty string"),
    ("throttle", {"rate": 0}, ValueError, "rate must be a positive number, got 0"),
    ("drop", {"bogus": 1}, TypeError,
     "failover.drop() got an unexpected keyword argument 'bogus'; it takes device_id=, at=, after_messages=, graceful="),
    ("drop", {"b": 1, "a": 2}, TypeError, "got unexpected keyword arguments 'a', 'b'"),
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


def test_throttle_without_a_rate_is_the_one_both_hubs_can_produce():
    spec = spec_for("throttle", {"seconds": 3})
    assert spec.rate is None and spec.lasts == 3.0 and spec.changed_params() == {"seconds": 3.0}
    assert Throttle(rate=5, burst=2).changed_params() == {"rate": 5.0, "burst": 2}


def test_expire_tokens_has_no_parameters_of_its_own():
    assert ExpireTokens().params() == {} and ExpireTokens(at=1).changed_params() == {"at": 1.0}


def test_fault_state_reads_as_its_string():
    assert FaultState("active") is FaultState.ACTIVE and FaultState.ACTIVE == "active"
    assert f"{FaultState.PENDING}" == "pending"


TABLE = {FaultKind.DROP: Support(honours=frozenset({"device_id", "at"}),
                                 cannot={"graceful": "it cannot close gently", "after_messages": "no counting"}),
         FaultKind.BLACKHOLE: Support(missing="it needs silence")}


def test_a_backend_honours_defaults_and_what_it_declares():
    check_support(Drop(), TABLE, "a test hub")
    check_support(Drop(device_id="d", at=2), TABLE, "a test hub")
    check_support(Drop(graceful=False), TABLE, "a test hub")  # the default asks nothing


@pytest.mark.parametrize("spec, text", [
    (Drop(graceful=True), "drop(graceful=True) cannot be honoured on a test hub: it cannot close gently"),
    (Drop(after_messages=3), "drop(after_messages=3) cannot be honoured on a test hub: no counting"),
    (spec_for("blackhole", {}), "blackhole cannot be produced on a test hub: it needs silence"),
    (RegionFailover(), "region_failover cannot be produced on a test hub: it has no such fault"),
])
def test_a_backend_refuses_what_it_cannot_honour_naming_it_and_why(spec, text):
    with pytest.raises(FaultNotSupported) as info:
        check_support(spec, TABLE, "a test hub")
    assert str(info.value) == text


def test_a_parameter_nobody_explained_is_still_refused():
    table = {FaultKind.DROP: Support(honours=frozenset({"device_id"}))}
    with pytest.raises(FaultNotSupported, match=r"drop\(at=1.0\) cannot be honoured on x: it has no way to act on it"):
        check_support(Drop(at=1), table, "x")
