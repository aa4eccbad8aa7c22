"""The delivery ledger's compact store (indices, marks, views, GC) and waits that wake on their own
condition rather than at their timeout."""
import gc
import threading

import pytest
from sdk_support import bounded, make_client

from pytest_iotfailover.backends.fake import FakeBackend
from pytest_iotfailover.iothub.ledger import Ledger, Telemetry
from pytest_iotfailover.testing.view import HubView
from pytest_iotfailover.waiting import Pulse, WaitingLedger

pytestmark = pytest.mark.timeout(60)


def _sysprops(mid, dev):
    return {"message_id": mid, "content_type": "application/json", "connection_device_id": dev,
            "connection_auth_method": "sas"}


def _fill(ledger, n=6):
    for i in range(n):
        dev = "a" if i % 2 == 0 else "b"
        ledger.record_message(dev, f"m{i}", b"body%d" % i, {"seq": str(i)}, _sysprops(f"m{i}", dev), 100.0 + i)


def test_records_read_back_as_they_were_given():
    ledger = Ledger()
    t = ledger.record(Telemetry("d", "m1", b"hi", {"k": "v", "nul\x00key": "x"}, _sysprops("m1", "d"),
                                5.0, dup=True, qos=0))
    assert t.duplicate is False
    [back] = ledger.items()
    assert back == Telemetry("d", "m1", b"hi", {"k": "v", "nul\x00key": "x"}, _sysprops("m1", "d"),
                             5.0, dup=True, duplicate=False, qos=0, lost_in_failover=False)
    # a real hub's endpoint can hand over non-string values: kept as they are
    ledger.record(Telemetry("d", None, b"", {"n": 3}, {"message_id": "other"}))  # type: ignore[dict-item]
    assert ledger.items()[1].properties == {"n": 3}
    assert ledger.items()[1].system_properties == {"message_id": "other"}


def test_equal_property_bags_are_stored_once_and_read_back_in_their_own_order():
    from pytest_iotfailover.iothub import ledger as ledger_module
    ledger = Ledger()
    for i in range(3):
        ledger.record_message("d", f"m{i}", b"", {"a": "1", "b": "2"}, _sysprops(f"m{i}", "d"), 1.0)
    ledger.record_message("d", "m3", b"", {"b": "2", "a": "1"}, _sysprops("m3", "d"), 1.0)
    rows = [ledger._row(i) for i in range(4)]
    assert rows[0][3] is rows[1][3] is rows[2][3] and rows[0][4] is rows[2][4]
    assert list(ledger.items()[3].properties) == ["b", "a"]
    # more distinct bags than the cache holds: every record still reads back as given
    n = ledger_module._BLOB_CACHE_MAX + 10
    for i in range(n):
        ledger.record_message("e", None, b"", {"seq": str(i)}, {"content_type": str(i % 3)}, 2.0)
    back = ledger.items(device_id="e")
    assert [t.properties for t in back] == [{"seq": str(i)} for i in range(n)]
    assert [t.system_properties for t in back] == [{"content_type": str(i % 3)} for i in range(n)]


def test_indices_by_device_and_message_id():
    ledger = Ledger()
    _fill(ledger)
    ledger.record_message("a", "m0", b"again", {}, {}, 200.0)
    assert [t.message_id for t in ledger.items("a")] == ["m0", "m2", "m4", "m0"]
    assert [t.duplicate for t in ledger.items("a")] == [False, False, False, True]
    assert [t.message_id for t in ledger.items(device_ids=["b", "a"])] == \
        ["m0", "m1", "m2", "m3", "m4", "m5", "m0"]
    assert [t.message_id for t in ledger.items("b", since=2)] == ["m3", "m5"]
    assert [t.message_id for t in ledger.items(since=5)] == ["m5", "m0"]
    assert ledger.first_index("a", "m0") == 0 and ledger.first_index("a", "m1") is None
    assert set(ledger.message_ids("b")) == {"m1", "m3", "m5"}
    assert (ledger.count(), ledger.count("a"), ledger.count("nobody")) == (7, 4, 0)
    assert ledger.items("nobody") == [] and ledger.items(device_ids=[]) == []


def test_mark_lost_in_failover_window_devices_and_views():
    ledger = Ledger()
    _fill(ledger)   # enqueued at 100..105
    assert ledger.mark_lost_in_failover(101.0, 104.0, ["b"]) == 2      # m1, m3: half-open window
    assert ledger.mark_lost_in_failover(101.0, 104.0, ["b"]) == 0      # marking twice counts once
    assert ledger.mark_lost_in_failover(104.0, 200.0, None) == 2       # m4, m5
    assert [t.message_id for t in ledger.items() if t.lost_in_failover] == ["m1", "m3", "m4", "m5"]
    assert [t.message_id for t in ledger.items(include_lost=False)] == ["m0", "m2"]
    assert ledger.count(include_lost=False) == 2 and ledger.count("b", include_lost=False) == 0
    assert len(ledger.items()) == 6   # nothing is removed
    # records after the last one marked are not lost, nor is one marked later out of order
    _fill(ledger, 2)
    assert [t.lost_in_failover for t in ledger.items(since=5)] == [True, False, False]
    assert ledger.mark_lost_in_failover(100.0, 101.0, ["a"]) == 2      # m0 of both fills
    assert [t.message_id for t in ledger.items(include_lost=False)] == ["m2", "m1"]


