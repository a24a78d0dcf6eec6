import os
import sys

# The plain reference implementations in this folder are imported by the tests as modules.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(params=["native", "torch"])
def engine(request, monkeypatch):
    """Run a test with the fused C step kernel and with the pure-torch step (same arithmetic)."""
    if request.param == "torch":
        monkeypatch.setenv("OBCOMPRESS_NATIVE", "0")
    else:
        monkeypatch.delenv("OBCOMPRESS_NATIVE", raising=False)
    return request.param
