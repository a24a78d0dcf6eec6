import math

import numpy as np
import pytest
import torch

from obcompress.formats import packing
from obcompress.formats.packing import pack_bits, pack_mask, packed_size, unpack_bits, unpack_mask


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 1001])
def test_round_trip_any_width_and_length(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    # A dense stream: no bit wasted beyond the last partial byte.
    assert packed.numel() == math.ceil(n * bits / 8) == packed_size(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_bit_layout_is_lsb_first_within_bytes():
    # 1 | 2 << 3 | 3 << 6 = 209, and the top bit of code 3 (value 3 = 0b011 -> bit 8 is 0) spills over.
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [209, 0]
    assert pack_bits(torch.tensor([7, 7, 7], dtype=torch.uint8), 3).tolist() == [255, 1]
    assert pack_bits(torch.tensor([0x1, 0xF, 0x3], dtype=torch.uint8), 4).tolist() == [0xF1, 0x03]
    assert pack_bits(torch.tensor([3, 0, 1, 2, 1], dtype=torch.uint8), 2).tolist() == [0b10010011, 0b01]


def test_chunk_boundaries_do_not_shift_the_stream(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (1003,), generator=gen, dtype=torch.uint8)
    whole = pack_bits(codes, 3)
    monkeypatch.setattr(packing, "_CHUNK", 16)
    assert torch.equal(pack_bits(codes, 3), whole)
    assert torch.equal(unpack_bits(whole, 3, 1003), codes)


def test_multidimensional_codes_are_read_flattened():
    codes = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4) % 32
    assert torch.equal(unpack_bits(pack_bits(codes, 5), 5, 24).reshape(2, 3, 4), codes)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="below 2\\*\\*3"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    for bad in (1, 9, True, 4.0):
        with pytest.raises(ValueError, match="bits must be"):
            pack_bits(torch.zeros(4, dtype=torch.uint8), bad)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)  # 7 codes of 4 bits need 4 bytes
    with pytest.raises(ValueError, match="count"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, -1)


@pytest.mark.parametrize("shape", [(0,), (1,), (9,), (3, 5, 7), (64,)])
def test_mask_round_trip(shape):
    gen = torch.Generator().manual_seed(len(shape))
    mask = torch.rand(shape, generator=gen) < 0.4
    packed = pack_mask(mask)
    assert packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
    assert torch.equal(unpack_mask(pack_mask(mask.numpy()), mask.numel()), mask.reshape(-1))


def test_mask_layout_and_errors():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[0] = mask[9] = True
    assert pack_mask(mask).tolist() == [1, 2]
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.zeros(3))
    with pytest.raises(ValueError, match="need"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), (3, 5))
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(np.zeros(2, dtype=np.int64), 16)
