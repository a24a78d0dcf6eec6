"""``obcompress demo``: the library on a small real model, end to end, through its public API.

``solvers`` compares every layer solver with its baseline on each layer of the digits CNN (layer
loss, seconds, accuracy with all layers compressed at once); ``recipes`` compresses the whole
model with several recipes through ``api.compress`` and saves each as an artifact (accuracy, size
on disk, seconds). The CLI's ``obcompress demo`` runs both.
"""

from .recipes import RECIPES, ModelDemoReport, RecipeRow, format_model_table, run_model_demo
from .solvers import METHOD_KEYS, METHODS, DemoReport, LayerRow, Method, run_demo

__all__ = [
    "DemoReport",
    "LayerRow",
    "METHODS",
    "METHOD_KEYS",
    "Method",
    "ModelDemoReport",
    "RECIPES",
    "RecipeRow",
    "format_model_table",
    "run_demo",
    "run_model_demo",
]
