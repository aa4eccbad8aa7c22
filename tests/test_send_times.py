"""The Outbox's per-message send times: attempt starts kept within a fixed bound, the first
acknowledgement kept, several acceptances of one id merged, and a copy that does not move."""
from pytest_iotfailover.devices.send_times import ATTEMPTS_KEPT, SendTimes, merged


def test_a_message_never_attempted_has_no_times():
    times = SendTimes()
    times.add()
    t = times.of(0)
    assert (t.attempts, t.attempt_count, t.acked_at) == ((), 0, None)


def test_attempts_keep_the_first_and_the_latest_and_count_them_all():
    times = SendTimes()
    times.add()
    times.add()
    for k in range(100):
        times.attempt(1, 1000.0 + k)
    times.attempt(0, 5.0)
    t = times.of(1)
    assert t.attempt_count == 100 and len(t.attempts) == ATTEMPTS_KEPT
    assert t.attempts[0] == 1000.0
    assert list(t.attempts[1:]) == [1000.0 + k for k in range(100 - (ATTEMPTS_KEPT - 1), 100)]
    assert times.of(0).attempts == (5.0,) and times.of(0).attempt_count == 1


def test_the_first_acknowledgement_is_kept():
    times = SendTimes()
    times.add()
    times.attempt(0, 1.0)
    times.acked(0, 2.0)
    times.attempt(0, 3.0)   # sent again (replay=), or an abandoned call finishing late
    times.acked(0, 4.0)
    t = times.of(0)
    assert t.acked_at == 2.0 and t.attempts == (1.0, 3.0) and t.attempt_count == 2


def test_a_copy_is_frozen():
    times = SendTimes()
    times.add()
    times.attempt(0, 1.0)
    times.attempt(0, 2.0)
    frozen = times.copy()
    times.attempt(0, 3.0)
    times.acked(0, 4.0)
    times.add()
    assert len(frozen) == 1 and len(times) == 2
    assert frozen.of(0).attempts == (1.0, 2.0) and frozen.of(0).acked_at is None


def test_one_id_accepted_twice_is_one_message():
    times = SendTimes()
    for _ in range(2):
        times.add()
    times.attempt(0, 1.0)
    times.attempt(1, 1.5)
    times.acked(1, 1.7)
    for k in range(20):
        times.attempt(0, 2.0 + k)
    t = merged([times.of(0), times.of(1)])
    assert t.acked_at == 1.7 and t.attempt_count == 22
    assert len(t.attempts) == ATTEMPTS_KEPT and t.attempts[0] == 1.0
    assert list(t.attempts) == sorted(t.attempts) and t.attempts[-1] == 21.0


def test_the_report_schema_allows_as_many_attempts_as_are_kept():
    import json
    from importlib import resources
    schema = json.loads(resources.files("pytest_iotfailover.plugin").joinpath("report_schema.json").read_text())
    assert schema["$defs"]["message"]["properties"]["attempts"]["maxItems"] == ATTEMPTS_KEPT


def test_each_reads_what_of_reads():
    times = SendTimes()
    for _ in range(4):
        times.add()
    times.attempt(1, 1.0)
    for k in range(15):
        times.attempt(2, 2.0 + k)
    times.acked(2, 30.0)
    times.acked(3, 31.0)  # an acknowledgement without a recorded start cannot happen, but reads safely
    assert list(times.each()) == [(t.attempts, t.attempt_count, t.acked_at) for t in map(times.of, range(4))]
