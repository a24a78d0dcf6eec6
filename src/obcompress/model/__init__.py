"""nn.Module plumbing above the solvers: which layers to compress, their weights as (groups, rows,
cols), and the forward hooks that accumulate each layer's Hessian from calibration data."""

from .activations import (
    ActivationQuantizer,
    attach,
    calibrate_activation_quantizers,
    quantizers_from_dict,
    quantizers_to_dict,
)
from .calibration import HessianHooks, calibration_batches, collect_hessians, count_samples, run_model
from .corrections import norm_statistics, reestimate_batchnorm, statistics_correction
from .layers import COMPRESSIBLE, LayerInfo, find_layers, is_compressible, set_weight_groups, weight_groups

__all__ = [
    "ActivationQuantizer",
    "COMPRESSIBLE",
    "attach",
    "calibrate_activation_quantizers",
    "count_samples",
    "norm_statistics",
    "quantizers_from_dict",
    "quantizers_to_dict",
    "reestimate_batchnorm",
    "statistics_correction",
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
