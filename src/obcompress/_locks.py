"""Advisory locks on directories, so that concurrent writers of one artifact or database have a
defined outcome. flock(2) on the directory itself: no lock file is left behind, and the lock goes
with the process that held it (a killed build leaves nothing stale). Where flock does not exist
(Windows) the lock is a no-op and concurrent writers are not coordinated."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None


class LockHeld(ValueError):
    """Another process holds the lock (and the caller asked not to wait)."""


@contextlib.contextmanager
def directory_lock(directory: Union[str, os.PathLike], *, wait: bool, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (which must exist) for the ``with`` block.

    ``wait``: block until the lock is free; otherwise raise ``LockHeld`` naming ``what`` at once.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(str(Path(directory)), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(f"{what} is in use by another process (it holds a lock on {directory}); wait for it "
                           "to finish, or use another directory") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
