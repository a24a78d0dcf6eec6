"""On-disk formats: bit packing and the compressed-model artifact (safetensors + JSON, never pickle)."""

from .artifact import FORMAT_VERSION, artifact_size, fp32_size, load, read_config, save, verify
from .packing import pack_bits, pack_mask, packed_size, unpack_bits, unpack_mask

__all__ = [
    "FORMAT_VERSION",
    "artifact_size",
    "fp32_size",
    "load",
    "pack_bits",
    "pack_mask",
    "packed_size",
    "read_config",
    "save",
    "unpack_bits",
    "unpack_mask",
    "verify",
]
