"""Tier throttles and traffic shaping on a fake clock: `now` is a number the test advances."""
import math

import pytest

from pytest_iotfailover.iothub.tiers import (
    ADMIT,
    Admit,
    Delay,
    HubThrottles,
    MqttAction,
    Operation,
    Reject,
    Shaping,
    Throttle,
    Tier,
    operation_cost,
)

OP = Operation


# --- the tier table (iot-hub-devguide-quotas-throttling.md) -------------------------------

def test_s1_one_unit_rates():
    s1 = Tier.lookup("S1", units=1)
    assert s1.rate(OP.NEW_CONNECTION) == 100
    assert s1.rate(OP.D2C_SEND) == 100
    assert s1.rate(OP.TWIN_READ) == 100
    assert s1.rate(OP.TWIN_UPDATE) == 50
    assert s1.rate(OP.DIRECT_METHOD) == 160          # KB/s
    assert s1.rate(OP.C2D_SEND) == pytest.approx(1.67, abs=0.01)
    assert s1.rate(OP.REGISTRY_OPERATION) == pytest.approx(100 / 60)


@pytest.mark.parametrize("units, expected", [(1, 100), (2, 100), (8, 100), (9, 108), (10, 120)])
def test_s1_connections_are_the_higher_of_100_and_12_per_unit(units, expected):
    # the document's own example: two S1 units give 100/s, nine give 108/s
    assert Tier.lookup("S1", units=units).rate(OP.NEW_CONNECTION) == expected
    assert Tier.lookup("B1", units=units).rate(OP.D2C_SEND) == expected


def test_units_scale_per_row():
    assert Tier.lookup("S2", units=3).rate(OP.NEW_CONNECTION) == 360
    assert Tier.lookup("S3", units=2).rate(OP.D2C_SEND) == 12_000
    assert Tier.lookup("S1", units=5).rate(OP.TWIN_READ) == 100          # flat in S1
    assert Tier.lookup("S2", units=5).rate(OP.TWIN_READ) == 100          # higher of 100 and 10/unit
    assert Tier.lookup("S2", units=20).rate(OP.TWIN_READ) == 200
    assert Tier.lookup("S2", units=20).rate(OP.TWIN_UPDATE) == 100
    assert Tier.lookup("S3", units=2).rate(OP.TWIN_UPDATE) == 500
    assert Tier.lookup("S2", units=2).rate(OP.DIRECT_METHOD) == 960
    assert Tier.lookup("S3", units=1).rate(OP.DIRECT_METHOD) == 24 * 1024
    assert Tier.lookup("S3", units=3).rate(OP.C2D_SEND) == pytest.approx(250)
    assert Tier.lookup("B3", units=1).rate(OP.REGISTRY_OPERATION) == pytest.approx(83.33, abs=0.01)


def test_basic_tiers_lack_standard_operations():
    b2 = Tier.lookup("b2", units=1)       # names are case-insensitive
    assert b2.name == "B2"
    for op in (OP.C2D_SEND, OP.DIRECT_METHOD, OP.TWIN_READ, OP.TWIN_UPDATE):
        assert not b2.supports(op)
        with pytest.raises(ValueError, match="not available in the B2 tier"):
            b2.rate(op)
    verdict = HubThrottles(b2).acquire(OP.TWIN_READ, 0.0, device="d")
    assert isinstance(verdict, Reject)
    assert verdict.error.code == 403010 and verdict.mqtt is MqttAction.TWIN_STATUS


@pytest.mark.parametrize("name, units, match", [
    ("S4", 1, "unknown IoT Hub tier"), ("S1", 0, "positive integer"), ("S1", 1.5, "positive integer"),
    ("S1", True, "positive integer"), ("Free", 2, "exactly one unit")])
def test_lookup_refuses_bad_input_clearly(name, units, match):
    with pytest.raises(ValueError, match=match):
        Tier.lookup(name, units=units)


# --- shaping ----------------------------------------------------------------------------------

def test_s1_admits_100_new_connections_per_second_sustained():
    throttles = Tier.lookup("S1").throttles()
    verdicts = [throttles.acquire(OP.NEW_CONNECTION, i / 100, device=f"d{i}") for i in range(3000)]
    assert all(v is ADMIT for v in verdicts)
    assert throttles.throttled_time("d5") == 0


