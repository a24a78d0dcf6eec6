"""Figures of the reference implementations (OBC / GPTQ / SparseGPT official code), typed from
../shared/REFERENCE.md section 2: single thread, same (W, H), loss = 1/2 tr((W - W_hat) H (W - W_hat)^T)
with the undamped H.

Settings behind every figure: per-channel symmetric 4-bit grid (min-max, no MSE search); ExactOBS and
OBQ without dampening; GPTQ / SparseGPT with 1% dampening and block 128; 2:4 on conv layers groups
input channels at one kernel tap.

``REFERENCE[layer][rows][solver] = (seconds, loss)``; either may be None where REFERENCE.md gives
only the other. ``rows`` is the number of leading rows the reference ran (a row subset when smaller
than the layer's rows): a figure only compares with a run on exactly those rows.

Virtual layers ``scal_32xD`` are the first 32 rows and first D columns of syn_256x2304 (``VIRTUAL``).

Solver ids (as in benchmarks/solvers.py):
  rtn     RTN w4                  gptq     GPTQ w4             gptq_act  GPTQ w4 act-order
  obq     OBQ w4                  mag50    magnitude 50%       sgpt50    SparseGPT 50%
  obs50   ExactOBS 50%            mag24    magnitude 2:4       sgpt24    SparseGPT 2:4
  obs24   ExactOBS 2:4            obs_b4   ExactOBS block:4 50%
  joint24 ExactOBS 2:4 mask + OBQ w4 (joint OBC)
"""

from __future__ import annotations

# (seconds, loss) per solver, per layer, per number of leading rows used.
REFERENCE = {
    "digits_conv1": {
        32: {
            "rtn": (None, 2.708),
            "gptq": (0.0011, 1.656),
            "obq": (0.0045, 1.503),
            "mag50": (None, 93.82),
            "sgpt50": (0.0007, 71.61),
            "obs50": (0.0096, 40.34),
        },
    },
    "digits_fc2": {
        10: {
            "rtn": (None, 0.4629),
            "gptq": (0.017, 0.02896),
            "obq": (0.039, 0.05348),
            "mag50": (None, 18.35),
            "sgpt50": (0.013, 0.01853),
            "obs50": (0.041, 0.00391),
            "mag24": (None, 27.7),
            "sgpt24": (0.010, 0.5785),
            "obs24": (0.037, 0.0482),
        },
    },
    "digits_conv2": {
        64: {
            "rtn": (None, 6.715),
            "gptq": (0.031, 0.4826),
            # act-order loss from the "Greedy is not always best" paragraph (no time given)
            "gptq_act": (None, 0.3803),
            "obq": (1.733, 0.4876),
            "mag50": (None, 85.56),
            "sgpt50": (0.016, 5.705),
            "obs50": (1.514, 0.8544),
            "mag24": (None, 195.6),
            "sgpt24": (0.025, 9.196),
            "obs24": (1.348, 2.23),
        },
    },
    "digits_fc1": {
        128: {
            "rtn": (None, 2.553),
            "gptq": (0.058, 0.06838),
            "gptq_act": (None, 0.0481),
            "obq": (89.8, 0.07298),
            "mag50": (None, 21.33),
            "sgpt50": (0.042, 0.4246),
            "obs50": (60.0, 0.06239),
            "mag24": (None, 83.34),
            "sgpt24": (0.042, 1.009),
            "obs24": (30.2, 0.2121),
        },
    },
    "scal_32x72": {
        32: {
            "gptq": (0.0049, 0.02363),
            "obq": (0.026, 0.02267),
            "sgpt50": (0.0039, 0.0413),
            "obs24": (0.0087, 0.1053),
        },
    },
    "scal_32x144": {
        32: {
            "gptq": (0.0095, 0.09769),
            "obq": (0.094, 0.09529),
            "sgpt50": (0.0077, 0.08034),
            "obs24": (0.043, 0.1951),
        },
    },
    "scal_32x288": {
        32: {
            "gptq": (0.019, 0.3439),
            "obq": (0.550, 0.3246),
            "sgpt50": (0.015, 0.1449),
            "obs24": (0.255, 0.3155),
        },
    },
    "scal_32x576": {
        32: {
            "gptq": (0.041, 0.8756),
            "obq": (15.4, 0.8408),
            "sgpt50": (0.034, 0.2515),
            "obs24": (7.814, 0.5323),
        },
    },
    "syn_256x576": {
        256: {
            "rtn": (None, 57.71),
            "gptq": (0.049, 18.12),
            "obq": (124.1, 17.58),
            "mag50": (None, 18.02),
            "sgpt50": (0.051, 5.08),
            "obs50": (123.0, 3.583),
            "mag24": (None, 42.84),
            "sgpt24": (0.047, 12.8),
            "obs24": (60.7, 10.25),
        },
    },
    "minilm_l3_attn_out": {
        384: {
            "rtn": (None, 0.581),
            "gptq": (0.035, 0.1537),
            "obq": (15.4, 0.1495),
            "mag50": (None, 1.459),
            "sgpt50": (0.040, 0.4704),
            "obs50": (15.9, 0.2011),
            "mag24": (None, 4.225),
            "sgpt24": (0.065, 1.188),
            "obs24": (7.286, 0.8414),
        },
    },
    "minilm_l3_ffn_in": {
        1536: {
            "rtn": (None, 21.4),
            "gptq": (0.067, 7.837),
            "obq": (60.8, 10.35),
            "mag50": (None, 93.73),
            "sgpt50": (0.116, 21.06),
            "obs50": (66.1, 10.99),
            "mag24": (None, 181.3),
            "sgpt24": (0.078, 42.97),
            "obs24": (40.7, 29.36),
        },
    },
    "syn_256x1152": {
        32: {
            "rtn": (None, 9.624),
            "gptq": (0.109, 3.491),
            "obq": (113.3, 3.371),
            "mag50": (None, 2.296),
            "sgpt50": (0.099, 0.5443),
            "obs50": (113.6, 0.3922),
            "mag24": (None, 5.948),
            "sgpt24": (0.103, 1.537),
            "obs24": (57.6, 1.254),
            # from the extrapolation table (measured on these 32 rows; no loss given)
            "obs_b4": (30.7, None),
        },
        256: {
            "rtn": (None, 78.58),
            "gptq": (0.128, 24.63),
            "mag50": (None, 17.41),
            "sgpt50": (0.135, 4.87),
            "mag24": (None, 49.43),
            "sgpt24": (0.124, 13.93),
        },
    },
    "syn_256x2304": {
        8: {
            "rtn": (None, 1.796),
            "gptq": (0.403, 0.7374),
        },
        256: {
            "rtn": (None, 98.18),
            "gptq": (0.420, 30.3),
            "mag50": (None, 17.12),
            "sgpt50": (0.447, 4.527),
            "mag24": (None, 44.16),
            "sgpt24": (0.423, 12.27),
        },
    },
}

