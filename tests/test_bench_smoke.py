"""bench/bench_hub.py, bench/bench_fair.py --quick and bench/bench_senders.py still run end to end
and print their figures.

Only that the figures exist is checked, not their values: they depend on the machine.
"""
import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_hub.py")


def _figures(script, *args, timeout):
    """The script's standard output, after checking that it exited 0."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(60)
def test_quick_bench_prints_figures():
    out = _figures(BENCH, "--quick", "--no-mosquitto", "--timeout", "40", timeout=50)
    number = r"\d+(?:\.\d+)?"
    # server, connections, msgs/s, µs CPU/msg, server CPU %, client CPU %, peak RSS MB
    for conns in (1, 10):
        assert re.search(rf"^hub\s+{conns}\s+{number}\s+{number}\s+{number}%\s+{number}%\s+{number}\s",
                         out, re.MULTILINE), out
    # server, idle connections, RSS before MB, RSS after MB, KB per connection
    assert re.search(rf"^hub\s+200\s+{number}\s+{number}\s+-?{number}\b", out, re.MULTILINE), out
    assert "mosquitto: skipped (--no-mosquitto)" in out


BENCH_FAIR = os.path.join(os.path.dirname(BENCH), "bench_fair.py")


@pytest.mark.timeout(90)
def test_quick_fair_bench_prints_figures():
    # hub and floor on plain asyncio only: neither mosquitto nor uvloop need be installed
    out = _figures(BENCH_FAIR, "--quick", "--servers", "hub/asyncio,hub-io/asyncio,floor/asyncio", "--timeout", "60",
                   timeout=80)
    number = r"\d+(?:\.\d+)?"
    # server, msgs/s, µs CPU/msg, server CPU %, generators' CPU %, generator µs/msg, others %
    for kind in ("hub/asyncio", "hub-io/asyncio", "floor/asyncio"):
        rows = re.findall(rf"^  {kind}\s+{number}\s+{number}\s+{number}%\s+[\d+]+%\s+{number}\s+{number}%",
                          out, re.MULTILINE)
        assert len(rows) == 2, out  # one paced, one batched
    assert re.search(r"^  paced 200 msg/s, 10 conns\s+asyncio\s+-\s+\d+\.\d+x", out, re.MULTILINE), out
    assert re.search(rf"^machine speed: a fixed pure-Python loop took {number}-{number} ms before the runs "
                     rf"\({number}x\)", out, re.MULTILINE), out
    # the split: floor, then the hub's I/O layer with a core that only acknowledges, then the hub
    assert re.search(rf"^  paced 200 msg/s, 10 conns\s+asyncio\s+floor\s+{number}\s+hub-io\s+{number} "
                     rf"\([+-]{number} the I/O layer\)\s+hub\s+{number} \([+-]{number} the core\)", out, re.MULTILINE), out


BENCH_SENDERS = os.path.join(os.path.dirname(BENCH), "bench_senders.py")


@pytest.mark.timeout(60)
def test_senders_bench_prints_a_rate_per_nap():
    out = _figures(BENCH_SENDERS, "--naps", "0,0.02", "--messages", "5", timeout=50)
    for nap in ("0.0", "20.0"):
        assert re.search(rf"^\s+{re.escape(nap)} ms\s+\d+ \(\d+-\d+\)$", out, re.MULTILINE), out
