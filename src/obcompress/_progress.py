"""Progress bars that show on a terminal and stay out of logs: tqdm's own rule (``disable=None``)
turns a bar off when stderr is not a terminal; ``progress=False`` turns it off everywhere."""

from __future__ import annotations

import sys


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if progress else True, file=sys.stderr, **kwargs)
