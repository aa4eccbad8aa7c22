"""bench/bench_hub.py --quick still runs end to end and prints its figures.

Only that the figures exist is checked, not their values: they depend on the machine.
"""
import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_hub.py")


@pytest.mark.timeout(60)
def test_quick_bench_prints_figures():
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--no-mosquitto", "--timeout", "40"],
                          capture_output=True, text=True, timeout=50)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
    number = r"\d+(?:\.\d+)?"
    # server, connections, msgs/s, µs CPU/msg, server CPU %, client CPU %, peak RSS MB
    for conns in (1, 10):
        assert re.search(rf"^hub\s+{conns}\s+{number}\s+{number}\s+{number}%\s+{number}%\s+{number}\s",
                         out, re.M), out
    # server, idle connections, RSS before MB, RSS after MB, KB per connection
    assert re.search(rf"^hub\s+200\s+{number}\s+{number}\s+-?{number}\b", out, re.M), out
    assert "mosquitto: skipped (--no-mosquitto)" in out
