"""Jane Austen's novels as text files (Debian r-cran-janeaustenr, fetched once; skips without it)."""

import pytest

from obcompress.zoo import austen as A
from obcompress.zoo._fetch import ZooUnavailable


def test_unknown_novel():
    with pytest.raises(ValueError, match="unknown novel 'ulysses'"):
        A.austen_text("ulysses")


def test_novels_are_the_books_and_distinct():
    pytest.importorskip("rdata", reason="reading the R data needs the rdata package (obcompress[zoo])")
    try:
        emma, pride = A.austen_text("emma"), A.austen_text("prideprejudice")
    except ZooUnavailable as e:
        pytest.skip(f"the Debian data is not available here: {e}")
    e, p = emma.read_text(encoding="utf-8"), pride.read_text(encoding="utf-8")
    assert e.startswith("EMMA\n") and p.startswith("PRIDE AND PREJUDICE\n")
    assert "It is a truth universally acknowledged" in p and "truth universally acknowledged" not in e
    assert len(p) > 600_000 and len(e) > 800_000
