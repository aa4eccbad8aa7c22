#!/usr/bin/env python3
"""How fast real azure-iot-device clients come back after a region failover and after a drop.

For each client count, this connects that many unmodified sync `IoTHubDeviceClient`s (one device
each, keep_alive=5, connection_retry_interval=1) to an embedded FakeHub, then runs
`region_failover(outage=...)` and `drop()` and prints, per scenario, the time from the end of the
fault to the last device back, per-device downtime, and the hub's connect attempts and refusals.
Run `python bench/bench_recovery.py --help`; bench/README.md explains the figures. This is a
script, not a test: it prints numbers and exits 0 unless something broke (a missed target is a
figure, not a failure).

The hub shares this process with the clients, as it does in a pytest run: recovery under a
reconnect storm includes the hub competing with the SDK threads for the interpreter, and the
"hub CPU" column shows how much of the recovery window the hub thread actually ran.
"""
import argparse
import logging
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a source checkout works without installing

from azure.iot.device import IoTHubDeviceClient

from pytest_iotfailover import FakeHub

# The retry interval's floor in the SDK is 1 s; keep_alive only matters for silent faults.
CLIENT_KWARGS = {"keep_alive": 5, "connection_retry_interval": 1}
TARGET_RECOVER = 1.5   # seconds from fault end to the last of the clients back
TARGET_CLIENTS = 100   # the target is stated for this many clients
ATTEMPT_KINDS = ("connect", "connect_refused", "auth_failure")
BUCKET = 0.1           # histogram resolution, seconds
# paho 1.6 waits on its sockets with select(), which cannot watch descriptor numbers of 1024 and
# up: past that its network thread gives up and the SDK's connect hangs. Each client costs four
# descriptors here (its socket, paho's wake-up socket pair, and the hub's end of the connection).
SELECT_LIMIT = 1024
FDS_PER_CLIENT = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ================================================================================ bounded work

def run_parallel(calls: Sequence[tuple[str, Callable[[], object]]], workers: int,
                 timeout: float) -> tuple[dict[str, BaseException | None], list[str]]:
    """Run the calls on `workers` daemon threads; give up waiting after `timeout` s.

    The SDK's connect and shutdown have no deadline of their own, and a hung call must neither
    hang the bench nor keep the interpreter from exiting, hence daemon threads rather than an
    executor. Returns {key: exception or None} for the calls that finished, and the unfinished keys.
    """
    todo: queue.Queue[tuple[str, Callable[[], object]]] = queue.Queue()
    for call in calls:
        todo.put(call)
    done: dict[str, BaseException | None] = {}
    cond = threading.Condition()

    def worker():
        while True:
            try:
                key, fn = todo.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
                err = None
            except BaseException as exc:  # reported to the caller
                err = exc
            with cond:
                done[key] = err
                cond.notify_all()

    for i in range(max(1, min(workers, len(calls)))):
        threading.Thread(target=worker, name=f"bench-worker-{i}", daemon=True).start()
    deadline = time.monotonic() + timeout
    with cond:
        while len(done) < len(calls):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            cond.wait(left)
        finished = dict(done)
    return finished, [k for k, _ in calls if k not in finished]