# The same official code with glibc told to keep big blocks (MALLOC_MMAP_THRESHOLD_=4294967296
# MALLOC_TRIM_THRESHOLD_=4294967296, no code change): seconds; losses unchanged.
# REFERENCE_TUNED[layer][rows][solver] = seconds.
REFERENCE_TUNED = {
    "digits_fc1": {128: {"obq": 21.2, "obs24": 10.2}},
    "syn_256x1152": {32: {"obq": 47.5}},
    "scal_32x576": {32: {"obq": 5.4}},
    "syn_256x576": {256: {"obq": 58.0}},
    "minilm_l3_ffn_in": {1536: {"obq": 66.0}},
}

# Runs where the reference stops with an error instead of a result.
REFERENCE_FAILURES = {
    ("minilm_l3_ffn_in", 1536, "obs_b4"): "reference fails: Cholesky error at damp 0 (cond H 7.8e8)",
}

# Extrapolated, NOT measured (row-subset time x rows_total / rows); kept for the record only and
# never used for speed-ups. EXTRAPOLATED[layer][rows][solver] = seconds.
EXTRAPOLATED = {
    "syn_256x1152": {256: {"obq": 906.6, "obs50": 908.6, "obs24": 460.9, "obs_b4": 245.2}},
}

# Virtual layers: name -> (source layer file stem, rows, cols) = leading rows / columns of the source.
VIRTUAL = {
    "scal_32x72": ("syn_256x2304", 32, 72),
    "scal_32x144": ("syn_256x2304", 32, 144),
    "scal_32x288": ("syn_256x2304", 32, 288),
    "scal_32x576": ("syn_256x2304", 32, 576),
}


def reference(layer: str, rows: int, solver: str):
    """(seconds, loss) of the reference on exactly these rows, or None."""
    return REFERENCE.get(layer, {}).get(rows, {}).get(solver)


def reference_tuned(layer: str, rows: int, solver: str):
    """Tuned-allocator seconds of the reference on exactly these rows, or None."""
    return REFERENCE_TUNED.get(layer, {}).get(rows, {}).get(solver)


def reference_rows(layer: str, solver: str = None):
    """Row counts for which the reference has figures (for ``solver``, or any solver), ascending."""
    per_rows = REFERENCE.get(layer, {})
    rows = set(r for r, figs in per_rows.items() if solver is None or solver in figs)
    rows |= set(r for r, figs in REFERENCE_TUNED.get(layer, {}).items() if solver is None or solver in figs)
    rows |= set(r for (lay, r, s) in REFERENCE_FAILURES if lay == layer and (solver is None or s == solver))
    return sorted(rows)
