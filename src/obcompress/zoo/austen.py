"""Jane Austen's six novels as plain text files: real English for calibrating and evaluating language
models (calibrate on one novel, measure perplexity on another).

The texts come from the Debian package ``r-cran-janeaustenr`` (fetched at run time, never committed),
an R lazy-load data base of one character vector of lines per novel, read without R (``minilm``'s
reader) and cached as UTF-8 files, one line per line of the book.
"""

from __future__ import annotations

from pathlib import Path

from ..files import cache_dir, write_text
from ._fetch import ZooUnavailable, debian_package, read_members

__all__ = ["NOVELS", "austen_text"]

DEBIAN_PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def _path(novel: str) -> Path:
    return cache_dir() / "austen" / f"{novel}.txt"


def austen_text(novel: str) -> Path:
    """The path of ``novel`` (one of ``NOVELS``) as a UTF-8 text file, built on first use."""
    if novel not in NOVELS:
        raise ValueError(f"unknown novel {novel!r}: one of {', '.join(NOVELS)}")
    path = _path(novel)
    if path.is_file():
        return path
    from .minilm import _read_lazyload

    with debian_package(DEBIAN_PACKAGE) as deb:
        files = read_members(deb, lambda p: p in (RDATA_DIR + "Rdata.rdx", RDATA_DIR + "Rdata.rdb"))
        source = deb.name
    if len(files) != 2:
        raise ZooUnavailable(f"{source} has no {RDATA_DIR}Rdata.rdx/.rdb (a different package version?)")
    books = _read_lazyload(files[RDATA_DIR + "Rdata.rdx"], files[RDATA_DIR + "Rdata.rdb"], list(NOVELS))
    for name, lines in books.items():
        text = "\n".join(str(s) for s in lines) + "\n"
        if len(text) < 100_000:
            raise ZooUnavailable(f"{source}: {name} holds only {len(text)} characters; not the novel")
        write_text(_path(name), text)
    return path