def thread_cpu_seconds(native_id: int | None) -> float | None:
    """CPU time of one thread of this process; schedstat counts in ns, stat only in 10 ms ticks."""
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used so far (summed over cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def hub_thread_id(hub: FakeHub) -> int | None:
    thread = getattr(hub, "_thread", None)  # no public handle on the hub's event-loop thread
    return getattr(thread, "native_id", None)


# ================================================================================ the scenarios

class Result:
    def __init__(self, clients: int, scenario: str):
        self.clients = clients
        self.scenario = scenario
        self.outage: float | None = None
        self.recover: float | None = None
        self.downtimes: list[float] = []
        self.back = 0
        self.attempts = 0
        self.refusals = 0
        self.other: dict[str, int] = {}
        self.window: float = 0.0                               # fault start -> all back
        self.storm: float = 0.0                                # fault end -> all back
        self.hub_cpu: float | None = None
        self.proc_cpu: float = 0.0
        self.others_cpu: float = 0.0
        self.reconnect_offsets: list[float] = []               # from fault end
        self.attempt_offsets: list[tuple[float, str]] = []     # from fault start
        self.error: str | None = None

    @property
    def all_back(self) -> bool:
        return self.error is None and self.back == self.clients

    @property
    def met(self) -> bool:
        return self.all_back and self.recover is not None and self.recover <= TARGET_RECOVER


def wait_connected(hub: FakeHub, ids: set, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = ids - set(hub.connected_devices())
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{len(missing)} of {len(ids)} devices not connected after {timeout:g} s, "
                             f"e.g. {sorted(missing)[:5]}")
        time.sleep(0.05)


def run_scenario(hub: FakeHub, scenario: str, ids: set, outage: float, timeout: float) -> Result:
    res = Result(len(ids), scenario)
    wait_connected(hub, ids, timeout)
    hub_tid = hub_thread_id(hub)
    if scenario == "region_failover":
        handle = hub.faults.region_failover(outage=outage)
    else:
        handle = hub.faults.drop()
    handle.wait_started(10)
    start = handle.started_at
    progress(f"  {scenario}: started, {len(ids)} devices affected")
    handle.wait(outage + 10)
    end = handle.ended_at
    # CPU is sampled over the reconnect storm only: an idle outage would dilute the shares
    cpu0, proc0, storm_start = thread_cpu_seconds(hub_tid), time.process_time(), time.time()
    busy0 = machine_busy_seconds()
    # Polled from the event log rather than with handle.report(): the report is built on the hub
    # thread and would steal the very time being measured.
    deadline = time.monotonic() + timeout
    back: dict[str, float] = {}
    seen = 0
    while True:
        events = hub.event_log.list()
        for e in events[seen:]:
            if e.kind == "connect" and e.at >= start and e.device_id in ids and e.device_id not in back:
                back[e.device_id] = e.at
        seen = len(events)
        if len(back) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    window_end = time.time()
    cpu1 = thread_cpu_seconds(hub_tid)
    res.storm = window_end - storm_start
    res.hub_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    res.proc_cpu = time.process_time() - proc0
    # other processes competing for the 2 cores stretch the storm; /proc/stat has 10 ms ticks
    res.others_cpu = max(machine_busy_seconds() - busy0 - res.proc_cpu, 0.0)
    res.window = window_end - start
    progress(f"  {scenario}: {len(back)}/{len(ids)} back {res.window:.2f} s after the fault started")

    rep = handle.report()
    res.outage = rep.outage
    res.recover = rep.time_to_recover
    res.back = sum(1 for d in rep.devices.values() if d.reconnected_at is not None)
    res.downtimes = sorted(d.downtime for d in rep.devices.values() if d.downtime is not None)
    res.reconnect_offsets = sorted(d.reconnected_at - end for d in rep.devices.values()
                                   if d.reconnected_at is not None)
    if set(rep.devices) != ids:
        res.error = f"the fault affected {len(rep.devices)} devices, expected {len(ids)}"
    for e in hub.event_log.list():
        if not start <= e.at <= window_end:
            continue
        if e.kind in ATTEMPT_KINDS:
            res.attempts += 1
            res.attempt_offsets.append((e.at - start, e.kind))
            if e.kind != "connect":
                res.refusals += 1
        elif e.kind in ("tls_error", "connect_timeout", "protocol_violation", "error"):
            res.other[e.kind] = res.other.get(e.kind, 0) + 1
    return res


def run_count(n: int, outage: float, timeout: float, workers: int, results: list[Result],
              tier: str | None = None) -> None:
    """Appends each scenario's result as it completes, so a later failure keeps the earlier figures."""
    progress(f"N={n}: starting hub")
    first = len(results)
    clients: dict[str, IoTHubDeviceClient] = {}
    hub = FakeHub("benchhub", raise_errors=False, tier=tier).start()
    try:
        devices = [hub.add_device(f"bench-{i:03d}", throttle=False) for i in range(n)]  # set-up
        for dev in devices:
            clients[dev.device_id] = IoTHubDeviceClient.create_from_connection_string(
                dev.connection_string, server_verification_cert=hub.ca_pem, **CLIENT_KWARGS)
        t = time.monotonic()
        done, pending = run_parallel([(k, c.connect) for k, c in clients.items()], workers,
                                     timeout=max(30.0, n * 0.5))
        failed = {k: e for k, e in done.items() if e is not None}
        if pending or failed:
            raise BenchError(f"{len(pending)} connects hung, {len(failed)} failed "
                             f"({next(iter(failed.values()), None)!r})")
        progress(f"N={n}: {n} clients connected in {time.monotonic() - t:.2f} s")
        ids = set(clients)
        for scenario in ("region_failover", "drop"):
            res = run_scenario(hub, scenario, ids, outage, timeout)
            results.append(res)
            if not res.all_back:
                break  # stragglers would count as instant recoveries in the next scenario
            time.sleep(0.5)  # the next fault must not land on clients still handling their CONNACK
        errors = hub.errors
        if errors and len(results) > first:
            results[-1].error = (results[-1].error or "") + f" hub internal errors: {len(errors)}"
    finally:
        if clients:
            progress(f"N={n}: shutting down {len(clients)} clients")
            _, pending = run_parallel([(k, c.shutdown) for k, c in clients.items()], len(clients),
                                      timeout=30.0)
            if pending:
                progress(f"N={n}: {len(pending)} clients did not shut down within 30 s")
        hub.stop()


# ================================================================================ printing

def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(results: list[Result], outage: float) -> None:
    head = (f"{'scenario':<16} {'N':>4} {'outage':>7} {'recover':>8} {'p50 down':>9} {'max down':>9} "
            f"{'back':>8} {'attempts':>8} {'refused':>8} {'hub CPU':>8} {'proc CPU':>9} {'others':>7}  target")
    print(head)
    print("-" * len(head))
    for r in results:
        p50 = statistics.median(r.downtimes) if r.downtimes else None
        mx = max(r.downtimes) if r.downtimes else None
        hub_cpu = "-" if r.hub_cpu is None or not r.storm else f"{100 * r.hub_cpu / r.storm:.0f}%"
        proc_cpu = f"{100 * r.proc_cpu / r.storm:.0f}%" if r.storm else "-"
        # 10 ms ticks say nothing over a storm of a few ticks
        others = f"{100 * r.others_cpu / r.storm:.0f}%" if r.storm >= 0.25 else "-"
        verdict = "met" if r.met else "MISSED"
        if r.clients != TARGET_CLIENTS:
            verdict += " (ref.)"
        print(f"{r.scenario:<16} {r.clients:>4} {fmt(r.outage):>6}s {fmt(r.recover):>7}s "
              f"{fmt(p50):>8}s {fmt(mx):>8}s {r.back:>3}/{r.clients:<4} {r.attempts:>8} {r.refusals:>8} "
              f"{hub_cpu:>8} {proc_cpu:>9} {others:>7}  recover <= {TARGET_RECOVER:g}s: {verdict}")
        extra = []
        if r.other:
            extra.append(", ".join(f"{v} {k}" for k, v in sorted(r.other.items())))
        if r.error:
            extra.append(r.error.strip())
        if extra:
            print(f"{'':<16} ^ {'; '.join(extra)}")
    print(f"target: {TARGET_CLIENTS} clients back within outage + {TARGET_RECOVER:g} s "
          f"(outage {outage:g} s for region_failover, 0 for drop); 'hub CPU' (the hub's thread), 'proc CPU' (hub "
          "and clients together) and 'others' (every other process) are shares of one core from fault end "
          "until the last device was back")


def histogram(label: str, values: list[float]) -> list[str]:
    if not values:
        return [f"  {label}: none"]
    counts: dict[int, int] = {}
    for v in values:
        counts[int(v // BUCKET)] = counts.get(int(v // BUCKET), 0) + 1
    lines = [f"  {label}:"]
    prev = None
    for i in sorted(counts):
        if prev is not None and i > prev + 1:
            lines.append("      ...")
        lines.append(f"    {i * BUCKET:+6.1f}..{(i + 1) * BUCKET:+5.1f}s {counts[i]:>4} {'#' * min(counts[i], 60)}")
        prev = i
    return lines


def print_detail(r: Result) -> None:
    print(f"\n{r.scenario}, N={r.clients}: reconnects by time from fault end "
          f"(outage {fmt(r.outage)} s; bucket {BUCKET:g} s)")
    print("\n".join(histogram("connect accepted", r.reconnect_offsets)))
    outage = r.outage or 0.0
    refused = [t - outage for t, k in r.attempt_offsets if k != "connect"]
    accepted = [t - outage for t, k in r.attempt_offsets if k == "connect"]
    # refusals by retry wave show whether the SDK's retries drift apart or stay in lock-step
    print("\n".join(histogram("refused attempts (from fault end)", refused)))
    if accepted:
        spread = max(accepted) - min(accepted)
        print(f"  accepted CONNECTs spread over {spread:.2f} s, first {min(accepted):+.2f} s, "
              f"last {max(accepted):+.2f} s from fault end")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,10,100",
                    help="comma-separated client counts, one run each (default 1,10,100)")
    ap.add_argument("--outage", type=float, default=2.0, help="region_failover outage, seconds (default 2)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="how long to wait for every device to come back after a fault, seconds (default 30)")
    ap.add_argument("--connect-workers", type=int, default=8,
                    help="clients connecting at once before the faults (default 8)")
    ap.add_argument("--detail", action="store_true",
                    help="print reconnect and refusal histograms for every scenario, "
                         "not only those that missed the target")
    ap.add_argument("--tier", default="none",
                    help="IoT Hub tier the hub throttles as (S1, S2, ...), or none (default: none)")
    ap.add_argument("--verbose", action="store_true", help="show the SDK's own warnings")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    most = (SELECT_LIMIT - len(os.listdir("/proc/self/fd")) - 64) // FDS_PER_CLIENT
    if not counts or any(c < 1 or c > most for c in counts):
        ap.error(f"--clients must be between 1 and {most}: paho's select() cannot watch file "
                 f"descriptors above {SELECT_LIMIT - 1}, and hub and clients share this process")
    if args.outage < 0:
        ap.error("--outage must be non-negative")
    if args.timeout <= 0 or args.connect_workers < 1:
        ap.error("--timeout must be positive and --connect-workers at least 1")
    # every refused retry is a logged warning in the SDK: hundreds per scenario drown the progress
    logging.basicConfig(level=logging.WARNING)
    if not args.verbose:
        logging.getLogger("azure.iot.device").setLevel(logging.CRITICAL)
        logging.getLogger("paho").setLevel(logging.CRITICAL)

    tier = None if args.tier.strip().lower() in ("none", "off") else args.tier
    started = time.monotonic()
    results: list[Result] = []
    broke = False
    for n in counts:
        try:
            run_count(n, args.outage, args.timeout, args.connect_workers, results, tier)
        except (BenchError, TimeoutError) as exc:
            progress(f"N={n}: {exc}")
            broke = True
    print(f"azure-iot-device sync clients, keep_alive={CLIENT_KWARGS['keep_alive']}, "
          f"connection_retry_interval={CLIENT_KWARGS['connection_retry_interval']}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, tier {tier or 'none (unthrottled)'}")
    print_table(results, args.outage)
    for r in results:
        if args.detail or (r.clients == TARGET_CLIENTS and not r.met):
            print_detail(r)
    print(f"\nwall time {time.monotonic() - started:.1f} s")
    broke = broke or any(not r.all_back for r in results)
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
