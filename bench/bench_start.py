#!/usr/bin/env python3
"""What installing the plugin adds to a pytest run's start, with and without a hub.

`python bench/bench_start.py [--runs 25] [--python PATH]`

Three kinds of run, each a fresh `python -m pytest -q -p no:cacheprovider` process, interleaved
round by round (the order rotates) so that the machine's load hits all three alike:

* bare: `-p no:iotfailover`, one plain test;
* plugin: the plugin loaded, the same plain test (no hub fixture, no gate option);
* hub: the plugin loaded, one test taking the `iothub` fixture (the embedded hub starts).

Each figure is the time from starting the process to the first test's body, read on the system's
monotonic clock (one clock for every process on Linux). Printed: min and p25 of each kind, and
plugin - bare and hub - bare at both. The load average before and after is printed too: on a busy
machine the min is the figure to trust. Targets (issue 12): plugin - bare <= 30 ms, hub - bare
<= 150 ms.

Measure in an environment with the `[examples]` extra only: the `[test]` extra's hypothesis plugin
adds far more than the plugin to every run. This is a script, not a test: the figures depend on
the machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

PLAIN = """
import os, time

def test_first():
    with open(os.environ["BENCH_START_OUT"], "w") as f:
        f.write(str(time.monotonic_ns()))
"""

HUB = """
import os, time

def test_first(iothub):
    with open(os.environ["BENCH_START_OUT"], "w") as f:
        f.write(str(time.monotonic_ns()))
"""

KINDS = {
    "bare": (["-p", "no:iotfailover"], "test_plain.py"),
    "plugin": ([], "test_plain.py"),
    "hub": ([], "test_hub.py"),
}


def one_run(python: str, workdir: str, kind: str, timeout: float, bytecode: bool) -> float:
    """Seconds from the process's start to its first test's body."""
    extra, test_file = KINDS[kind]
    out = os.path.join(workdir, f"first-{kind}.txt")
    if os.path.exists(out):
        os.unlink(out)
    env = {**os.environ, "BENCH_START_OUT": out}
    if bytecode:
        # as after a pip install from a wheel: every module's bytecode is compiled once and reused
        # (kept under the run's own directory, so the source tree stays clean)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache")
    for name in list(env):
        if name.startswith(("IOTFAILOVER_", "IOTHUB_")):
            del env[name]  # the user's own settings would change what is measured
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, test_file]
    started = time.monotonic_ns()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
        raise SystemExit(f"{kind} run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(out) as f:
        return (int(f.read()) - started) / 1e9


def p25(values: list[float]) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=25, help="rounds; each round runs every kind once")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the environment to measure")
    ap.add_argument("--kinds", default="bare,plugin,hub", help="which kinds to run (bare is always run)")
    ap.add_argument("--as-is", action="store_true",
                    help="keep the environment's bytecode settings: under PYTHONDONTWRITEBYTECODE an editable "
                         "install compiles the plugin's modules from source in every run")
    ap.add_argument("--timeout", type=float, default=120.0, help="limit of one run in seconds")
    args = ap.parse_args()
    kinds = ["bare"] + [k for k in args.kinds.split(",") if k in KINDS and k != "bare"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as workdir:
        with open(os.path.join(workdir, "test_plain.py"), "w") as f:
            f.write(textwrap.dedent(PLAIN))
        with open(os.path.join(workdir, "test_hub.py"), "w") as f:
            f.write(textwrap.dedent(HUB))
        for kind in kinds:  # one warm-up each: the first run pays for cold file caches
            one_run(args.python, workdir, kind, args.timeout, not args.as_is)
        for i in range(args.runs):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            for kind in order:
                times[kind].append(one_run(args.python, workdir, kind, args.timeout, not args.as_is))
    load_after = os.getloadavg()
    print(f"python {args.python}; {args.runs} interleaved rounds; {'bytecode as the environment has it' if args.as_is else 'bytecode cached'}; "
          f"loadavg before {load_before[0]:.2f} {load_before[1]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f}")
    print(f"{'to the first test, ms':24} {'min':>8} {'p25':>8} {'median':>8}")
    for kind in kinds:
        t = times[kind]
        print(f"{kind:24} {min(t) * 1e3:8.1f} {p25(t) * 1e3:8.1f} {statistics.median(t) * 1e3:8.1f}")
    targets = {"plugin": 30.0, "hub": 150.0}
    for kind in kinds[1:]:
        d_min = (min(times[kind]) - min(times["bare"])) * 1e3
        d_p25 = (p25(times[kind]) - p25(times["bare"])) * 1e3
        verdict = "meets" if d_min <= targets[kind] else "MISSES"
        print(f"{kind} - bare: {d_min:6.1f} ms at min, {d_p25:6.1f} ms at p25 "
              f"({verdict} the target of {targets[kind]:.0f} ms at min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
