"""Dense bit packing of integer codes (2..8 bits each) and of bitmasks (1 bit per weight).

Layout: the codes form one bit stream, code i occupying bits [i*bits, (i+1)*bits), least significant
bit first, and byte k of the output holds stream bits [8k, 8k+8) with stream bit 8k in its least
significant bit ("little-endian within bytes"). A 3-bit stream therefore wastes no bits: 8 codes
fill 3 bytes exactly. The unused high bits of the last byte are zero.

numpy's packbits/unpackbits do the bit shuffling in C; work proceeds in chunks so that the one
byte-per-bit intermediate stays bounded however large the layer is.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

from ..checks import check_bits, check_int

__all__ = ["pack_bits", "packed_size", "pack_mask", "unpack_bits", "unpack_mask"]

# Codes per chunk; a multiple of 8 so that every chunk but the last ends on a byte boundary for
# any bit width (8 codes of b bits are exactly b bytes).
_CHUNK = 1 << 22


def _check_count(count) -> int:
    return check_int(count, "count", 0)


def _as_uint8_array(t, what: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.uint8:
            raise ValueError(f"{what} must be a uint8 tensor, got {t.dtype}")
        return t.detach().cpu().contiguous().reshape(-1).numpy()
    if isinstance(t, np.ndarray):
        if t.dtype != np.uint8:
            raise ValueError(f"{what} must be a uint8 array, got {t.dtype}")
        return np.ascontiguousarray(t).reshape(-1)
    raise ValueError(f"{what} must be a torch.Tensor or numpy array, got {type(t).__name__}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed."""
    return math.ceil(_check_count(count) * check_bits(bits) / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, read flattened), each < 2**bits, into a 1-D uint8 tensor of
    ``ceil(codes.numel() * bits / 8)`` bytes. Inverse: ``unpack_bits(packed, bits, codes.numel())``."""
    bits = check_bits(bits)
    flat = _as_uint8_array(codes, "codes")
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"codes must be below 2**{bits} = {1 << bits}, got a code of {int(flat.max())}")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    out = np.empty(packed_size(flat.size, bits), dtype=np.uint8)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        # (n, bits) matrix of each code's low bits, LSB first; its row-major flattening is the stream.
        stream = np.unpackbits(chunk[:, None], axis=1, count=bits, bitorder="little")
        packed = np.packbits(stream.reshape(-1), bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a ``pack_bits`` stream, as a 1-D uint8 tensor."""
    bits = check_bits(bits)
    count = _check_count(count)
    flat = _as_uint8_array(packed, "packed")
    need = packed_size(count, bits)
    if flat.size != need:
        raise ValueError(f"packed stream has {flat.size} bytes, but {count} codes of {bits} bits need {need}")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    out = np.empty(count, dtype=np.uint8)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        raw = flat[first:first + math.ceil(n * bits / 8)]
        stream = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        # packbits pads each row to 8 bits with zeros in the high positions: the code itself.
        out[start:start + n] = np.packbits(stream, axis=1, bitorder="little").reshape(n)
    return torch.from_numpy(out)


def pack_mask(mask: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """A bool mask (any shape, read flattened) as ``ceil(numel / 8)`` bytes, element i in bit i % 8 of
    byte i // 8."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        arr = mask.detach().cpu().contiguous().reshape(-1).numpy()
    elif isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be a bool array, got {mask.dtype}")
        arr = mask.reshape(-1)
    else:
        raise ValueError(f"mask must be a torch.Tensor or numpy array, got {type(mask).__name__}")
    return torch.from_numpy(np.packbits(arr, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: Union[int, Sequence[int]]) -> torch.Tensor:
    """The bool mask of ``shape`` (or of that many elements, 1-D) that ``pack_mask`` packed."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in shape):
        raise ValueError(f"mask shape must be non-negative integers, got {shape!r}")
    count = int(np.prod(shape, dtype=np.int64))
    flat = _as_uint8_array(packed, "packed mask")
    need = math.ceil(count / 8)
    if flat.size != need:
        raise ValueError(f"packed mask has {flat.size} bytes, but {count} elements need {need}")
    bits = np.unpackbits(flat, count=count, bitorder="little").astype(np.bool_)
    return torch.from_numpy(bits).reshape(shape)
