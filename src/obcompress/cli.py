"""Command line: ``obcompress demo`` and ``obcompress --version`` (compress, search, eval and export follow)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from obcompress import __version__


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
            if not args.solvers_only:
                run_model_demo(out_dir=args.out, progress=not args.no_progress)
                print()
            if not args.models_only:
                run_demo(
                    calibration_samples=args.calibration_samples,
                    methods=args.methods,
                    layers=args.layers,
                    progress=not args.no_progress,
                )
        except ValueError as e:
            parser.exit(2, f"obcompress demo: error: {e}\n")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
