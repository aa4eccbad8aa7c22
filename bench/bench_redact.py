#!/usr/bin/env python3
"""What redacting one test report costs, by the number of live device keys.

`python bench/bench_redact.py [--size MB] [--devices 500,25000] [--no-before]`

"before" is the redaction the plugin used up to 0.1.0, reproduced here: the marker patterns, then
one `str.replace` per key (and its percent-encoded form) ever created in the session. "after" is
`pytest_iotfailover.redaction.redact`: one regex pass for the markers, one for base64-like runs,
each run's windows looked up in the index of live keys. Each device has a primary and a secondary
key, as the plugin's devices do. The report is synthetic but shaped like a failing test's: a
traceback with paths, log lines with device ids, hex ids and connection strings of live devices.

This is a script, not a test: the figures depend on the machine.
"""
import argparse
import base64
import os
import re
import sys
import time
import tracemalloc
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pytest_iotfailover import redaction as secrets


def old_redact(text, known):
    """The former algorithm: cost grows with every key ever remembered."""
    text = re.sub(r"(SharedAccessKey=)[^;\s'\"]+", r"\1<redacted>", text)
    text = re.sub(r"(sig=)[^&;\s'\"]+", r"\1<redacted>", text)
    for k in sorted(known, key=len, reverse=True):
        text = text.replace(k, "<redacted>")
    return text


def make_keys(devices, seed):
    rnd = __import__("random").Random(seed)
    return [(base64.b64encode(rnd.randbytes(32)).decode(), base64.b64encode(rnd.randbytes(32)).decode())
            for _ in range(devices)]


def make_report(size, keys, seed=1):
    rnd = __import__("random").Random(seed)
    lines, total = [], 0
    while total < size:
        i = rnd.randrange(len(keys))
        kind = rnd.randrange(6)
        if kind == 0:
            line = (f'  File "/usr/lib/python3/site-packages/azure/iot/device/common/pipeline/'
                    f'pipeline_stages_mqtt.py", line {rnd.randrange(900)}, in _run_op')
        elif kind == 1:
            line = (f"2026-12-01 08:{rnd.randrange(60):02d}:{rnd.randrange(60):02d} INFO app: device "
                    f"test-device-{i} sent message {rnd.getrandbits(64):016x} after {rnd.random():.3f} s")
        elif kind == 2:
            line = (f"E   AssertionError: assert 'HostName=testhub.azure-devices.net;DeviceId=test-device-{i};"
                    f"SharedAccessKey={keys[i][0]}' == 'other'")
        elif kind == 3:
            line = f"connecting with {keys[i][1]} to 127.0.0.{rnd.randrange(2, 250)}:8883"
        elif kind == 4:
            line = "    def test_something(iothub, device_client, failover):  # a line of source"
        else:
            line = f"message id {rnd.getrandbits(128):032x} correlation {rnd.getrandbits(64):016x}"
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines)[:size]


def timed(fn, *args, repeat=3):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1.0, help="report size in MB (default 1)")
    ap.add_argument("--devices", default="500,25000", help="live device counts (default 500,25000)")
    ap.add_argument("--no-before", action="store_true", help="skip the former algorithm (slow at 25,000)")
    args = ap.parse_args(argv)
    size = int(args.size * 1_000_000)
    counts = [int(c) for c in args.devices.split(",") if c]

    print(f"redacting a {size / 1e6:g} MB report; best of 3 (before: 1 run)")
    print(f"{'devices':>8} {'keys':>7} {'before s':>9} {'after s':>8} {'index MB':>9} {'keys hidden':>11}")
    for n in counts:
        keys = make_keys(n, seed=n)
        report = make_report(size, keys)
        known = set()
        for pair in keys:
            for k in pair:
                known.update((k, quote(k, safe="")))
        tracemalloc.start()
        for i, pair in enumerate(keys):
            secrets.remember_device(f"bench-{n}-{i}", *pair)
        index_mb = tracemalloc.get_traced_memory()[0] / 1e6
        tracemalloc.stop()
        after, new = timed(secrets.redact, report)
        hidden = "yes" if not any(k[:secrets.MIN_PARTIAL] in new for pair in keys for k in pair) else "NO"
        before = None
        if not args.no_before:
            before, _ = timed(old_redact, report, known, repeat=1)
        print(f"{n:>8} {2 * n:>7} {'-' if before is None else format(before, '.3f'):>9} "
              f"{after:>8.3f} {index_mb:>9.1f} {hidden:>11}")
        for i in range(n):
            secrets.forget_device(f"bench-{n}-{i}")
        secrets.release_retired()
    return 0


if __name__ == "__main__":
    sys.exit(main())
