"""Pure layer solvers on (W, H): no nn.Module, no I/O, any device.

W is a layer's weight as rows x cols (a conv weight flattened with ``flatten(1)``), H = 2 X X^T / n
the Hessian of the layer-wise objective ||W X - W_hat X||^2 / n over its inputs X (cols x n).
Every solver returns a SolverResult whose ``loss`` is ``layer_loss(W, result.weight, H)``.
"""

from ._common import SolverResult, layer_loss, num_pruned, parse_mask_structure, prepare_layer
from .baselines import magnitude_prune, rtn_quantize
from .gptq import gptq_quantize, sparsegpt_prune
from .grid import QuantGrid
from .hessian import HessianAccumulator, dampen, hessian, unfold_conv_input
from .obq import obq_quantize, support_refit
from .obs import ObsDatabase, exact_obs_database, exact_obs_prune

__all__ = [
    "HessianAccumulator",
    "ObsDatabase",
    "QuantGrid",
    "SolverResult",
    "dampen",
    "exact_obs_database",
    "exact_obs_prune",
    "gptq_quantize",
    "hessian",
    "layer_loss",
    "magnitude_prune",
    "num_pruned",
    "obq_quantize",
    "support_refit",
    "parse_mask_structure",
    "prepare_layer",
    "rtn_quantize",
    "sparsegpt_prune",
    "unfold_conv_input",
]