def test_300_simultaneous_connects_take_three_seconds_of_the_rate():
    throttle = Tier.lookup("S1").throttles().throttle(OP.NEW_CONNECTION)
    verdicts = [throttle.acquire(10.0, device=f"d{i}") for i in range(300)]
    assert all(isinstance(v, Admit) for v in verdicts[:100])         # the burst: one second of the rate
    delays = [v.seconds for v in verdicts[100:]]
    assert all(isinstance(v, Delay) for v in verdicts[100:])
    # the queue drains at the limit: one connection every 10 ms, the last one 2 s after the burst
    assert delays == pytest.approx([0.01 * (i + 1) for i in range(200)])
    assert throttle.backlog(10.0) == pytest.approx(2.0)
    assert throttle.backlog(12.0) == pytest.approx(0.0)


def test_connects_beyond_the_queue_cap_get_connack_3():
    throttle = Throttle(OP.NEW_CONNECTION, 100, shaping=Shaping(max_queue_delay=1.0))
    verdicts = [throttle.acquire(0.0, device=f"d{i}") for i in range(300)]
    kinds = [type(v).__name__ for v in verdicts]
    assert kinds == ["Admit"] * 100 + ["Delay"] * 100 + ["Reject"] * 100
    reject = verdicts[-1]
    assert isinstance(reject, Reject)
    assert reject.error.code == 429001 and reject.error.name == "ThrottlingException"
    assert reject.error.status == 429 and reject.error_code == 429001
    assert reject.mqtt is MqttAction.CONNACK_3                        # never 4 or 5
    assert throttle.stats("d299").rejected == 1


def test_rejected_requests_take_no_capacity():
    throttle = Throttle(OP.NEW_CONNECTION, 100, shaping=Shaping(max_queue_delay=1.0))
    for _ in range(200):
        throttle.acquire(0.0)
    assert all(isinstance(throttle.acquire(0.0), Reject) for _ in range(1000))
    # a full queue drains in one second; then the rate is available again
    assert isinstance(throttle.acquire(1.0), Delay)
    assert throttle.acquire(5.0) is ADMIT


def test_default_queue_cap_is_sixty_seconds_at_s1():
    throttle = Tier.lookup("S1").throttles().throttle(OP.NEW_CONNECTION)
    verdicts = [throttle.acquire(0.0) for i in range(6200)]
    assert sum(isinstance(v, Admit) for v in verdicts) == 100
    assert sum(isinstance(v, Delay) for v in verdicts) == 6000
    assert sum(isinstance(v, Reject) for v in verdicts) == 100
    assert max(v.seconds for v in verdicts if isinstance(v, Delay)) == pytest.approx(60.0)


def test_minute_window_reading_takes_a_minute_of_the_rate_at_once():
    throttle = Throttle(OP.D2C_SEND, 100, shaping=Shaping.minute_window())
    verdicts = [throttle.acquire(0.0) for _ in range(6001)]
    assert all(v is ADMIT for v in verdicts[:6000])
    assert verdicts[6000] == Delay(pytest.approx(0.01))


def test_d2c_reject_closes_the_connection_and_twin_reject_is_status_429():
    throttles = HubThrottles(Tier.lookup("S1"), Shaping(burst_seconds=0, max_queue_delay=0))
    assert throttles.acquire(OP.D2C_SEND, 0.0) is ADMIT              # a bucket always holds one call
    d2c = throttles.acquire(OP.D2C_SEND, 0.0)
    assert isinstance(d2c, Reject) and d2c.mqtt is MqttAction.CLOSE
    throttles.acquire(OP.TWIN_UPDATE, 0.0)
    twin = throttles.acquire(OP.TWIN_UPDATE, 0.0)
    assert isinstance(twin, Reject) and twin.mqtt is MqttAction.TWIN_STATUS and twin.error.status == 429
    assert twin.error.body()["errorCode"] == 429001


def test_reject_code_can_model_the_backlog_limit_reading():
    throttle = Throttle(OP.D2C_SEND, 10, shaping=Shaping(max_queue_delay=0, reject_code=429002))
    verdicts = [throttle.acquire(0.0) for _ in range(11)]
    assert isinstance(verdicts[-1], Reject)
    assert verdicts[-1].error.name == "ThrottleBacklogLimitExceeded"
    with pytest.raises(ValueError, match="429xxx"):
        Shaping(reject_code=400004)


def test_per_operation_shaping():
    throttles = HubThrottles(Tier.lookup("S1"), {OP.D2C_SEND: Shaping(max_queue_delay=0)})
    assert throttles.throttle(OP.D2C_SEND).max_queue_delay == 0
    assert throttles.throttle(OP.NEW_CONNECTION).max_queue_delay == 60


# --- direct methods are metered in 4 KB chunks --------------------------------------------------

@pytest.mark.parametrize("size, kb", [(0, 4), (1, 4), (4096, 4), (4097, 8), (8192, 8), (160 * 1024, 160)])
def test_method_cost_rounds_up_to_4_kb(size, kb):
    assert operation_cost(OP.DIRECT_METHOD, size) == kb
    assert operation_cost(OP.D2C_SEND, size) == 1


