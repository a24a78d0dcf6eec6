"""Non-uniform compression: per-layer variants, their costs, and the searches that choose them.

space      Variant, SearchSpace (the OBC paper's default), LayerGeometry
database   build_database / load_database: every layer's variants on disk, resumable
costs      size (bits on disk), BOPs, FLOPs, measured latency
dp         the bucketed dynamic program over layers, and the exact MILP cross-check
spdy       SPDY: the DP driven by per-layer sensitivity coefficients searched on calibration loss
plots      Pareto plots and per-layer charts
fisher, fit_score, fit_path, fit_telescoping, fit_apply, fitcompress
           FIT and FITCompress (``fit`` gathers them): the empirical Fisher, FIT's noise model and
           the FIT scores of a database, FITCompress's path planning and its telescoping variant,
           applying a configuration, and the whole run
"""

from .space import LayerGeometry, SearchSpace, Variant, default_space, paper_levels

__all__ = ["LayerGeometry", "SearchSpace", "Variant", "default_space", "paper_levels"]
