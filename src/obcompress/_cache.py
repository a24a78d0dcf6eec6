"""Where obcompress keeps what it builds or downloads once: trained zoo weights, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$OBCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/obcompress``, else ``~/.cache/obcompress``."""
    env = os.environ.get("OBCOMPRESS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "obcompress" if xdg else Path.home() / ".cache" / "obcompress"
