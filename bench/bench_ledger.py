#!/usr/bin/env python3
"""What the delivery ledger costs a long session: memory per stored message beyond its body,
the longest garbage-collector pause while recording, and how long a test's delivery assertion
takes when the session's ledger already holds many earlier messages.

Run `python bench/bench_ledger.py [--messages 1000000]`. A script, not a test: it prints figures and
exits 0 unless something broke. It records the way the hub does (`record_message` where the ledger
has it, else `record(Telemetry(...))`), so the same script measures an older ledger too.
"""
import argparse
import gc
import sys
import time
import tracemalloc
import uuid

from pytest_iotfailover.iothub.ledger import Telemetry
from pytest_iotfailover.waiting import WaitingLedger

BODY = b"x" * 200


def _fields(i: int, device_id: str) -> tuple:
    mid = str(uuid.UUID(int=i))
    # what the hub stores for an SDK message: its system properties plus the hub's own
    sysprops = {"message_id": mid, "content_type": "application/json", "content_encoding": "utf-8",
                "connection_device_id": device_id, "connection_auth_method": '{"scope":"device","type":"sas"}'}
    return device_id, mid, bytes(BODY), {"seq": str(i % 7)}, sysprops, 1.7e9 + i * 1e-4


def _recorder(ledger):
    fast = getattr(ledger, "record_message", None)
    if fast is not None:
        return lambda f: fast(f[0], f[1], f[2], f[3], f[4], f[5], False, 1)
    return lambda f: ledger.record(Telemetry(f[0], f[1], f[2], f[3], f[4], f[5], False, False, 1))


def bytes_per_message(n: int) -> float:
    """Bytes the ledger keeps per message, not counting the body (all messages share one body
    object here, so only what the ledger adds is traced: its record, the id string, the property
    bags as the ledger keeps them, its indices)."""
    ledger = WaitingLedger()
    record = _recorder(ledger)
    devices = [f"device-{d}" for d in range(100)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        record(_fields(i, devices[i % 100]))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


def _full_collection(repeat: int = 5) -> float:
    """The shortest of `repeat` full collections, in this thread's CPU time: what the process's own
    objects cost the collector, without the time the scheduler gave to other processes."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        gc.collect()
        best = min(best, time.thread_time() - t0)
    return best


def gc_pauses(n: int) -> dict[str, float]:
    """The longest pause while recording `n` messages, and full collections of this same process
    before the ledger exists, with it, and after it is dropped: the difference is the ledger's."""
    baseline = _full_collection()
    ledger = WaitingLedger()
    record = _recorder(ledger)
    pauses: list[float] = []
    cpu: list[float] = []
    started = [0.0, 0.0]

    # wall time is what every connection waits; this thread's CPU time tells the collector's own
    # work from time the scheduler gave to other processes (the machine is shared)
    def on_gc(phase, info):
        if phase == "start":
            started[0], started[1] = time.perf_counter(), time.thread_time()
        else:
            pauses.append(time.perf_counter() - started[0])
            cpu.append(time.thread_time() - started[1])
    gc.callbacks.append(on_gc)
    try:
        for i in range(n):
            record(_fields(i, f"device-{i % 100}"))
    finally:
        gc.callbacks.remove(on_gc)
    with_ledger = _full_collection()
    del ledger, record
    dropped = _full_collection()
    longest = max(range(len(pauses)), key=pauses.__getitem__)
    return {"longest": pauses[longest], "longest_cpu": cpu[longest], "most_cpu": max(cpu),
            "collections": len(pauses), "baseline": baseline, "with_ledger": with_ledger, "dropped": dropped}


def full_collection_with_imports() -> float:
    """A full collection in a process that has also imported what a pytest run with the plugin
    does (the device SDK, the hub, the assertions): the floor under any ledger."""
    import azure.iot.device  # noqa: F401

    import pytest_iotfailover.backends.fake
    import pytest_iotfailover.testing.assertions  # noqa: F401
    return _full_collection()


def assertion_after(n: int, sent: int = 100) -> float:
    from pytest_iotfailover.backends.fake import FakeBackend
    from pytest_iotfailover.testing.assertions import assert_all_delivered
    from pytest_iotfailover.testing.view import HubView
    backend = FakeBackend("benchhub")
    try:
        record = _recorder(backend.fakehub.ledger)
        for i in range(n):
            record(_fields(i, f"earlier-{i % 100}"))
        view = HubView(backend, "bench")
        dev = view.add_device()
        ids = []
        for i in range(sent):
            f = _fields(n + i, dev.device_id)
            record(f)
            ids.append(f[1])
        t0 = time.perf_counter()
        assert_all_delivered(view, ids, timeout=30)
        took = time.perf_counter() - t0
        view.close()
        return took
    finally:
        backend.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--memory-messages", type=int, default=100_000,
                    help="messages for the memory figure (tracemalloc is slow)")
    args = ap.parse_args()
    print(f"ledger overhead: {bytes_per_message(args.memory_messages):.0f} B per message beyond its "
          f"{len(BODY)}-byte body")
    g = gc_pauses(args.messages)
    # the interpreter runs a full collection only when enough objects survived, which 1 M untracked
    # records may not trigger during the run: the forced one at 1 M is the pause any later full
    # collection would take, so the target is on the longer of the two. Collector CPU time, as on
    # a shared machine a wall-clock pause also holds whatever ran on the core meanwhile.
    worst = max(g["most_cpu"], g["with_ledger"])
    print(f"gc while recording {args.messages:,} messages: {g['collections']} automatic collections, "
          f"the longest {g['longest'] * 1000:.1f} ms wall ({g['longest_cpu'] * 1000:.1f} ms of it CPU), "
          f"the most CPU in one {g['most_cpu'] * 1000:.1f} ms")
    print(f"full collection at {args.messages:,} messages: {g['with_ledger'] * 1000:.1f} ms CPU; without "
          f"the ledger {g['baseline'] * 1000:.1f} ms before it existed, {g['dropped'] * 1000:.1f} ms after "
          f"dropping it; the ledger's share {(g['with_ledger'] - g['baseline']) * 1000:.1f} ms")
    print(f"longest collector pause {worst * 1000:.1f} ms CPU (target <= 20 ms)")
    took = assertion_after(args.messages)
    print(f"assert_all_delivered on 100 messages after {args.messages:,} earlier: {took:.3f} s")
    print(f"for scale: a full collection in a process that also imported the device SDK and the hub, "
          f"as a pytest run does, {full_collection_with_imports() * 1000:.1f} ms with no ledger at all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
