#!/usr/bin/env python3
"""A fleet of real azure-iot-device clients through one region failover, hub in its own process.

For each client count, this starts the standalone hub (`iotfailover-hub`, via
`fakehub.process.StandaloneHub`), registers one device per client, and runs a `FleetRunner`: that
many unmodified sync `IoTHubDeviceClient`s in spawned worker processes of at most
`--per-process` each, every one sending `--rate` messages per second. Once every client is
connected and has sent for `--settle` seconds, the hub fails over for `--outage` seconds; the
script waits until every client has seen its connection come back and prints, per run:

* time to recover, p50 / p99 / last: per device, from the end of the outage (hub clock) to the
  moment its client reported itself connected again (`on_connection_state_change`);
* hub CPU and client CPU over the storm (fault start until the script saw the last client back),
  as a share of one core, from /proc; the clients' figure is the sum over the worker processes,
  with the busiest one beside it;
* wedged clients (network thread dead while the SDK says connected) that were replaced;
* whether every acknowledged message id is in the hub's ledger (read through the control API);
* with a tier (`--tiers S1`, one unit by default; `unthrottled` is `--tier none`): how often its
  throttles acted (`throttled` events) and the longest a reconnect waited in the shaping queue.

Run `python bench/bench_fleet.py --help`; bench/README.md ("Fleet benchmark") explains the
figures. A script, not a test: exit 0 when every run completed with every client back and no
acknowledged message missing from the ledger, 1 otherwise.
"""
import argparse
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a source checkout works without installing

from pytest_iotfailover.devices.fleet import DEFAULT_PER_PROCESS, FleetRunner, fleet_device_ids, percentile
from pytest_iotfailover.fakehub.process import StandaloneHub, hub_supports_option
from pytest_iotfailover.iothub.tiers import Tier

# The retry interval's floor in the SDK is 1 s (bench/README.md "Recovery benchmark").
CLIENT_KWARGS = {"keep_alive": 5, "connection_retry_interval": 1}
_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "-"


def cpu_snapshot(hub: StandaloneHub, fleet: FleetRunner) -> dict[str, Any]:
    return {"at": time.monotonic(), "hub": hub.cpu_seconds() or 0.0, "workers": fleet.cpu_seconds()}


