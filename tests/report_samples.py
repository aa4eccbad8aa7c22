"""Synthetic run reports shaped like the ones `--iothub-report` writes, for the schema, timeline and bench.

One test runs `devices` devices that send `messages` telemetry messages in total over ~12 s; a regional
failover takes the hub away for 2 s in the middle. What happens to each device is drawn from a seeded
random generator, so a given (devices, messages, seed) always gives the same report, and every case the
timeline draws appears: refused reconnects, re-sent messages, duplicates from lost acknowledgements,
messages acknowledged and then lost in the failover, one device that never came back (its queued
messages lost), and a throttle on one device that never disconnected it.
"""
import copy
import math
import random
from typing import Any

T0 = 1_780_000_000.0  # a fixed epoch second keeps reports reproducible
DURATION = 12.0
FAIL_AT, FAIL_FOR = 5.0, 2.0


def _p99(values):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def make_report(devices: int = 20, messages: int = 1000, seed: int = 1,
                device_prefix: str = "device-", outcome: str = "passed") -> dict[str, Any]:
    rnd = random.Random(seed)
    start, end = T0, T0 + DURATION
    f_start, f_end = T0 + FAIL_AT, T0 + FAIL_AT + FAIL_FOR
    thr_start, thr_end = T0 + 9.0, T0 + 10.5
    ids = [f"{device_prefix}{i:03d}" for i in range(devices)]
    stuck = ids[-1] if devices > 2 else None          # never reconnects
    throttled = ids[min(3, devices - 1)]
    per_device = [messages // devices + (1 if i < messages % devices else 0) for i in range(devices)]

    lanes, recovery, latencies, downtimes = [], [], [], []
    totals = {"sent": 0, "delivered": 0, "duplicates": 0, "lost": 0, "lost_in_failover": 0, "in_flight": 0}
    for dev, n in zip(ids, per_device):
        detected = f_start + rnd.uniform(0.005, 0.3)
        back = None if dev == stuck else f_end + rnd.uniform(0.05, 0.9)
        states = [{"state": "connected", "from": start + 0.05, "to": f_start, "reason": "connect"}]
        t = f_start
        if rnd.random() < 0.4:  # some attempts land while the region is refusing
            r_at = f_start + rnd.uniform(0.2, 1.0)
            states.append({"state": "reconnecting", "from": t, "to": r_at, "reason": "connection_lost"})
            states.append({"state": "refused", "from": r_at, "to": r_at + 0.4, "reason": "CONNACK 3"})
            t = r_at + 0.4
        states.append({"state": "reconnecting", "from": t, "to": back, "reason": "connection_lost"})
        if back is not None:
            if dev == throttled:
                states.append({"state": "connected", "from": back, "to": thr_start})
                states.append({"state": "throttled", "from": thr_start, "to": thr_end, "reason": "throttle"})
                states.append({"state": "connected", "from": thr_end, "to": None})
            else:
                states.append({"state": "connected", "from": back, "to": None})
        downtime = None if back is None else back - f_start
        if downtime is not None:
            downtimes.append(downtime)
        recovery.append({"device_id": dev, "status": "recovered" if back is not None else "not_recovered",
                         "disconnected_at": f_start, "detected_at": detected, "reconnected_at": back,
                         "downtime": downtime})

        msgs: list[dict[str, Any]] = []
        for k in range(n):
            sent = start + 0.1 + (DURATION - 0.4) * (k + rnd.random()) / max(n, 1)
            m: dict[str, Any] = {"id": f"{dev}/m{k:05d}", "sent": [sent], "acked": None, "delivered": None,
                                 "duplicates": [], "fate": "delivered"}
            if f_start <= sent < (back if back is not None else end):
                if back is None:
                    m["fate"] = "lost"
                else:  # the outbox keeps it and sends it again once connected
                    retry = back + rnd.uniform(0.01, 0.2)
                    m["sent"].append(retry)
                    m["acked"] = retry + rnd.uniform(0.002, 0.03)
                    m["delivered"] = m["acked"] + rnd.uniform(0.001, 0.01)
            elif f_start - 0.3 <= sent < f_start and rnd.random() < 0.5:
                # accepted just before the failover, but the backend had not read it yet (RPO)
                m["acked"] = sent + rnd.uniform(0.002, 0.02)
                m["fate"], m["lost_at"] = "lost_in_failover", f_start
            else:
                m["acked"] = sent + rnd.uniform(0.002, 0.03) + (0.3 if dev == throttled
                                                                 and thr_start <= sent < thr_end else 0)
                m["delivered"] = m["acked"] + rnd.uniform(0.001, 0.01)
                if f_start - 0.6 <= sent < f_start - 0.3 and back is not None and rnd.random() < 0.5:
                    # acknowledgement lost with the connection: the re-send is a second copy
                    m["sent"].append(back + 0.01)
                    m["duplicates"].append(back + 0.02)
            if m["acked"] is not None:
                latencies.append(m["acked"] - m["sent"][0])
            totals["sent"] += 1
            if m["fate"] == "delivered":
                totals["delivered"] += 1
            else:
                totals["lost"] += 1
                totals["lost_in_failover"] += m["fate"] == "lost_in_failover"
            totals["duplicates"] += len(m["duplicates"])
            msgs.append(m)
        lanes.append({"device_id": dev, "states": states, "messages": msgs})

    recovered = [r for r in recovery if r["status"] == "recovered"]
    figures = {
        "outage": FAIL_FOR,
        "time_to_detect": max(r["detected_at"] for r in recovery) - f_start,
        "time_to_recover": (max(r["reconnected_at"] for r in recovered) - f_end) if recovered else None,
        "downtime_max": max(downtimes) if downtimes else None,
        "downtime_p99": _p99(downtimes),
        "devices": devices, "devices_disconnected": devices, "devices_recovered": len(recovered),
        "lost": totals["lost"], "lost_in_failover": totals["lost_in_failover"],
        "duplicates": totals["duplicates"],
        "duplicates_pct": 100.0 * totals["duplicates"] / max(totals["delivered"], 1),
        "latency_p99": _p99(latencies), "throttled_time": 0.0,
        "messages_before": sum(1 for d in lanes for m in d["messages"] if m["sent"][0] < f_start),
        "messages_during": sum(1 for d in lanes for m in d["messages"] if f_start <= m["sent"][0] < f_end),
        "messages_after": sum(1 for d in lanes for m in d["messages"] if m["sent"][0] >= f_end),
    }
    throttle_figures = {k: (0 if isinstance(v, int) else None) for k, v in figures.items()}
    throttle_figures.update(outage=thr_end - thr_start, throttled_time=thr_end - thr_start, devices=1,
                            latency_p99=0.31, duplicates_pct=0.0)
    faults = [
        {"id": 1, "kind": "region_failover", "target": None,
         "params": {"outage": FAIL_FOR, "keep_sessions": False, "refuse": "connack"},
         "started_at": f_start, "ended_at": f_end, "cancelled": False, "figures": figures, "recovery": recovery},
        {"id": 2, "kind": "throttle", "target": throttled, "params": {"rate": 5.0, "seconds": 1.5, "burst": 1},
         "started_at": thr_start, "ended_at": thr_end, "cancelled": False, "figures": throttle_figures,
         "recovery": [{"device_id": throttled, "status": "never_disconnected", "disconnected_at": None,
                       "detected_at": None, "reconnected_at": None, "downtime": None}]},
    ]
    slos = [
        {"name": "recover within 5 s", "metric": "time_to_recover", "comparison": "<=", "objective": 5.0,
         "measured": figures["time_to_recover"], "unit": "s", "fault": 1,
         "ok": figures["time_to_recover"] is not None and figures["time_to_recover"] <= 5.0},
        {"name": "no message lost", "metric": "lost", "comparison": "==", "objective": 0,
         "measured": totals["lost"], "unit": "", "fault": None, "ok": totals["lost"] == 0},
        {"name": "duplicates under 5 %", "metric": "duplicates_pct", "comparison": "<", "objective": 5.0,
         "measured": figures["duplicates_pct"], "unit": "%", "fault": 1, "ok": figures["duplicates_pct"] < 5.0},
    ]
    test = {
        "nodeid": f"tests/test_resilience.py::test_region_failover[{devices}-devices]",
        "outcome": outcome, "started_at": start, "ended_at": end, "worker": "gw0",
        "faults": faults, "devices": lanes,
        "delivery": {**totals, "latency_p50": sorted(latencies)[len(latencies) // 2] if latencies else None,
                     "latency_p99": _p99(latencies), "latency_max": max(latencies) if latencies else None},
        "slos": slos,
        "baseline": {"source": "baseline.json", "results": [
            {"metric": "time_to_recover", "baseline": 1.2, "measured": figures["time_to_recover"],
             "tolerance": 0.2, "regressed": (figures["time_to_recover"] or 0) > 1.2 * 1.2},
            {"metric": "lost", "baseline": 0, "measured": totals["lost"], "tolerance": 0.0,
             "regressed": totals["lost"] > 0}]},
    }
    quiet = {"nodeid": "tests/test_resilience.py::test_connects", "outcome": "passed",
             "started_at": start - 1.0, "ended_at": start - 0.5, "worker": "gw1", "faults": [], "devices": [],
             "delivery": None, "slos": []}
    return {
        "schema_version": 1,
        "run": {"backend": "fake", "hub_name": "testhub", "hub_tier": "fake", "plugin_version": "0.0.0",
                "sdk_version": "2.14.0", "python_version": "3.11.7", "pytest_version": "8.3.0",
                "started_at": start - 2.0, "ended_at": end + 1.0, "workers": 2,
                "options": {"iothub_outage": 2.0, "iothub_keep_alive": 5}},
        "tests": [quiet, test],
    }


def clone(report):
    return copy.deepcopy(report)


def outboxed(report, seed: int = 2, pending_tail: int = 3):
    """`report` as the plugin writes it when every message went through an Outbox: each has the time
    the application submitted it (a little before the hub saw it) and the Outbox's state; a re-sent
    message's first attempt is a failure, not an arrival; the device that never came back holds its
    messages unacknowledged: given up when its Outbox closed, except the last `pending_tail`, still
    pending in an open Outbox when the test ended. Each message has the start of every attempt and,
    once acknowledged, when the device got the acknowledgement."""
    doc = clone(report)
    rnd = random.Random(seed)
    for test in doc["tests"]:
        for lane in test["devices"]:
            never = [m for m in lane["messages"] if m["fate"] == "lost"]
            still = {id(m) for m in never[-pending_tail:]} if pending_tail else set()
            for m in lane["messages"]:
                first = m["sent"][0]
                m["submitted"] = first - rnd.uniform(0.0, 0.02)
                m["outbox"] = "outbox-1"
                m["failures"] = []
                if len(m["sent"]) > 1 and not m["duplicates"]:  # retried after the outage: one arrival
                    m["failures"] = [first + 0.05 * k for k in range(1, 3)]
                    m["sent"] = m["sent"][1:]
                if m["fate"] == "lost":
                    m["outbox_state"] = "pending"
                    m["sent"] = [m["submitted"]]
                    m["failures"] = [m["submitted"] + 0.1]
                    if id(m) in still:
                        m["fate"] = "in_flight"
                else:
                    m["outbox_state"] = "acknowledged"
                    # the PUBACK reaches the device a moment after the hub acknowledged (on arrival)
                    m["device_acked"] = m["sent"][0] + rnd.uniform(0.001, 0.01)
                # each attempt starts just after the submit, then after each failure's backoff; the one
                # that got through just before its arrival, once the hub was back
                m["attempts"] = [m["submitted"] + 0.0005] + [f + 0.01 for f in m["failures"]]
                if m["fate"] == "lost":
                    m["attempts"] = m["attempts"][:1]  # the last failure's retry never started
                elif m["failures"]:
                    m["attempts"][-1] = max(m["attempts"][-1], m["sent"][0] - 0.003)
                m["attempt_count"] = len(m["attempts"])
    return doc
