"""Command line: ``obcompress compress | eval | report | demo | search | export``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from obcompress import __version__
from obcompress.files import write_text

# Nothing heavy at import time: `obcompress --help` must not wait for torch (every command imports
# what it needs when it runs).


class _SolversHelp(argparse.RawDescriptionHelpFormatter):
    """compress --help: the solver registry after the options (imported only when shown: it needs
    torch, which `obcompress --help` must not wait for)."""

    def format_help(self) -> str:
        from obcompress.solvers.registry import describe

        lines = describe().splitlines()
        self.add_text("solvers (the recipe's `solver:`; obcompress.solvers.registry):\n"
                      + "\n".join("  " + line for line in lines))
        return super().format_help()


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


_MODEL_HELP = ("zoo name (digits-cnn, efficientnet-lite0, minilm), path/to/file.py:factory returning "
               "(model, calibration data, evaluate), or hf:DIR (a local Hugging Face model directory); see "
               "examples/ and the README")


def add_hf_options(parser) -> None:
    """The options of an ``hf:DIR`` model, for every command that takes ``--model``
    (obcompress.zoo.hf reads them)."""
    g = parser.add_argument_group("Hugging Face models (--model hf:DIR)")
    g.add_argument("--hf-class", default=None, metavar="CLASS",
                   help="transformers class to load DIR with (default: the AutoModelFor... its config names)")
    g.add_argument("--data", default=None, metavar="text:FILE",
                   help="calibration: --calibration-samples windows of --seq-len tokens spread over FILE")
    g.add_argument("--eval-data", default=None, metavar="perplexity:FILE",
                   help="evaluation: perplexity on consecutive non-overlapping --seq-len windows of FILE")
    g.add_argument("--seq-len", type=int, default=None, metavar="L", help="tokens per window (default 512)")
    g.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="evaluate on at most the first N windows (default: all the file holds)")
_CALIBRATION_HELP = "calibration samples to use (default %(default)s); data beyond them is left unused, with a warning"
# The selection methods a sweep compares (search.sweep checks the same names).
SWEEP_METHODS = ("uniform", "dp", "spdy")


def _executor_args(p, what: str) -> None:
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help=f"where {what} run: local (this process, default) or ray (one Ray task per layer; "
                        "pip install 'obcompress[ray]')")
    p.add_argument("--ray-address", default=None, metavar="HEAD:6379",
                   help="join this Ray cluster (started with `ray start --head`); default: a local Ray on this "
                        "machine's cores")


def _methods(text: str) -> list:
    out = _csv(text)
    bad = [m for m in out if m not in SWEEP_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}: choose from {', '.join(SWEEP_METHODS)}")
    return out


def build_parser() -> argparse.ArgumentParser:
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
                      help="subset of method keys, e.g. obq4,obs24 (baselines are added; an unknown key "
                           "lists them all)")
    demo.add_argument("--layers", type=_csv, default=None, metavar="L1,L2",
                      help="subset of layers: conv1,conv2,fc1,fc2")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    comp = sub.add_parser("compress", help="compress a model with a recipe and write an artifact",
                          description="Compress MODEL (a zoo name or path/to/file.py:factory) as RECIPE says, "
                                      "evaluate it and write the artifact to --out.",
                          formatter_class=_SolversHelp)
    comp.add_argument("--model", required=True, metavar="M", help="zoo name (digits-cnn, efficientnet-lite0, "
                      "minilm), path/to/file.py:factory returning (model, calibration data, evaluate), or hf:DIR "
                      "(a local Hugging Face model directory)")
    comp.add_argument("--recipe", required=True, metavar="R", help="recipe YAML file (or YAML text)")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                      help="override a recipe key, e.g. --set quantization.num_bits=3 (repeatable)")
    comp.add_argument("--out", required=True, metavar="DIR", help="artifact directory to write")
    comp.add_argument("--calibration-samples", type=int, default=256, metavar="N", help=_CALIBRATION_HELP)
    comp.add_argument("--no-progress", action="store_true", help="no progress bar")
    _executor_args(comp, "the per-layer solves")
    comp.add_argument("--device", default=None, metavar="D",
                      help="where Hessians and solvers run: cpu, cuda, cuda:1 (default: the recipe's, else each "
                           "layer's own device)")
    add_hf_options(comp)
    ev = sub.add_parser("eval", help="evaluate a model, dense or from an artifact",
                        description="Evaluate MODEL with its own evaluation (accuracy, perplexity, ...): the dense "
                                    "model, or with --artifact the compressed one loaded into it.")
    ev.add_argument("--model", required=True, metavar="M", help=_MODEL_HELP)
    ev.add_argument("--artifact", metavar="DIR", help="load this artifact into the model first")
    add_hf_options(ev)
    rep = sub.add_parser("report", help="print an artifact's per-layer report and sizes, or plot a search sweep",
                         description="DIR is an artifact (prints its per-layer report) or a directory written by "
                                     "`obcompress search sweep` (draws pareto_<cost>.png and layers_*.png into it).")
    rep.add_argument("directory", metavar="DIR")
    _search_parser(sub)
    ex = sub.add_parser("export", help="export a compressed model (artifact) to ONNX or compressed-tensors",
                        description="Load the artifact DIR into MODEL and write it as ONNX (quantized weights as "
                                    "int8/int4 behind DequantizeLinear, Quantize/DequantizeLinear on quantized inputs; "
                                    "traced on the first calibration batch), or, for a Hugging Face model, as a "
                                    "compressed-tensors checkpoint directory that transformers and vLLM load.")
    ex.add_argument("--model", required=True, metavar="M", help="zoo name, path/to/file.py:factory or hf:DIR")
    ex.add_argument("--artifact", required=True, metavar="DIR", help="artifact written by `obcompress compress`")
    ex.add_argument("--format", choices=("onnx", "compressed-tensors"), default="onnx",
                    help="onnx (a file) or compressed-tensors (a Hugging Face directory; hf: models)")
    ex.add_argument("--out", required=True, metavar="PATH", help="file (onnx) or directory (compressed-tensors) to write")
    ex.add_argument("--ct-version", default=None, metavar="V",
                    help="compressed-tensors version to lay the checkpoint out for (default: the installed one, "
                         "else the newest tested)")
    ex.add_argument("--asymmetric", choices=("auto", "zero-point", "widen"), default="auto",
                    help="compressed-tensors: asymmetric grids as the format's zero points (vLLM reads them; "
                         "transformers with compressed-tensors >= 0.18 cannot), widened to symmetric grids one bit "
                         "wider (exact, loads everywhere), or auto (zero points where transformers loads them)")
    ex.add_argument("--opset", type=int, default=21, metavar="N", help="ONNX opset (default 21; int4 and "
                    "group grids need 21)")
    ex.add_argument("--weight-format", choices=("auto", "int8"), default="auto",
                    help="auto: int4 for grids of <= 4 bits, else int8 (default); int8: int8 for all")
    add_hf_options(ex)
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
        from obcompress.demo import run_demo, run_model_demo

        import time

        t0 = time.perf_counter()
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
        print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
        return 0
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "report":
            return _report(args)
        if args.command == "search":
            return _search(args, parser)
        if args.command == "export":
            return _export(args)
    except Exception as e:
        from obcompress.zoo import ZooUnavailable

        # ZooUnavailable: an optional package or a data download is missing; its message says what to do.
        if not isinstance(e, (ValueError, ZooUnavailable)):
            raise
        parser.exit(2, f"obcompress {args.command}: error: {e}\n")
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


def _print_metrics(title: str, metrics: dict) -> None:
    if not metrics:
        print(f"{title}: no evaluation (an hf: model needs --eval-data perplexity:FILE)")
        return
    print(title + ": " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _resolve(model: str, calibration_samples: Optional[int] = None, args=None):
    from obcompress.zoo.hf import HF_PREFIX, cli_options
    from obcompress.zoo.registry import ZOO, resolve

    hf = cli_options(args, model) if args is not None else {}
    if model.startswith(HF_PREFIX):
        if calibration_samples is not None:
            hf["num_calibration"] = calibration_samples
        return resolve(model, **hf)
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
    entry = _resolve(args.model, args.calibration_samples, args)
    fp32 = fp32_size(entry.model)
    result = compress(entry.model, recipe, entry.calibration, num_calibration_samples=args.calibration_samples,
                      progress=not args.no_progress, executor=args.executor, ray_address=args.ray_address,
                      device=args.device)
    print(result.table())
    result.metrics = entry.evaluate(entry.model)
    _print_metrics("compressed", result.metrics)
    save(entry.model, result, args.out)
    size = artifact_size(args.out)
    print(f"artifact {args.out}: {size:,d} bytes on disk, fp32 {fp32:,d} bytes ({fp32 / size:.1f}x smaller)")
    return 0


def _eval(args) -> int:
    from obcompress.formats import load

    entry = _resolve(args.model, args=args)
    if args.artifact:
        load(args.artifact, entry.model)
    _print_metrics("compressed" if args.artifact else "dense", entry.evaluate(entry.model))
    return 0


def _report(args) -> int:
    import json
    from pathlib import Path

    from obcompress.formats import verify

    directory = Path(args.directory)
    from obcompress.search.sweep import SWEEP_FILE, write_sweep_plots

    if (directory / SWEEP_FILE).exists():
        from obcompress.search.sweep import read_sweep, sweep_table

        print(sweep_table(read_sweep(directory)))
        for p in write_sweep_plots(directory):
            print(f"wrote {p}")
        return 0
    # The stored figures are only true of the files they describe: check those first.
    config = verify(directory)
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
        loss = "-" if r.get("loss") is None else f"{r['loss']:.4g}"  # not measured: magnitude / RTN without H
        print(f"{r['name']:<32} {r['method']:>12} {r['sparsity']:>8.3f} {bits:>4} {loss:>11} "
              f"{b.get('stored', 0):>10,d} {b.get('fp32', 0):>10,d}")
    print(f"artifact {report['artifact_bytes']:,d} bytes on disk, fp32 {report['fp32_bytes']:,d} bytes "
          f"({report['compression_ratio']}x smaller); format version {config['format_version']}")
    engines = sorted({e for r in report.get("layers", []) for e in str(r.get("engine", "")).split("+") if e})
    if engines:
        print(f"solver engine: {'+'.join(engines)}")
    for name, why in (report.get("unfit") or {}).items():
        print(f"not pruned (unfit_layers: dense): {name}: {why}")
    if report.get("metrics"):
        _print_metrics("metrics", report["metrics"])
    return 0


def _export(args) -> int:
    from obcompress.formats import artifact_size, fp32_size, load
    from obcompress.formats.onnx_export import export_onnx
    from obcompress.model.calibration import calibration_batches

    if args.format == "compressed-tensors":
        return _export_compressed_tensors(args)
    entry = _resolve(args.model, args=args)
    load(args.artifact, entry.model)
    # A few samples, not one: a batch of one would fix the exported batch size to 1.
    example = calibration_batches(entry.calibration, 8)[0]
    out = export_onnx(entry.model, example, args.out, artifact_dir=args.artifact, opset=args.opset,
                      weight_format=args.weight_format)
    kinds: dict = {}
    for e in out.layers.values():
        key = e["weight"] + (f"+a{e['activation_bits']}" if e["activation_bits"] else "")
        kinds[key] = kinds.get(key, 0) + 1
    print(f"{out.path}: {out.bytes:,d} bytes, opset {out.opset}, "
          f"{'dynamic' if out.dynamic_batch else 'fixed'} batch; layers: "
          + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print(f"artifact {artifact_size(args.artifact):,d} bytes, fp32 {fp32_size(entry.model):,d} bytes")
    return 0


def _export_compressed_tensors(args) -> int:
    import warnings

    from obcompress.formats import artifact_size
    from obcompress.formats.compressed_tensors import export_compressed_tensors

    entry = _resolve(args.model, args=args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same notes are printed below, once
        out = export_compressed_tensors(entry.model, args.artifact, args.out, ct_version=args.ct_version,
                                        asymmetric=args.asymmetric, progress=True)
    print(out.table())
    for n in out.warnings:
        print(f"warning: {n}", file=sys.stderr)
    print(f"artifact {artifact_size(args.artifact):,d} bytes; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out.directory)!r}) and compressed-tensors installed")
    return 0


def _search_parser(sub) -> None:
    se = sub.add_parser("search", help="non-uniform compression: build a layer database, choose per-layer variants",
                        description="Build a database of every layer's variants (resumable), then choose one "
                                    "variant per layer under a budget with the DP or SPDY; the result is a recipe "
                                    "that `obcompress compress` applies.")
    ss = se.add_subparsers(dest="search_command", metavar="STEP")

    def common(p, db_required=True):
        p.add_argument("--model", required=True, metavar="M", help=_MODEL_HELP)
        p.add_argument("--db", required=db_required, metavar="DIR", help="database directory")
        p.add_argument("--calibration-samples", type=int, default=256, metavar="N", help=_CALIBRATION_HELP)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        _executor_args(p, "the per-layer records (build) or the re-fits of stitched variants")
        add_hf_options(p)

    b = ss.add_parser("build", help="build or resume a model's database",
                      description="Compress every selected layer in every variant of the space (the OBC paper's "
                                  "by default) and store the records under --db; run it again to resume.")
    common(b)
    b.add_argument("--space", metavar="FILE", help="YAML/JSON {variants: [keys...]} instead of the default space, "
                   "keys like dense, s0.5217, 2:4, block4@0.7458, w4, 2:4+w4, s0.5217+w3")
    b.add_argument("--targets", type=_csv, default=None, metavar="T1,T2", help="layers to include (names, classes, re:)")
    b.add_argument("--ignore", type=_csv, default=[], metavar="I1,I2", help="layers to leave out")
    b.add_argument("--overwrite", action="store_true", help="replace a database of another model/data/space in --db")
    b.add_argument("--stop-after", type=int, default=None, metavar="K", help="build at most K more layers now")

    def goal_args(p):
        p.add_argument("--activation-bits", type=int, default=8, metavar="B",
                       help="activation width the BOPs cost assumes for quantized layers, written into the recipe "
                            "(0: weights only; default 8)")
        p.add_argument("--buckets", type=int, default=10000, help="DP budget buckets (default 10000)")
        p.add_argument("--spdy-restarts", type=int, default=16, metavar="N",
                       help="SPDY: random restarts of its coefficient search (default 16)")
        p.add_argument("--spdy-steps", type=int, default=100, metavar="N",
                       help="SPDY: local-search steps after the restarts (default 100)")
        p.add_argument("--spdy-samples", type=int, default=64, metavar="N",
                       help="calibration samples SPDY scores a candidate on (default 64)")
        p.add_argument("--correction", choices=("none", "bn", "statcorr"), default="none",
                       help="run on each candidate before scoring/evaluating it, and written into the recipe: bn "
                            "(BatchNorm re-estimation) or statcorr (statistics correction toward the dense model)")

    c = ss.add_parser("select", help="choose per-layer variants for one goal and write the recipe",
                      description="Choose one variant per layer from the database --db so that the searched "
                                  "layers meet --goal (a fraction of their dense cost), and write the recipe "
                                  "that `obcompress compress` applies unchanged.")
    common(c)
    c.add_argument("--goal", required=True, metavar="COST=FRACTION", help="e.g. bops=1/8, size=1/16, flops=1/4")
    c.add_argument("--method", choices=("dp", "exact", "spdy", "uniform"), default="dp",
                   help="dp (bucketed), exact (MILP), spdy, or the best uniform setting by score")
    c.add_argument("--out", required=True, metavar="FILE", help="recipe YAML to write")
    c.add_argument("--eval", action="store_true", help="evaluate the chosen configuration (stitched from the database)")
    c.add_argument("--score", choices=("error", "loss", "calibration_loss", "fit"), default="error",
                   help="per-layer score the DP (and SPDY) sums: error (normalised layer error, default), loss "
                        "(layer loss), calibration_loss (single-layer swaps, from `obcompress search scores`), fit "
                        "(sum F (theta - theta_hat)^2 of each variant's weights, the Fisher of `search fit --db`, "
                        "estimated and kept beside the database when missing)")
    c.add_argument("--fisher-batches", type=int, default=100, metavar="N",
                   help="with --score fit: batches for the Fisher (as `search fit`; one pass at most)")
    c.add_argument("--max-layer-error", type=_max_layer_error, default="auto", metavar="X",
                   help="leave out variants whose normalised layer error exceeds X (dp, exact, spdy); default auto: "
                        "0.1 with --score fit (FIT is a second-order estimate near the dense weights), none otherwise; "
                        "'none' for no cap")
    goal_args(c)

    sc = ss.add_parser("scores", help="measure the calibration-loss increase of each single-layer swap",
                       description="For each layer and variant, the calibration loss (KL or normalised MSE to the "
                                   "dense outputs) of the dense model with only that layer swapped; stored in the "
                                   "database for `select --score calibration_loss`. Resumable.")
    common(sc)
    sc.add_argument("--variants", type=_csv, default=None, metavar="K1,K2", help="variant keys to score (default all)")
    sc.add_argument("--samples", type=int, default=64, metavar="N", help="calibration samples per measurement")

    fp = ss.add_parser("fit", help="FITCompress: Fisher-guided path planning to a size or BOPs goal",
                       description="Estimate the empirical Fisher on the calibration data (labelled by the dense "
                                   "model's own predictions when the data has no labels), plan FITCompress's path "
                                   "through per-layer bits and a global FIT-importance mask to the goal (its "
                                   "authors' path cost, heuristic, per-node masks and Fisher refresh), write the "
                                   "per-layer recipe and the path (fit_path.json, fit_path.png).")
    fp.add_argument("--model", required=True, metavar="M", help="zoo name or path/to/file.py:factory")
    fp.add_argument("--goal", required=True, metavar="COST=FRACTION", help="e.g. size=1/12 or bops=1/8")
    fp.add_argument("--out", required=True, metavar="DIR", help="directory for recipe.yaml and the path report")
    fp.add_argument("--calibration-samples", type=int, default=256, metavar="N", help=_CALIBRATION_HELP)
    fp.add_argument("--planner", choices=("fitcompress", "telescoping"), default="fitcompress",
                    help="fitcompress (as its authors define it, default) or telescoping (the variant whose A* is "
                         "exact with --lam 0: FIT noise of configurations, masks ranked once)")
    fp.add_argument("--search", choices=("beam", "astar"), default="beam",
                    help="beam (width --beam-width; 1 = the reference's greedy walk, default) or a true A*")
    fp.add_argument("--beam-width", type=int, default=1, metavar="K",
                    help="nodes kept per step of the beam search (default 1: greedy)")
    fp.add_argument("--lam", type=float, default=1.0, help="weight of the distance-to-goal heuristic (default 1)")
    fp.add_argument("--apply", choices=("none", "obc", "rtn", "both"), default="obc",
                    help="evaluate the configuration: obc = the recipe through the exact solvers; rtn = the "
                         "paper's round-to-nearest with the FIT mask (+ --finetune-epochs)")
    fp.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                    help="--apply rtn: epochs of straight-through fine-tuning with frozen masks (default 0)")
    fp.add_argument("--finetune-lr", type=float, default=1e-4, metavar="LR",
                    help="Adam learning rate of the fine-tune (default 1e-4; a few epochs on calibration data "
                         "may need 1e-3 to move weights across grid points)")
    fp.add_argument("--fisher-batches", type=int, default=100, metavar="N",
                    help="batches for the Fisher (the reference's 100; one pass at most over the data)")
    fp.add_argument("--refresh-batches", type=int, default=20, metavar="N",
                    help="re-estimate the Fisher at every expanded node from N batches (the reference's approximate "
                         "mode, 20; one pass at most); 0: one Fisher for the whole path")
    fp.add_argument("--db", metavar="DIR", default=None,
                    help="keep the Fisher beside this database (DIR/fisher.safetensors), reused when the weights, "
                         "data and settings are the same; `search select --score fit` reads it")
    fp.add_argument("--activation-bits", type=int, default=8, metavar="B",
                    help="activation width the BOPs cost assumes for quantized layers (default 8)")
    fp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_hf_options(fp)

    w = ss.add_parser("sweep", help="accuracy of uniform / DP / SPDY at several goals (then `obcompress report DIR`)",
                      description="For every goal and method, choose a configuration from the database, stitch "
                                  "it and evaluate it as its recipe runs; writes sweep.json and the recipes to "
                                  "--out (`obcompress report DIR` draws the plots).")
    common(w)
    w.add_argument("--goals", type=_csv, required=True, metavar="G1,G2", help="e.g. bops=1/4,bops=1/8,size=1/16")
    w.add_argument("--methods", type=_methods, default=["uniform", "dp", "spdy"], metavar="M1,M2",
                   help="comma list of " + ", ".join(SWEEP_METHODS) + " (default uniform,dp,spdy)")
    w.add_argument("--out", required=True, metavar="DIR", help="directory for sweep.json, recipes and plots")
    goal_args(w)


def _search(args, parser) -> int:
    import yaml

    from obcompress.search import SearchSpace, default_space
    from obcompress.search.database import build_database, load_database

    if args.search_command is None:
        parser.exit(2, "obcompress search: error: give a step: build, select, sweep or fit\n")
    entry = _resolve(args.model, args.calibration_samples, args)
    progress = not args.no_progress
    if args.search_command == "fit":
        return _search_fit(args, entry, progress)
    if args.search_command == "build":
        space = default_space()
        if args.space:
            try:
                with open(args.space, encoding="utf-8") as f:
                    # Every scalar as text: YAML 1.1 would read an unquoted 2:4 as the number 124.
                    d = yaml.load(f, Loader=yaml.BaseLoader)
                if isinstance(d, dict) and isinstance(d.get("symmetric"), str):
                    d["symmetric"] = d["symmetric"].strip().lower() in ("true", "yes", "on", "1")
                if isinstance(d, dict) and isinstance(d.get("damp"), str) and d["damp"] != "auto":
                    d["damp"] = float(d["damp"])
                space = SearchSpace.from_dict(d)
            except OSError as e:
                raise ValueError(f"--space {args.space}: {e}") from None
        db = build_database(entry.model, entry.calibration, args.db, space,
                            num_calibration_samples=args.calibration_samples, targets=args.targets,
                            ignore=args.ignore, overwrite=args.overwrite, progress=progress,
                            stop_after=args.stop_after, executor=args.executor, ray_address=args.ray_address)
        total = len(db.manifest["model"])
        print(f"database {args.db}: {len(db.layers)} of {total} layers, "
              f"{sum(len(e.variants) for e in db.layers.values())} variants, {db.nbytes / 2**20:.1f} MiB on disk, "
              f"{db.build_seconds:.0f} s of building")
        if len(db.layers) < total:
            print("incomplete: run the same command again to resume")
        return 0
    db = load_database(args.db, entry.model, executor=args.executor, ray_address=args.ray_address)
    if args.search_command == "scores":
        from obcompress.search.nonuniform import layer_loss_scores

        out = layer_loss_scores(db, entry.model, entry.calibration, num_samples=args.samples,
                                variants=args.variants, progress=progress)
        print(f"calibration-loss scores of {sum(len(v) - 1 for v in out.values())} single-layer swaps over "
              f"{len(out)} layers stored in {args.db}")
        return 0
    act = args.activation_bits or None
    if args.search_command == "select":
        from obcompress.search.nonuniform import best_uniform, parse_goal, select_dp, spdy
        from obcompress.model.calibration import calibration_batches
        from obcompress.search.sweep import RECIPE_CORRECTIONS, as_recipe_runs, make_correction

        goal = parse_goal(args.goal, **({"activation_bits": act} if args.goal.strip().startswith("bops") and act else {}))
        batches = calibration_batches(entry.calibration, args.calibration_samples)
        # Dense statistics (statcorr) only where a candidate is corrected; the model is still dense here.
        need = args.eval or args.method == "spdy"
        fix = make_correction(args.correction if need else "none", batches, entry.model)
        score = args.score
        if score == "fit":
            score = _fit_score(args, entry, db, progress)
        if args.method == "uniform":
            cfg = best_uniform(db, goal)[0]
        elif args.method == "spdy":
            cfg = spdy(db, entry.model, batches, goal, num_samples=args.spdy_samples, restarts=args.spdy_restarts,
                       steps=args.spdy_steps, correction=fix, progress=progress, score=score,
                       max_layer_error=args.max_layer_error)
        else:
            cfg = select_dp(db, goal, buckets=args.buckets, exact=args.method == "exact", score=score,
                            max_layer_error=args.max_layer_error)
        recipe = cfg.recipe(db, activation_bits=act if goal.cost.name == "bops" else None)
        if args.correction in RECIPE_CORRECTIONS:
            recipe["corrections"] = dict(RECIPE_CORRECTIONS[args.correction])
        # The goal counts the searched layers only: say what that is for the whole model.
        from obcompress.search.whole_model import WholeModel

        rest = WholeModel(goal.cost, entry.model, db.names, batches)
        whole = rest.of(cfg.cost, cfg.dense_cost)
        write_text(args.out, f"# {cfg.method} at {args.goal}: {whole.summary()}\n# {rest.describe()}\n"
                   + yaml.safe_dump(recipe, sort_keys=False))
        print(f"{'layer':<40} {'variant':>14} {'score':>10}")
        for n, v in cfg.choice.items():
            kind = score if args.method in ("dp", "exact", "spdy") else "error"
            print(f"{n:<40} {v.key:>14} {db.layers[n].score(v.key, kind):>10.4g}")
        print(f"{cfg.method}: {goal.cost.name} {cfg.cost:.4g} of dense {cfg.dense_cost:.4g} ({cfg.reduction:.2f}x), "
              f"total score {cfg.score:.4g}; recipe written to {args.out}")
        print(f"{whole.summary()} ({rest.describe()})")
        if args.eval:
            m = entry.model
            db.apply(m, cfg.choice)
            as_recipe_runs(m, recipe, batches, args.correction, fix)  # as `compress` runs the recipe
            _print_metrics("dense", entry.evaluate(_resolve(args.model, args.calibration_samples, args).model))
            _print_metrics("selected", entry.evaluate(m))
        return 0
    from obcompress.search.sweep import run_sweep

    run_sweep(db, entry.model, entry.calibration, entry.evaluate, args.goals, args.out, methods=args.methods,
              activation_bits=act, buckets=args.buckets, spdy_restarts=args.spdy_restarts,
              spdy_steps=args.spdy_steps, spdy_samples=args.spdy_samples, correction=args.correction,
              num_calibration_samples=args.calibration_samples, progress=progress)
    print(f"sweep written to {args.out}; plot it with: obcompress report {args.out}")
    return 0


def _fisher_task(entry):
    """(model, labelled data or calibration data, evaluate, targets, prefix) for the Fisher: the
    entry's own, or its FisherTask's (a model without logits, minilm's)."""
    from obcompress.zoo.registry import FisherTask

    task = entry.fisher_task() if entry.fisher_task is not None else None
    if task is not None and not isinstance(task, FisherTask):
        raise ValueError(f"the model's fisher task must be a FisherTask, got {type(task).__name__}")
    if task is None:
        return entry.model, entry.calibration, entry.evaluate, None, ""
    return task.model, task.data, task.evaluate, task.targets, task.prefix


def _max_layer_error(text: str):
    from obcompress.search.nonuniform import check_max_layer_error

    t = text.strip().lower()
    try:
        return check_max_layer_error(None if t == "none" else t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fit_score(args, entry, db, progress) -> str:
    """The database score of `select --score fit`: FIT scores under the Fisher kept beside it."""
    from pathlib import Path

    from obcompress.search.fit_score import fit_scores
    from obcompress.search.fitcompress import FISHER_FILE, cached_fisher, labelled_batches

    model, data, _, targets, prefix = _fisher_task(entry)
    labelled = labelled_batches(model, data, args.calibration_samples)
    fisher, hit = cached_fisher(Path(args.db) / FISHER_FILE, model, labelled, targets=targets,
                                batches=args.fisher_batches)
    print(f"Fisher {'read from' if hit else 'estimated and kept in'} {Path(args.db) / FISHER_FILE} "
          f"({fisher.batches} batches)")
    return fit_scores(db, entry.model, fisher, prefix=prefix, progress=progress)


def _search_fit(args, entry, progress) -> int:
    from pathlib import Path

    import yaml

    from obcompress.search.fitcompress import FISHER_FILE, cached_fisher, labelled_batches, run_fitcompress
    from obcompress.search.fitcompress import write_path_report

    apply = {"none": (), "obc": ("obc",), "rtn": ("rtn",), "both": ("rtn", "obc")}[args.apply]
    act = args.activation_bits or None
    # A model without logits of its own (minilm's embeddings) brings its task: a head, labels, targets.
    model, data, evaluate, targets, prefix = _fisher_task(entry)
    dense = evaluate(model) if apply else None
    fisher = None
    if args.db:
        labelled = labelled_batches(model, data, args.calibration_samples)
        fisher, hit = cached_fisher(Path(args.db) / FISHER_FILE, model, labelled, targets=targets,
                                    batches=args.fisher_batches)
        print(f"Fisher {'read from' if hit else 'estimated and kept in'} {Path(args.db) / FISHER_FILE}")
    r = run_fitcompress(model, data, args.goal, evaluate=evaluate, apply=apply, targets=targets, fisher=fisher,
                        num_calibration_samples=args.calibration_samples, planner=args.planner, mode=args.search,
                        beam_width=args.beam_width, lam=args.lam, finetune_epochs=args.finetune_epochs,
                        finetune_lr=args.finetune_lr, progress=progress, activation_bits=act,
                        refresh_batches=args.refresh_batches, fisher_batches=args.fisher_batches)
    path = r["path"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = path.recipe(activation_bits=act if path.goal.cost.name == "bops" else None)
    if prefix:
        # Named as in the entry's own model, so that `obcompress compress --model M` applies it.
        cut = len(prefix)
        recipe["targets"] = [n[cut:] for n in recipe["targets"]]
        recipe["layers"] = {n[cut:]: v for n, v in recipe["layers"].items()}
    # The goal counts the searched layers only: the whole model's figure beside it, costed on the
    # user's own model (a FisherTask's head is not part of what `compress` writes).
    from obcompress.model.calibration import calibration_batches
    from obcompress.search.whole_model import WholeModel

    cut = len(prefix)
    rest = WholeModel(path.goal.cost, entry.model, [n[cut:] for n in path.choice],
                      lambda: calibration_batches(entry.calibration, args.calibration_samples))
    whole = rest.of(path.cost, path.dense_cost)
    write_text(out / "recipe.yaml", f"# FITCompress at {args.goal}: {whole.summary()}\n# {rest.describe()}\n"
               + yaml.safe_dump(recipe, sort_keys=False))
    write_path_report(path, out, {"fisher_seconds": r["fisher_seconds"], "search_seconds": r["search_seconds"],
                                  "fisher_batches": r["fisher_batches"], "dense": dense,
                                  "results": r["results"], "whole_model": {**whole.to_dict(), "counts": rest.describe()}})
    print(f"{'layer':<40} {'variant':>14}")
    for n, v in path.choice.items():
        print(f"{n:<40} {v.key:>14}")
    print(f"{path.planner}: FIT {path.fit:.4g} after {len(path.path) - 1} steps ({path.expansions} expansions, "
          f"path length g {path.g:.4g}); {path.goal.cost.name} {path.reduction:.2f}x; Fisher "
          f"{r['fisher_seconds']:.1f} s ({r['fisher_batches']} batches), search {r['search_seconds']:.2f} s")
    print(f"{whole.summary()} ({rest.describe()})")
    if dense is not None:
        _print_metrics("dense", dense)
    for how, res in r["results"].items():
        _print_metrics(f"{how} ({res['seconds']:.1f} s)", res["metrics"])
    print(f"recipe, fit_path.json and fit_path.png written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