def cpu_shares(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    wall = max(after["at"] - before["at"], 1e-6)
    workers = [((after["workers"].get(pid) or 0.0) - (cpu or 0.0)) / wall
               for pid, cpu in before["workers"].items()]
    return {"wall": wall, "hub": (after["hub"] - before["hub"]) / wall, "clients": sum(workers),
            "busiest": max(workers, default=0.0), "per_process": workers}


def run_once(count: int, args: argparse.Namespace, hub_args: list[str]) -> dict[str, Any]:
    load_before = loadavg()
    with StandaloneHub(*hub_args, devices=fleet_device_ids(count)) as hub:
        fleet = FleetRunner(hub.fleet_info(), count, rate=args.rate, per_process=args.per_process,
                            client_kwargs=CLIENT_KWARGS)
        try:
            started = time.monotonic()
            fleet.start()
            fleet.wait_connected(timeout=args.connect_timeout)
            progress(f"{count} clients in {len(fleet.pids)} processes connected in "
                     f"{time.monotonic() - started:.1f} s")
            time.sleep(args.settle)  # steady traffic before the fault: the bench's pacing
            before = cpu_snapshot(hub, fleet)
            fault = hub.start_fault("region_failover", outage=args.outage)
            done = hub.wait_fault(fault["id"], timeout=args.outage + 60)
            report = fleet.wait_recovered(done["started_at"], timeout=args.timeout, poll=0.5)
            after = cpu_snapshot(hub, fleet)
            time.sleep(1.0)  # a second of traffic after the storm, so re-sent messages settle
        finally:
            final = fleet.stop(timeout=30)
        missing = hub.missing_from_ledger(sorted(final.acknowledged_ids())) if final else ["no report"]
        # the report as the fault ended has no reconnects yet: read it again now they are done
        throttled = throttling(hub, hub.request("GET", f"/faults/{fault['id']}", timeout=120))
    recovery = report.recovery(done["started_at"], done["ended_at"])
    times = [t for t in recovery.values() if t is not None]
    return {"count": count, "processes": len(fleet.pids), "outage": done["ended_at"] - done["started_at"],
            "p50": percentile(times, 50), "p99": percentile(times, 99), "last": max(times, default=None),
            "back": len(times), "wedged": final.wedged if final else None,
            "acked": len(final.acknowledged_ids()) if final else 0, "missing": len(missing),
            "cpu": cpu_shares(before, after), "load_before": load_before, "load_after": loadavg(),
            "deaths": thread_deaths(final.workers if final else []), **throttled}


def throttling(hub: StandaloneHub, done: dict[str, Any]) -> dict[str, Any]:
    """What the tier's throttles did: `throttled` events (refused connects, sends closed unacknowledged,
    429s) over the whole run, and the longest a reconnect waited in the shaping queue."""
    events = hub.request("GET", "/events?kind=throttled", timeout=120)
    devices = (done.get("report") or {}).get("devices") or {}
    waits = [float(d.get("throttled") or 0.0) for d in devices.values()]
    return {"throttle_events": len(events), "throttle_wait": max(waits, default=0.0)}


def thread_deaths(workers: list) -> str:
    """Uncaught exceptions that ended SDK threads, by type: what wedged the wedged clients."""
    kinds: dict[str, int] = {}
    for w in workers:
        for text in w.thread_deaths:
            # "<time> <thread name>: <type>: <message>"
            kind = text.split(": ", 2)[1] if text.count(": ") >= 1 else text
            kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"


def fmt(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


HEADER = (f"{'tier':<11} {'clients':>7} {'procs':>5} {'outage':>7} {'p50':>7} {'p99':>7} {'last':>7} "
          f"{'back':>9} {'wedged':>6} {'hub CPU':>7} {'clients CPU':>11} {'busiest':>7} {'ratio':>5} "
          f"{'acked':>7} {'missing':>7} {'throttled':>9} {'queued':>6}  load before/after")


def row(tier: str, r: dict[str, Any]) -> str:
    cpu = r["cpu"]
    ratio = cpu["clients"] / cpu["hub"] if cpu["hub"] > 0 else float("nan")
    return (f"{tier:<11} {r['count']:>7} {r['processes']:>5} {fmt(r['outage']):>7} {fmt(r['p50']):>7} "
            f"{fmt(r['p99']):>7} {fmt(r['last']):>7} {r['back']:>4}/{r['count']:<4} {r['wedged']:>6} "
            f"{cpu['hub'] * 100:>6.0f}% {cpu['clients'] * 100:>10.0f}% {cpu['busiest'] * 100:>6.0f}% "
            f"{ratio:>5.1f} {r['acked']:>7} {r['missing']:>7} {r['throttle_events']:>9} "
            f"{fmt(r['throttle_wait']):>6}  {r['load_before']} / {r['load_after']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="100,500,1000", help="comma-separated client counts (default: %(default)s)")
    p.add_argument("--tiers", default="unthrottled,S1",
                   help="comma-separated: unthrottled (the hub's --tier none) and/or IoT Hub tier names "
                        "(Free, B1-B3, S1-S3) whose throttles the hub enforces (default: %(default)s)")
    p.add_argument("--tier-units", type=int, default=1, metavar="UNITS",
                   help="units of each named tier (default: %(default)s)")
    p.add_argument("--outage", type=float, default=2.0, help="region failover outage, s (default: %(default)g)")
    p.add_argument("--rate", type=float, default=1.0, help="messages per second per client (default: %(default)g)")
    p.add_argument("--per-process", type=int, default=DEFAULT_PER_PROCESS,
                   help="clients per worker process (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="runs per count and tier (default: %(default)s)")
    p.add_argument("--settle", type=float, default=3.0, help="steady sending before the fault, s (default: %(default)g)")
    p.add_argument("--connect-timeout", type=float, default=300.0, help="for every client to connect, s")
    p.add_argument("--timeout", type=float, default=120.0, help="for every client to come back, s")
    args = p.parse_args(argv)
    try:
        args.counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients {args.clients!r} is not a comma-separated list of whole numbers")
    check_tiers(p, args)
    return args


def tier_args(tiers: list[str], units: int) -> list[tuple[str, list[str]]]:
    """(label, hub command-line arguments) for each tier.

    The hub enforces S1's throttles unless told otherwise, so `unthrottled` must say `--tier none`;
    a hub older than `--tier` ran unthrottled, and gets no option."""
    has_tier = hub_supports_option("--tier")
    out = []
    for tier in tiers:
        if tier == "unthrottled":
            out.append((tier, ["--tier", "none"] if has_tier else []))
        elif has_tier:
            out.append((f"{tier} x{units}", ["--tier", tier, "--tier-units", str(units)]))
        else:
            print(f"{tier}: skipped: this iotfailover-hub has no --tier option", flush=True)
    return out


def check_tiers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`args.tier_list`: the --tiers names, tier names as the hub spells them; a usage error for
    a name or unit count the hub would refuse, before any hub starts."""
    args.tier_list = []
    for tier in (t.strip() for t in args.tiers.split(",")):
        if not tier:
            continue
        if tier.lower() == "unthrottled":
            args.tier_list.append("unthrottled")
            continue
        try:
            args.tier_list.append(Tier.lookup(tier, args.tier_units).name)
        except ValueError as exc:
            p.error(f"--tiers: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = tier_args(args.tier_list, args.tier_units)
    print(f"{os.cpu_count()} CPUs; load average {loadavg()}; outage {args.outage:g} s; rate {args.rate:g} msg/s "
          f"per client; {args.per_process} clients per process; client options {CLIENT_KWARGS}", flush=True)
    print(HEADER, flush=True)
    ok = True
    for tier, hub_args in runs:
        for count in args.counts:
            for n in range(args.repeat):
                progress(f"{tier}: {count} clients, run {n + 1} of {args.repeat}")
                try:
                    result = run_once(count, args, hub_args)
                except Exception as exc:
                    print(f"{tier:<11} {count:>7}  run failed: {type(exc).__name__}: {exc}", flush=True)
                    ok = False
                    continue
                print(row(tier, result), flush=True)
                if result["wedged"] or result["deaths"] != "none":
                    print(f"{'':<11} SDK threads that died: {result['deaths']}", flush=True)
                ok = ok and result["back"] == count and result["missing"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
