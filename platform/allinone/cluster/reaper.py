"""Ends a local Ray cluster's processes when the driver that started it dies.

``ray.init()`` ties the GCS and the raylet to the driver (the kernel kills them with it), but the
raylet's dashboard agent and runtime-env agent notice the raylet's death, then hang reporting it to
the dead GCS, and keep their ports open. ``start_ray`` runs this module beside a local cluster: it
remembers every process under Ray's head processes and, once the driver is gone, kills those still
running. It ends by itself when the cluster ends first (``ray.shutdown()``).

Run as ``python -m allinone.cluster.reaper DRIVER_PID HEAD_PID...``; it imports only psutil.
"""

from __future__ import annotations

import sys
import time

import psutil

# Each look walks the cluster's process tree: at 0.5 s that alone took 1% of a core all along
# (measured idle on 2 cores), more than Ray's own raylet.
POLL_S = 2.0


def reap(driver: psutil.Process, heads: list[psutil.Process]) -> None:
    known: dict[int, psutil.Process] = {}
    while driver.is_running():  # is_running compares start times: a reused pid is not the driver
        tree = _tree(heads)
        if not tree:
            return  # the cluster was shut down and the driver goes on
        known.update((p.pid, p) for p in tree)
        time.sleep(POLL_S)
    for process in known.values():
        try:
            if process.is_running():
                process.kill()
        except psutil.Error:
            pass  # ended meanwhile


def _tree(heads: list[psutil.Process]) -> list[psutil.Process]:
    tree = []
    for head in heads:
        try:
            if head.is_running():
                tree += [head, *head.children(recursive=True)]
        except psutil.Error:
            pass
    return tree


def _process(pid: str) -> psutil.Process | None:
    try:
        return psutil.Process(int(pid))
    except psutil.Error:
        return None


if __name__ == "__main__":
    driver, *heads = (_process(pid) for pid in sys.argv[1:])
    if driver is not None:
        reap(driver, [head for head in heads if head is not None])
