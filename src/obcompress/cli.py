"""Command line: ``obcompress compress | eval | report | demo`` (search and export follow)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from obcompress import __version__
from obcompress.zoo._fetch import ZooUnavailable


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from obcompress.demo import METHOD_KEYS

    parser = argparse.ArgumentParser(
        prog="obcompress",
        description="Post-training joint pruning and quantization with exact Optimal Brain Compression solvers.",
    )
    parser.add_argument("--version", action="version", version=f"obcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run every layer solver on a small digits CNN and print losses, times and accuracy",
        description="Train (or load from the cache) a digits CNN and compare every layer solver on its layers.",
    )
    demo.add_argument("--calibration-samples", type=int, default=1024, metavar="N",
                      help="calibration images from the training split (1..1297, default 1024)")
    demo.add_argument("--methods", type=_csv, default=None, metavar="K1,K2",
                      help="subset of methods (baselines are added): " + ",".join(METHOD_KEYS))
    demo.add_argument("--layers", type=_csv, default=None, metavar="L1,L2",
                      help="subset of layers: conv1,conv2,fc1,fc2")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    comp = sub.add_parser("compress", help="compress a model with a recipe and write an artifact",
                          description="Compress MODEL (a zoo name or path/to/file.py:factory) as RECIPE says, "
                                      "evaluate it and write the artifact to --out.")
    comp.add_argument("--model", required=True, metavar="M", help="zoo name (digits-cnn, efficientnet-lite0, "
                      "minilm) or path/to/file.py:factory returning (model, calibration data, evaluate)")
    comp.add_argument("--recipe", required=True, metavar="R", help="recipe YAML file (or YAML text)")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                      help="override a recipe key, e.g. --set quantization.num_bits=3 (repeatable)")
    comp.add_argument("--out", required=True, metavar="DIR", help="artifact directory to write")
    comp.add_argument("--calibration-samples", type=int, default=256, metavar="N")
    comp.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="evaluate a model, dense or from an artifact")
    ev.add_argument("--model", required=True, metavar="M")
    ev.add_argument("--artifact", metavar="DIR", help="load this artifact into the model first")
    rep = sub.add_parser("report", help="print an artifact's per-layer report and sizes")
    rep.add_argument("directory", metavar="DIR")
    demo.add_argument("--out", default="out/demo", metavar="DIR",
                      help="where the artifact of the last whole-model recipe is written (default out/demo)")
    demo.add_argument("--solvers-only", action="store_true", help="only the per-layer solver comparison")
    demo.add_argument("--models-only", action="store_true", help="only the whole-model recipes")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from obcompress.demo import run_demo
        from obcompress.model_demo import run_model_demo

        try:
            # The per-layer part first: it checks its options before any training.
            if not args.models_only:
                run_demo(
                    calibration_samples=args.calibration_samples,
                    methods=args.methods,
                    layers=args.layers,
                    progress=not args.no_progress,
                )
                print()
            if not args.solvers_only:
                run_model_demo(out_dir=args.out, progress=not args.no_progress)
        except ValueError as e:
            parser.exit(2, f"obcompress demo: error: {e}\n")
        return 0
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "report":
            return _report(args)
    except (ValueError, ZooUnavailable) as e:
        # ZooUnavailable: an optional package or a data download is missing; its message says what to do.
        parser.exit(2, f"obcompress {args.command}: error: {e}\n")
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


def _print_metrics(title: str, metrics: dict) -> None:
    print(title + ": " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _resolve(model: str, calibration_samples: Optional[int] = None):
    from obcompress.zoo.registry import ZOO, resolve

    # Zoo entries size their calibration set themselves; a user's factory takes no options.
    if model in ZOO and calibration_samples is not None:
        return resolve(model, num_calibration=calibration_samples)
    return resolve(model)


def _compress(args) -> int:
    from obcompress.api import compress
    from obcompress.formats import artifact_size, fp32_size, save
    from obcompress.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe)
    if args.overrides:
        recipe = recipe.with_overrides(args.overrides)
    entry = _resolve(args.model, args.calibration_samples)
    fp32 = fp32_size(entry.model)
    result = compress(entry.model, recipe, entry.calibration, num_calibration_samples=args.calibration_samples,
                      progress=not args.no_progress)
    print(result.table())
    result.metrics = entry.evaluate(entry.model)
    _print_metrics("compressed", result.metrics)
    save(entry.model, result, args.out)
    size = artifact_size(args.out)
    print(f"artifact {args.out}: {size:,d} bytes on disk, fp32 {fp32:,d} bytes ({fp32 / size:.1f}x smaller)")
    return 0


def _eval(args) -> int:
    from obcompress.formats import load

    entry = _resolve(args.model)
    if args.artifact:
        load(args.artifact, entry.model)
    _print_metrics("compressed" if args.artifact else "dense", entry.evaluate(entry.model))
    return 0


def _report(args) -> int:
    import json
    from pathlib import Path

    from obcompress.formats import read_config

    directory = Path(args.directory)
    config = read_config(directory)
    try:
        report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: cannot read report.json ({e})") from None
    head = f"{'layer':<32} {'method':>12} {'sparsity':>8} {'bits':>4} {'loss':>11} {'stored B':>10} {'fp32 B':>10}"
    print(head)
    print("-" * len(head))
    sizes = report.get("layer_bytes", {})
    for r in report.get("layers", []):
        b = sizes.get(r["name"], {})
        bits = "-" if r.get("bits") is None else str(r["bits"])
        print(f"{r['name']:<32} {r['method']:>12} {r['sparsity']:>8.3f} {bits:>4} {r['loss']:>11.4g} "
              f"{b.get('stored', 0):>10,d} {b.get('fp32', 0):>10,d}")
    print(f"artifact {report['artifact_bytes']:,d} bytes on disk, fp32 {report['fp32_bytes']:,d} bytes "
          f"({report['compression_ratio']}x smaller); format version {config['format_version']}")
    if report.get("metrics"):
        _print_metrics("metrics", report["metrics"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
