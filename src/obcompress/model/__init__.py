"""nn.Module plumbing above the solvers: which layers to compress, their weights as (groups, rows,
cols), and the forward hooks that accumulate each layer's Hessian from calibration data."""

from .calibration import HessianHooks, calibration_batches, collect_hessians, run_model
from .layers import COMPRESSIBLE, LayerInfo, find_layers, is_compressible, set_weight_groups, weight_groups

__all__ = [
    "COMPRESSIBLE",
    "HessianHooks",
    "LayerInfo",
    "calibration_batches",
    "collect_hessians",
    "find_layers",
    "is_compressible",
    "run_model",
    "set_weight_groups",
    "weight_groups",
]
