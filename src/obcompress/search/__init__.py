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
fit          FITCompress: empirical Fisher, the FIT noise model, path planning, applying a path
fitcompress  run_fitcompress: FIT path planning end to end, and its report
"""

from .space import LayerGeometry, SearchSpace, Variant, default_space, paper_levels

__all__ = ["LayerGeometry", "SearchSpace", "Variant", "default_space", "paper_levels"]
