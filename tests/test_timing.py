import time

from obcompress.timing import median_seconds


def test_short_calls_are_repeated_within_a_sample_long_ones_are_not():
    calls = []
    median_seconds(lambda: calls.append(1), repeats=5, warmup=2)
    # warmup, one call to size the samples, then 5 samples of many calls each
    assert len(calls) > 2 + 1 + 5 * 10
    calls.clear()
    t = median_seconds(lambda: (calls.append(1), time.sleep(0.002)), repeats=3, warmup=1)
    assert len(calls) == 1 + 1 + 3 and t >= 0.002