@pytest.mark.parametrize("payload, per_second", [(100, 40), (5000, 20), (157 * 1024, 1)])
def test_s1_method_calls_per_second_match_the_documented_examples(payload, per_second):
    throttles = Tier.lookup("S1").throttles()
    verdicts = [throttles.acquire(OP.DIRECT_METHOD, 0.0, payload_bytes=payload) for _ in range(per_second + 1)]
    assert all(v is ADMIT for v in verdicts[:per_second])
    assert isinstance(verdicts[-1], Delay)


@pytest.mark.parametrize("operation", [OP.C2D_SEND, OP.REGISTRY_OPERATION])
def test_per_minute_rows_take_a_minute_of_the_rate_at_once_then_100_per_minute(operation):
    throttles = Tier.lookup("S1").throttles()
    assert all(throttles.acquire(operation, 0.0) is ADMIT for _ in range(100))
    next_one = throttles.acquire(operation, 0.0)
    assert isinstance(next_one, Delay) and next_one.seconds == pytest.approx(0.6)
    # a bulk call of 10 devices books 10 operations at once
    bulk = throttles.acquire(operation, 0.0, count=10)
    assert isinstance(bulk, Delay) and bulk.seconds == pytest.approx(11 * 0.6)


def test_one_shaping_for_every_operation_replaces_the_per_minute_defaults():
    throttles = Tier.lookup("S1").throttles(Shaping(burst_seconds=1.0, max_queue_delay=0.5))
    assert throttles.acquire(OP.C2D_SEND, 0.0) is ADMIT
    second = throttles.acquire(OP.C2D_SEND, 0.0)
    assert isinstance(second, Delay) and second.seconds == pytest.approx(2 * 0.6 - 1.0)
    assert isinstance(throttles.acquire(OP.C2D_SEND, 0.0), Reject)
    assert throttles.totals()[OP.C2D_SEND].rejected == 1


# --- accounting for the recovery report -------------------------------------------------------------

def test_throttled_time_accumulates_per_device():
    throttles = HubThrottles(Tier.lookup("S1"))
    for i in range(100):
        throttles.acquire(OP.NEW_CONNECTION, 0.0, device="burst")
    throttles.acquire(OP.NEW_CONNECTION, 0.0, device="late")          # 10 ms in the queue
    throttles.acquire(OP.D2C_SEND, 0.0, device="late")                # D2C has its own bucket: no wait
    for _ in range(100):
        throttles.acquire(OP.D2C_SEND, 0.0, device="chatty")
    throttles.acquire(OP.D2C_SEND, 0.0, device="late")                # 20 ms behind the others
    assert throttles.throttled_time("burst") == 0
    assert throttles.throttled_time("late") == pytest.approx(0.03)
    report = throttles.report()
    assert report["late"].delayed == 2 and report["late"].admitted == 1
    assert report["burst"].admitted == 100
    assert throttles.report([OP.NEW_CONNECTION])["late"].delayed_seconds == pytest.approx(0.01)
    throttles.forget("late")
    assert throttles.throttled_time("late") == 0


def test_unthrottled_hub_admits_everything():
    throttles = HubThrottles(None)
    assert all(throttles.acquire(OP.NEW_CONNECTION, 0.0, device="d") is ADMIT for _ in range(100_000))
    assert throttles.throttled_time("d") == 0 and throttles.report() == {}


@pytest.mark.parametrize("now", [math.nan, math.inf, "0", None])
def test_bad_clock_values_are_refused(now):
    throttle = Throttle(OP.D2C_SEND, 100)
    with pytest.raises(ValueError, match="now must be a finite number"):
        throttle.acquire(now)
    with pytest.raises(ValueError, match="now must be a finite number"):
        HubThrottles(None).acquire(OP.D2C_SEND, now)


def test_bad_throttle_parameters_are_refused():
    with pytest.raises(ValueError, match="rate"):
        Throttle(OP.D2C_SEND, 0)
    with pytest.raises(ValueError, match="cost"):
        Throttle(OP.D2C_SEND, 1).acquire(0.0, cost=-1)
    with pytest.raises(ValueError, match="max_queue_delay"):
        Shaping(max_queue_delay=math.nan)


def test_clock_going_backwards_only_lengthens_waits():
    throttle = Throttle(OP.D2C_SEND, 1, shaping=Shaping(burst_seconds=1, max_queue_delay=10))
    assert throttle.acquire(100.0) is ADMIT
    verdict = throttle.acquire(99.0)
    assert isinstance(verdict, Delay) and verdict.seconds == pytest.approx(2.0)
