"""Metrics summed over worker processes (prometheus-client's multiprocess mode).

Each process then keeps its samples in files of one shared directory, and a scrape
answered by any worker reads them all.  The library picks its storage when it is first
imported, from PROMETHEUS_MULTIPROC_DIR: so `prepare` runs before anything imports
prometheus_client, and this module imports nothing that does.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> tuple[str, bool]:
    """Make the shared directory ready and name it in the environment the workers inherit:
    the operator's PROMETHEUS_MULTIPROC_DIR if set, else a new private one.  Files left
    by an earlier run are removed (they would be counted again).  (path, whether kith
    created it and removes it when it stops)."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics directory "
                           "was set up: its counters would not be shared")
    given = os.environ.get(ENV)
    if given:
        os.makedirs(given, mode=0o700, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        return given, False
    path = tempfile.mkdtemp(prefix="kith-metrics-")
    os.environ[ENV] = path
    return path, True


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def worker_exited(pid: int) -> None:
    """Drop the live-only gauges of a worker that exited (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
