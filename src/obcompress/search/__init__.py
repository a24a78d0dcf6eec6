"""Non-uniform compression: per-layer variants, their costs, and the searches that choose them.

space      Variant, SearchSpace (the OBC paper's default), LayerGeometry
database   build_database / load_database: every layer's variants on disk, resumable
costs      size (bits on disk), BOPs, FLOPs, measured latency
dp         the bucketed dynamic program over layers, and the exact MILP cross-check
spdy       SPDY: the DP driven by per-layer sensitivity coefficients searched on calibration loss
plots      Pareto plots and per-layer charts
whole_model  a configuration's cost over the whole model, beside the searched layers' that goals count
"""

from .space import LayerGeometry, SearchSpace, Variant, default_space, paper_levels

__all__ = ["LayerGeometry", "SearchSpace", "Variant", "default_space", "paper_levels"]
