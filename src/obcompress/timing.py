"""How obcompress times a call (the latency costs, torch kernels and onnxruntime sessions alike)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

__all__ = ["median_seconds"]


def median_seconds(fn: Callable[[], Any], repeats: int = 15, warmup: int = 3, sample_seconds: float = 1e-3,
                   max_calls: int = 1000) -> float:
    """The median over ``repeats`` samples of one call's seconds, after ``warmup`` calls.

    A call shorter than the clock can resolve well is repeated within a sample, as often as it
    takes to span about ``sample_seconds`` (at most ``max_calls``), and the sample is the mean."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-9)
    number = max(1, min(max_calls, math.ceil(sample_seconds / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)
