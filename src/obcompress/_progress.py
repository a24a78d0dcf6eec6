"""Progress for long work, on a terminal and in logs.

On a terminal: tqdm's bars. Where stderr is not a terminal (a job under nohup, a CI log), redrawn
bars would pile up into one unreadable line, so the same bar writes a plain line at most once every
``LOG_INTERVAL`` seconds, and a last one when a bar that wrote lines ends: work that ends sooner
leaves a log clean, longer work says where it is and when it will end. ``progress=False`` turns
both off.
"""

from __future__ import annotations

import functools
import sys

# Seconds between two progress lines in a log (and before the first).
LOG_INTERVAL = 60.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Stream:
    """stderr for a log bar: tqdm's own carriage returns and bare newlines are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@functools.lru_cache(maxsize=None)
def _log_bar_class():
    from tqdm.std import tqdm

    class LogLines(tqdm):
        """A tqdm whose redraws become whole lines, at most one per ``LOG_INTERVAL``."""

        _lines = 0
        _last_line = None

        def display(self, msg=None, pos=None):
            if msg == "":  # a finished inner bar clears itself on a terminal; a log has nothing to clear
                return False
            now = self._time()
            closing = self.disable  # close() marks the bar disabled before its last display
            if self._last_line is None:  # the first display comes from __init__, before start_t is set
                self._last_line = now
            if (closing and not self._lines) or (not closing and now - self._last_line < LOG_INTERVAL):
                return False
            self._last_line = now
            self._lines += 1
            self.fp.write(self.format_meter(**self.format_dict).strip() + "\n")
            self.fp.flush()
            return False

    return LogLines


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    if not progress:
        from tqdm.std import tqdm

        return tqdm(iterable, disable=True, **kwargs)
    if _is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=sys.stderr, **kwargs)
    kwargs.update(file=_Stream(sys.stderr), mininterval=min(LOG_INTERVAL, 10.0), ascii=True, ncols=110, dynamic_ncols=False)
    return _log_bar_class()(iterable, **kwargs)
