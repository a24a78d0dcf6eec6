"""Embedded defaults: small real models and real data that install offline (no downloads)."""

from .digits import DigitsCNN, DigitsData, calibration_inputs, digits_cnn, evaluate, load_digits_data

__all__ = ["DigitsCNN", "DigitsData", "calibration_inputs", "digits_cnn", "evaluate", "load_digits_data"]
