"""Run test files again and again under CPU contention; report passes, failures, lost messages and
wedged clients per run and in total.

    python bench/stress_examples.py                       # 20 runs of `pytest -n 2 examples`, 2 busy processes
    python bench/stress_examples.py --runs 5 --busy 3 examples tests/test_faults_sdk.py

Busy processes are `python -c "while True: pass"`; they are killed when the script ends, however
it ends (normal exit, an exception, Ctrl-C or SIGTERM). Figures come from each run's junit XML:
`iothub_lost` (messages lost in a test's last delivery assertion; not counted for xfail tests,
which lose messages on purpose) and the wedged clients its
faults' recovery reports named, plus the teardown warnings naming wedged fixture clients.
Exit status 1 if any run failed or lost a message.
"""
import argparse
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_busy = []
_WEDGE_WARNING = re.compile(r"(\S+): the SDK's network thread (?:died|has ended)")


def _start_busy(count):
    for _ in range(count):
        _busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))


def _stop_busy():
    while _busy:
        proc = _busy.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _on_signal(signum, frame):
    _stop_busy()
    raise SystemExit(128 + signum)


def _figures(xml_path: Path, output: str):
    """(passed, failed, lost, wedged device ids) of one run."""
    passed = failed = lost = 0
    wedged = set()
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError):
        return passed, 1, lost, wedged  # no report at all: the run itself broke
    for case in root.iter("testcase"):
        outcome = {child.tag for child in case}
        if outcome & {"failure", "error"}:
            failed += 1
        elif "skipped" not in outcome:
            passed += 1
        expected_loss = "skipped" in outcome  # xfail: a test that shows a loss on purpose
        for prop in case.iter("property"):
            name, value = prop.get("name"), prop.get("value")
            if name == "iothub_lost" and value not in (None, "") and not expected_loss:
                lost += int(value)
            elif name == "iothub_failover":
                for fault in json.loads(value).get("faults", []):
                    wedged.update((fault.get("wedged") or {}).keys())
    wedged.update(_WEDGE_WARNING.findall(output))
    return passed, failed, lost, wedged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=["examples"], help="pytest targets (default: examples)")
    ap.add_argument("--runs", type=int, default=20, help="runs in a row (default 20)")
    ap.add_argument("--busy", type=int, default=2, help="busy processes competing for the CPU (default 2)")
    ap.add_argument("-n", "--workers", default="2", help="pytest-xdist workers per run (default 2; 0: no xdist)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one run may take (default 600)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.busy < 0:
        ap.error("--runs must be at least 1 and --busy at least 0")

    atexit.register(_stop_busy)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTHUB_", "IOTFAILOVER_", "PYTEST_"))}
    totals = {"passed": 0, "failed": 0, "lost": 0, "wedged": 0, "bad_runs": 0}
    print(f"{args.runs} runs of pytest -n {args.workers} {' '.join(args.targets)} under {args.busy} busy processes",
          flush=True)
    try:
        _start_busy(args.busy)
        with tempfile.TemporaryDirectory(prefix="stress-") as tmp:
            for run in range(1, args.runs + 1):
                xml_path = Path(tmp) / f"run{run}.xml"
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                       "default::pytest.PytestWarning", f"--junitxml={xml_path}", *args.targets]
                if args.workers not in ("0", ""):
                    cmd[3:3] = ["-n", args.workers]
                start = time.monotonic()
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                          timeout=args.timeout)
                    output, code = proc.stdout + proc.stderr, proc.returncode
                except subprocess.TimeoutExpired as exc:
                    output, code = f"{exc.stdout or ''}{exc.stderr or ''}", "timeout"
                passed, failed, lost, wedged = _figures(xml_path, output)
                if code not in (0, "timeout") and not failed:
                    failed = 1  # pytest itself failed (collection error, internal error)
                if code == "timeout":
                    failed += 1
                bad = bool(failed or lost)
                totals["passed"] += passed
                totals["failed"] += failed
                totals["lost"] += lost
                totals["wedged"] += len(wedged)
                totals["bad_runs"] += bad
                print(f"run {run:>3}/{args.runs}: {'FAIL' if bad else 'ok  '} passed {passed} failed {failed} "
                      f"lost {lost} wedged {len(wedged)}{' (' + ', '.join(sorted(wedged)) + ')' if wedged else ''} "
                      f"in {time.monotonic() - start:.1f} s", flush=True)
                if bad:
                    tail = "\n".join(output.splitlines()[-40:])
                    print("    " + tail.replace("\n", "\n    "), flush=True)
    finally:
        _stop_busy()
    print(f"total: {args.runs} runs, {totals['bad_runs']} failed runs; tests passed {totals['passed']} "
          f"failed {totals['failed']}; messages lost {totals['lost']}; wedged clients {totals['wedged']}",
          flush=True)
    return 1 if totals["bad_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
