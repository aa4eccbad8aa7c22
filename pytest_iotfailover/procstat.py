"""CPU time of a process from /proc, for the fleet and the standalone hub's figures (Linux only;
elsewhere None). A leaf module: both devices/ and fakehub/ use it."""
from __future__ import annotations

import os


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all threads) from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
