"""The README's Layout names every module of the package, and names nothing that is not there."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def test_layout_names_every_module():
    block = _layout()
    pkg = REPO / "src" / "obcompress"
    missing = [str(p.relative_to(pkg)) for p in sorted(pkg.rglob("*")) if p.suffix in (".py", ".c")
               and p.name != "__init__.py" and p.name not in block]
    missing += [f"{d.name}/" for d in sorted(pkg.iterdir()) if d.is_dir() and d.name != "__pycache__"
                and f"{d.name}/" not in block]
    assert missing == []


def test_layout_names_only_what_exists():
    block = _layout()
    files = {p.name for p in REPO.rglob("*") if ".venv" not in p.parts and p.is_file()}
    named = set(re.findall(r"[\w.]+\.(?:py|c|md)\b", block))
    assert sorted(n for n in named if n not in files) == []
