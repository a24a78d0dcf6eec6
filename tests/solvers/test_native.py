import pytest
import torch

from obcompress.solvers import _native
from obcompress.solvers._elimination import _sub_matrices, _with_identity_slots


def test_kernel_builds_where_a_compiler_exists():
    # CI machines have a C compiler: the fused path must really be the one the solver tests run.
    if _native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert _native.kernel() is not None


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("OBCOMPRESS_NATIVE", "0")
    assert _native.kernel() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_sub_matrix_gather_matches_indexing(dtype):
    if _native.kernel() is None:
        pytest.skip("fused kernel unavailable")
    g = torch.Generator().manual_seed(0)
    M = torch.randn(9, 9, generator=g, dtype=dtype)
    idx = torch.tensor([[0, 3, 8, 9, 10], [2, 4, 5, 6, 7]])  # 9 and 10 are padding
    got = _sub_matrices(M, idx)
    Ma = _with_identity_slots(M, 5)
    rows = []
    for i in idx:
        slot = torch.where(i < 9, i, 9 + torch.arange(5))  # padding position j -> identity slot 9 + j
        rows.append(Ma[slot][:, slot])
    expect = torch.stack(rows)
    torch.testing.assert_close(got, expect)
