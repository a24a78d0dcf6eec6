"""Non-uniform compression: per-layer variants, their costs, and the searches that choose them.

space        Variant, SearchSpace (the OBC paper's default); LayerGeometry (from obcompress.geometry)
database     build_database / load_database: every layer's variants on disk, resumable
costs        size (bits on disk), BOPs, FLOPs, measured latency (torch kernels, onnxruntime)
whole_model  a configuration's cost over the whole model, beside the searched layers' that goals count
dp           the bucketed dynamic program over layers, and the exact MILP cross-check
nonuniform   goals, select_dp, SPDY (the DP driven by per-layer sensitivity coefficients searched
             on calibration loss), the best uniform setting, single-layer calibration-loss scores
sweep        accuracy against budget for uniform / DP / SPDY at several goals
plots        Pareto plots and per-layer charts
fisher, fit_score, fit_path, fit_telescoping, fit_apply, fitcompress
             FIT and FITCompress (``fit`` gathers them): the empirical Fisher, FIT's noise model and
             the FIT scores of a database, FITCompress's path planning and its telescoping variant,
             applying a configuration, and the whole run
"""

from .space import LayerGeometry, SearchSpace, Variant, default_space, paper_levels

__all__ = ["LayerGeometry", "SearchSpace", "Variant", "default_space", "paper_levels"]