def test_stored_records_are_not_tracked_by_the_gc():
    ledger = Ledger()
    _fill(ledger, 50)
    gc.collect()
    assert not any(gc.is_tracked(ledger._row(i)) for i in range(len(ledger)))
    assert not any(gc.is_tracked(d) for d in ledger._first.values())


def _visited_by_gc(root: object) -> int:
    """How many references a full collection follows inside the tracked objects reachable from `root`."""
    seen, todo, visits = set(), [root], 0
    while todo:
        o = todo.pop()
        if id(o) in seen or not gc.is_tracked(o):
            continue
        seen.add(id(o))
        refs = gc.get_referents(o)
        visits += len(refs)
        todo.extend(r for r in refs if not isinstance(r, type))
    return visits


def test_what_the_gc_walks_does_not_grow_with_the_ledger():
    from pytest_iotfailover.iothub.ledger import _CHUNK
    small, big = Ledger(), Ledger()
    _fill(small, 100)
    _fill(big, 8 * _CHUNK + 100)    # the same partly filled last chunk, eight full ones before it
    # a collection may meet a newly frozen chunk before the rows in it, which it untracks in the same
    # pass: the chunk itself goes at the next collection
    gc.collect()
    gc.collect()
    assert _visited_by_gc(big) - _visited_by_gc(small) <= 8    # a pointer per chunk, not per message


def test_wait_until_sees_a_condition_no_hub_change_signals():
    """The flag is set on another thread without touching the ledger: the periodic re-check sees it."""
    ledger = WaitingLedger()
    flag = threading.Event()
    too_late = threading.Event()
    timer = threading.Timer(30, too_late.set)
    timer.start()
    try:
        threading.Thread(target=flag.set).start()
        assert ledger.wait_until(flag.is_set, timeout=30)
        assert not too_late.is_set()
    finally:
        timer.cancel()


def test_predicates_run_outside_the_recording_lock():
    ledger = WaitingLedger()
    recorded = []

    def predicate():
        # a predicate that records (as a test's own code may) must not deadlock the hub
        t = threading.Thread(target=lambda: recorded.append(ledger.record(Telemetry("d", "x", b""))))
        t.start()
        t.join(10)
        return bool(recorded)
    assert ledger.wait_until(predicate, timeout=10)


def test_events_and_records_share_one_pulse():
    pulse = Pulse()
    ledger = WaitingLedger(pulse)
    seen = pulse.generation
    ledger.record_message("d", "m", b"", {}, {}, 0.0)
    assert pulse.generation > seen


@pytest.fixture(scope="module")
def backend():
    b = FakeBackend("ledgerhub")
    yield b
    b.close()


def test_view_wait_wakes_on_a_c2d_callback(backend):
    """A wait on something only the device sees (its C2D handler ran) returns when it happens."""
    view = HubView(backend, "c2d-wait")
    dev = view.add_device()
    client = make_client(backend.fakehub, dev)
    got = threading.Event()
    too_late = threading.Event()
    timer = threading.Timer(40, too_late.set)
    try:
        client.on_message_received = lambda m: got.set()
        bounded(client.connect)
        timer.start()
        view.send_c2d(dev.device_id, "ping")
        assert view.wait_until(got.is_set, timeout=40)
        assert not too_late.is_set()
    finally:
        timer.cancel()
        bounded(client.shutdown)
        view.close()


def test_hub_telemetry_leaves_out_what_a_failover_lost(backend):
    hub = backend.fakehub
    view = HubView(backend, "lost-view")
    dev = view.add_device()
    try:
        start = len(hub.ledger)
        for i in range(3):
            hub.ledger.record_message(dev.device_id, f"x{i}", b"", {}, {}, 1000.0 + i)
        assert hub.ledger.mark_lost_in_failover(1001.0, 1002.0, [dev.device_id]) == 1
        assert [t.message_id for t in view.telemetry()] == ["x0", "x2"]
        assert [t.message_id for t in hub.telemetry(dev.device_id)] == ["x0", "x2"]
        assert len(hub.telemetry(dev.device_id, include_lost=True)) == 3
        assert len(hub.ledger.items(since=start)) == 3
        assert len(hub.wait_for_telemetry(2, dev.device_id, timeout=5)) == 2
    finally:
        view.close()


def test_fakehub_raises_the_soft_descriptor_limit_to_the_hard_one():
    import subprocess
    import sys
    code = ("import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "if hard == resource.RLIM_INFINITY or hard > 4096:\n"
            "    hard = 4096\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "from pytest_iotfailover import FakeHub\n"
            "with FakeHub('fdhub'):\n"
            "    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
