"""The whole-model half of ``obcompress demo``: the digits CNN compressed by several recipes.

Each recipe compresses a fresh copy of the trained digits CNN from calibration images of the
training split, the test accuracy is measured, and the compressed model is saved as an artifact
whose size on disk is reported next to the fp32 model's. The artifact of the last recipe and its
report stay in the output directory.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO

from ..api import compress

# The recipes of the demo, in the order they are printed.
RECIPES: Dict[str, dict] = {
    "RTN 4-bit": {"solver": "rtn", "quantization": {"num_bits": 4}},
    "magnitude 50%": {"solver": "magnitude", "sparsity": {"sparsity": 0.5}},
    "OBQ 4-bit": {"solver": "exact", "quantization": {"num_bits": 4}},
    "ExactOBS 50%": {"solver": "exact", "sparsity": {"sparsity": 0.5}},
    # conv1 has 9 inputs per output: no 2:4 groups there, so it is kept at 8 bits, dense.
    "2:4 + OBQ 4-bit": {"solver": "exact", "sparsity": {"mask_structure": "2:4"}, "quantization": {"num_bits": 4},
                        "layers": {"conv1": {"sparsity": None, "quantization": {"num_bits": 8}}}},
    "4w8a": {"solver": "exact", "quantization": {"num_bits": 4, "activations": {"num_bits": 8}}},
}


@dataclass
class RecipeRow:
    name: str
    accuracy: float
    bytes_on_disk: Optional[int]
    seconds: float
    loss: float


@dataclass
class ModelDemoReport:
    dense_accuracy: float
    fp32_bytes: int
    rows: List[RecipeRow]
    artifact: Optional[Path]


def run_model_demo(
    out_dir: Optional[Path] = None,
    recipes: Optional[Sequence[str]] = None,
    calibration_samples: int = 512,
    out: Optional[TextIO] = None,
    progress: bool = True,
) -> ModelDemoReport:
    from ..formats import artifact_size, fp32_size, save
    from ..zoo.digits import calibration_inputs, digits_cnn, evaluate, load_digits_data

    out = out if out is not None else sys.stdout
    names = list(RECIPES) if recipes is None else list(recipes)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown demo recipe(s) {unknown}: choose from {list(RECIPES)}")
    data = load_digits_data()
    dense = digits_cnn(pretrained=True, data=data)
    dense_acc = evaluate(dense, data.X_test, data.y_test)
    batches = list(calibration_inputs(calibration_samples, data).split(128))
    fp32 = fp32_size(dense)
    keep_dir = Path(out_dir) if out_dir is not None else None
    rows: List[RecipeRow] = []
    last_artifact = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            result = compress(model, RECIPES[name], batches, num_calibration_samples=calibration_samples,
                              progress=progress)
            seconds = time.perf_counter() - t0
            acc = evaluate(model, data.X_test, data.y_test)
            last = i == len(names) - 1
            target = (keep_dir if (last and keep_dir is not None) else Path(tmp) / f"r{i}")
            save(model, result, target)
            size = artifact_size(target)
            if last and keep_dir is not None:
                last_artifact = target
            rows.append(RecipeRow(name, acc, size, seconds, sum(r.loss for r in result.layers)))
    report = ModelDemoReport(dense_accuracy=dense_acc, fp32_bytes=fp32, rows=rows, artifact=last_artifact)
    print(format_model_table(report), file=out)
    return report


def format_model_table(report: ModelDemoReport) -> str:
    head = f"{'recipe':<20} {'test acc':>9} {'size on disk':>13} {'x smaller':>9} {'seconds':>8}"
    lines = ["digits CNN, whole model compressed by each recipe (sequence: calibrate, solve, save)", head,
             "-" * len(head), f"{'dense fp32':<20} {100 * report.dense_accuracy:>8.1f}% {report.fp32_bytes:>13,d}"]
    for r in report.rows:
        ratio = report.fp32_bytes / r.bytes_on_disk if r.bytes_on_disk else float("nan")
        lines.append(f"{r.name:<20} {100 * r.accuracy:>8.1f}% {r.bytes_on_disk:>13,d} {ratio:>9.1f} {r.seconds:>8.2f}")
    if report.artifact is not None:
        lines.append(f"artifact of '{report.rows[-1].name}' written to {report.artifact}")
    return "\n".join(lines)
