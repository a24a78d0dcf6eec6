import pytest
import torch

from obcompress.solvers import _kernel_build as kb
from obcompress.solvers import _native
from obcompress.solvers._elimination import _sub_matrices, _with_identity_slots


def test_kernel_builds_where_a_compiler_exists():
    # CI machines have a C compiler: the fused path must really be the one the solver tests run.
    if kb.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert _native.kernel() is not None
    status = _native.status()
    assert status["engine"] == "native" and status["source"] in ("installed", "built at first use")
    if _native.installed_library() is not None:
        # an installed library built from this source for this CPU is the one in use
        assert status["source"] == "installed" and status["path"] == str(_native.installed_library())


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("OBCOMPRESS_NATIVE", "0")
    assert _native.kernel() is None
    assert _native.status() == {"engine": "torch", "reason": "OBCOMPRESS_NATIVE=0"}
    from obcompress.solvers import kernel_status

    assert kernel_status() == _native.status()


def test_a_library_for_another_cpu_or_source_is_not_used():
    info = kb.build_info(["-O3", "-march=native"])
    assert kb.fits_this_machine(info) and kb.fits_this_machine(kb.build_info(["-O3"]))
    assert "cpu=any" in kb.build_info(["-O3"])  # portable flags run anywhere
    assert not kb.fits_this_machine(info.replace(kb.cpu_signature(), "0" * 16))
    source = info.split(";")[0].split("=")[1]
    assert not kb.fits_this_machine(info.replace(source, "f" * 16))
    assert not kb.fits_this_machine("")


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
