import io
import sys

import obcompress._progress as P


class _Log(io.StringIO):
    def isatty(self):
        return False


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_at_the_interval_and_a_last_one(monkeypatch):
    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(P, "LOG_INTERVAL", 0.0)
    bar = P.progress_bar(total=3, desc="layers", unit="layer")
    for i in range(3):
        bar.update(1)
        bar.set_postfix_str(f"layer {i}")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines and all(line.startswith("layers:") for line in lines)
    assert "3/3" in lines[-1] and "layer 2" in lines[-1]


def test_short_work_leaves_a_log_clean_and_progress_false_writes_nothing(monkeypatch):
    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    for progress in (True, False):
        bar = P.progress_bar(total=2, desc="quick", progress=progress)
        for _ in P.progress_bar(range(5), desc="inner", leave=False, progress=progress):
            bar.update(1)
        bar.close()
    assert log.getvalue() == ""


def test_a_terminal_gets_a_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = P.progress_bar(total=2, desc="bar")
    bar.update(2)
    bar.close()
    assert "\r" in term.getvalue() and "2/2" in term.getvalue()
