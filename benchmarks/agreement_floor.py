"""How much top-1 agreement near-lossless compressions already cost on efficientnet-lite0's 132 photos.

Agreement with the dense model's top-1 counts every photo whose prediction changes; a photo whose
dense top-1 and top-2 probabilities are nearly equal changes under any perturbation. This prints
the dense margins (top-1 minus top-2 probability) and, for 8-bit and 6-bit compressions that keep
top-1 where it was, which photos change and at what margin: the floor under the agreement metric.
The ``*-pw`` recipes do the same for the 4-bit models of benchmarks/models.py's pw scope, and every
row also gives the agreement over the photos that are not near-ties (margin >= 0.05).

Usage:
    python benchmarks/agreement_floor.py --threads 2
    python benchmarks/agreement_floor.py --recipes obq4-pw,obq4-pw+statcorr,obq4asym-pw+statcorr
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import List, Optional

import torch
from models import EFFNET_KEPT, build_recipe

RECIPES = {
    "rtn8": {"solver": "rtn", "quantization": {"num_bits": 8}},
    "obq8": {"solver": "exact", "quantization": {"num_bits": 8}},
    "obq8+statcorr": {"solver": "exact", "quantization": {"num_bits": 8},
                      "corrections": {"statistics_correction": True}},
    "obq6+statcorr": {"solver": "exact", "quantization": {"num_bits": 6},
                      "corrections": {"statistics_correction": True}},
}
# The same, on just the layers benchmarks/models.py's "pw" scope keeps at 8 bits (stem + depthwise).
KEPT = [EFFNET_KEPT]
for _rid in ("rtn8", "obq8", "obq8+statcorr"):
    RECIPES[_rid.replace("8", "8-kept", 1)] = {**RECIPES[_rid], "targets": KEPT}
# 4-bit models exactly as benchmarks/models.py builds them on its "pw" scope (stem + depthwise exact
# OBQ 8-bit, the rest 4-bit): which photos they change, and how close their dense top-2 was.
PW_RECIPES = {"obq4-pw": "obq4", "obq4-pw+statcorr": "obq4+statcorr", "obq4asym-pw+statcorr": "obq4asym+statcorr"}
DEFAULT = ("rtn8", "obq8", "obq8+statcorr", "obq6+statcorr")
CONFIDENT = 0.05  # photos whose dense top-1 leads top-2 by at least this much probability


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(DEFAULT),
                    help=f"comma list of {', '.join([*RECIPES, *PW_RECIPES])} (all layers; *-kept: stem and depthwise only; "
                         "*-pw: the 4-bit pw scope)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES and r not in PW_RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from obcompress.api import compress
    from obcompress.zoo import efficientnet as E
    from obcompress.zoo.registry import resolve

    entry = resolve("efficientnet-lite0")
    data = E.load_tuxpaint(0)
    with torch.no_grad():
        p = torch.softmax(E.logits(entry.model, data.images), 1)
    top2 = p.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    dense_top1 = p.argmax(1)
    print(f"dense: {len(margin)} photos; top-1 minus top-2 probability below 0.05 / 0.10 / 0.20: "
          f"{int((margin < 0.05).sum())} / {int((margin < 0.1).sum())} / {int((margin < 0.2).sum())}")
    confident = margin >= CONFIDENT
    print(f"| recipe | top1 | agree | agree, {int(confident.sum())} photos of margin >= {CONFIDENT} | photos changed "
          "| their dense margins | seconds |")
    print("|---|---|---|---|---|---|---|")
    pristine = copy.deepcopy(entry.model)
    for rid in recipes:
        m = copy.deepcopy(pristine)
        t0 = time.perf_counter()
        recipe = RECIPES[rid] if rid in RECIPES else build_recipe("efficientnet-lite0", PW_RECIPES[rid], "pw", m)
        compress(m, recipe, entry.calibration, num_calibration_samples=256, progress=False)
        with torch.no_grad():
            changed = E.logits(m, data.images).argmax(1) != dense_top1
        metrics = entry.evaluate(m)
        margins = ", ".join(f"{float(x):.3f}" for x in sorted(margin[changed].tolist()))
        kept_confident = 100 * (1 - changed[confident].float().mean().item())
        print(f"| {rid} | {100 * metrics['top1']:.1f} | {100 * metrics['agreement']:.1f} | {kept_confident:.1f} | "
              f"{int(changed.sum())} | "
              f"{margins} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
