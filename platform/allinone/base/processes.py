"""Helper processes that end with the process that started them, however it ends (``kill -9``
included), instead of living on as orphans."""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


def exit_with_parent(parent: int) -> None:
    """End this process soon after ``parent`` dies: a ``ProcessPoolExecutor`` initializer.

    A pool worker blocked on its task queue never notices a parent killed with SIGKILL: the
    queue's pipe stays open in the worker itself. A daemon thread watches the parent instead
    (portable, unlike Linux's PR_SET_PDEATHSIG, which also fires when the parent's *thread*
    that forked the worker ends)."""
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="exit-with-parent").start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process (init, a subreaper)
        time.sleep(POLL_S)
    os._exit(1)
