"""FIT (Fisher-information sensitivity) and FITCompress: one import for the pieces, each in its module.

fisher           the empirical Fisher of the compressible layers (``empirical_fisher``), on disk
fit_score        FIT's noise model (``fit_noise``), the measured perturbation (``fit_perturbation``),
                 FIT-importance masks, and FIT scores of every variant of an OBC database (``fit_scores``)
fit_path         FITCompress path planning as its authors define it (``plan_path``), the default
fit_telescoping  the telescoping variant whose A* is exact (``plan_telescoping_path``)
fit_apply        applying a configuration: round to nearest (the paper's (a)), fine-tune, OBC recipe (b)
fitcompress      end to end: Fisher, path, applications (``run_fitcompress``)
"""

from .fisher import Fisher, empirical_fisher, load_fisher, save_fisher
from .fit_apply import apply_path_rtn, apply_rtn_fit, finetune, fit_recipe
from .fit_path import DEFAULT_BITS, DEFAULT_SPARSITY, FitPath, PathStep, fake_quantize, plan_path
from .fit_score import fit_masks, fit_noise, fit_perturbation, fit_score_kind, fit_scores
from .fit_telescoping import TELESCOPING_SPARSITY, plan_telescoping_path

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_SPARSITY",
    "TELESCOPING_SPARSITY",
    "Fisher",
    "FitPath",
    "PathStep",
    "apply_path_rtn",
    "apply_rtn_fit",
    "empirical_fisher",
    "fake_quantize",
    "finetune",
    "fit_masks",
    "fit_noise",
    "fit_perturbation",
    "fit_recipe",
    "fit_score_kind",
    "fit_scores",
    "load_fisher",
    "plan_path",
    "plan_telescoping_path",
    "save_fisher",
]
