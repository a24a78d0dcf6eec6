"""The README's claims that code can check: the cost-model table of wide layers is there, up to
4,608 columns, and the benchmark that produced it runs."""

import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tells_the_cost_of_wide_layers():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Wide layers: what the exact solvers cost", 1)[1].split("\n## ", 1)[0]
    assert "rows·cols³" in section and "benchmarks/wide_layers.py" in section
    widths = [int(m.replace(",", "")) for m in re.findall(r"^\| ([\d,]+) \|", section, re.M)]
    assert widths and max(widths) >= 4608 and widths == sorted(widths)
    assert "solver: gptq" in section  # what to choose instead


def test_the_wide_layer_benchmark_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["wide_layers.py", "--cols", "32,48", "--rows", "2", "--repeats", "1"])
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "wide_layers.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "| 32 |" in out and "| 48 |" in out
