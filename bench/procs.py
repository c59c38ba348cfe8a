"""CPU and memory of a kith process and its workers, from /proc (for the benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path


def with_workers(pid: int) -> list[int]:
    """`pid` and its children (the workers, with `workers` > 1)."""
    return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its workers, in seconds."""
    total = 0
    for p in with_workers(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its workers (each worker holds its own index), MiB."""
    total_kb = 0
    for p in with_workers(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return round(total_kb / 1024, 1)
