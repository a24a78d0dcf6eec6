"""Progress of one long solver call, for whoever listens (the solvers themselves do no I/O).

``with listen(callback): solver(...)`` makes the exact solvers call ``callback(rows_done, rows_total)``
as chunks of rows finish, from whichever thread finished them (calls are serialised); once with 0
at the start of every elimination pass. Without a listener nothing is reported.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Iterator, Optional

__all__ = ["listen", "rows_reporter"]

_listener: contextvars.ContextVar = contextvars.ContextVar("obcompress_solver_progress", default=None)


@contextlib.contextmanager
def listen(callback: Callable[[int, int], None]) -> Iterator[None]:
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def rows_reporter(total: int) -> Optional[Callable[[int], None]]:
    """A thread-safe ``tick(rows)`` for a pass over ``total`` rows, or None without a listener.
    Read it in the calling thread: worker threads do not inherit the listener."""
    callback = _listener.get()
    if callback is None:
        return None
    lock = threading.Lock()
    state = {"done": 0}
    callback(0, total)

    def tick(rows: int) -> None:
        with lock:
            state["done"] += rows
            callback(state["done"], total)

    return tick
