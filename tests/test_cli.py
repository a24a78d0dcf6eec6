import json

import pytest

from obcompress.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_compress_report_eval_round_trip(cache, capsys):
    recipe = cache / "r.yaml"
    recipe.write_text("solver: exact\nquantization:\n  num_bits: 4\n")
    out = cache / "art"
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--set", "quantization.num_bits=3",
                 "--out", str(out), "--calibration-samples", "128", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "compressed: accuracy" in text and "x smaller" in text
    report = json.loads((out / "report.json").read_text())
    assert all(r["bits"] == 3 for r in report["layers"]) and report["metrics"]["accuracy"] > 0.9
    assert main(["report", str(out)]) == 0
    assert "format version" in capsys.readouterr().out
    assert main(["eval", "--model", "digits-cnn", "--artifact", str(out)]) == 0
    acc = float(capsys.readouterr().out.split("accuracy")[1])
    assert acc == pytest.approx(report["metrics"]["accuracy"])  # the artifact is the compressed model


def test_errors_are_one_line_and_exit_2(cache, capsys):
    recipe = cache / "r.yaml"
    recipe.write_text("quantisation:\n  num_bits: 4\n")
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--out", str(cache / "a")])
    assert e.value.code == 2 and "did you mean 'quantization'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(cache / "missing")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "no-such-model"])
    assert e.value.code == 2 and "unknown model" in capsys.readouterr().err


def test_search_build_resume_select_sweep_report(cache, capsys):
    space = cache / "space.yaml"
    space.write_text("variants: [s0.5000, 2:4, w8, w4, w2, 2:4+w4]\n")
    db = cache / "db"
    args = ["--model", "digits-cnn", "--db", str(db), "--calibration-samples", "128", "--no-progress"]
    assert main(["search", "build", *args, "--space", str(space), "--stop-after", "1"]) == 0
    assert "1 of 4 layers" in capsys.readouterr().out
    assert main(["search", "build", *args, "--space", str(space)]) == 0
    assert "4 of 4 layers" in capsys.readouterr().out
    recipe = cache / "r.yaml"
    assert main(["search", "select", *args, "--goal", "bops=1/10", "--out", str(recipe), "--eval"]) == 0
    text = capsys.readouterr().out
    assert "selected: accuracy" in text and recipe.exists()
    assert main(["search", "scores", *args, "--variants", "w2,w8", "--samples", "64"]) == 0
    assert main(["search", "select", *args, "--goal", "bops=1/5", "--score", "calibration_loss",
                 "--out", str(cache / "r2.yaml")]) == 0
    assert "calibration-loss scores of 8 single-layer swaps" in capsys.readouterr().out
    # FIT as the DP's score: the Fisher `search fit --db` keeps beside the database.
    assert main(["search", "fit", "--model", "digits-cnn", "--goal", "size=1/8", "--out", str(cache / "fit"),
                 "--db", str(db), "--calibration-samples", "128", "--apply", "none", "--no-progress"]) == 0
    assert "estimated and kept in" in capsys.readouterr().out
    assert main(["search", "select", *args, "--goal", "bops=1/5", "--score", "fit", "--out", str(cache / "r3.yaml")]) == 0
    assert "Fisher read from" in capsys.readouterr().out and (db / "fisher.safetensors").exists()
    assert list(db.glob("scores_fit_*.json"))
    # No cap: the same DP over every variant; a cap that is not a positive number is a usage error.
    assert main(["search", "select", *args, "--goal", "bops=1/5", "--score", "fit", "--max-layer-error", "none",
                 "--out", str(cache / "r4.yaml")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["search", "select", *args, "--goal", "bops=1/5", "--max-layer-error", "0", "--out", str(recipe)])
    assert e.value.code == 2 and "positive number" in capsys.readouterr().err
    # the written recipe is one that compress takes as it is
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--out", str(cache / "art"),
                 "--calibration-samples", "128", "--no-progress"]) == 0
    capsys.readouterr()
    sweep = cache / "sweep"
    assert main(["search", "sweep", *args, "--goals", "size=1/8,bops=1/12", "--spdy-restarts", "1",
                 "--spdy-steps", "2", "--spdy-samples", "64", "--out", str(sweep)]) == 0
    doc = json.loads((sweep / "sweep.json").read_text())
    assert {(r["goal"]["cost"]["name"], r["method"]) for r in doc["runs"]} == {
        (c, m) for c in ("size", "bops") for m in ("uniform", "dp", "spdy")}
    assert all(r["reduction"] >= r["goal"]["reduction"] * (1 - 1e-9) for r in doc["runs"])
    capsys.readouterr()
    assert main(["report", str(sweep)]) == 0
    assert (sweep / "pareto_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another space into the same directory is refused; an impossible goal is one clear error
    space.write_text("variants: [w4]\n")
    with pytest.raises(SystemExit) as e:
        main(["search", "build", *args, "--space", str(space)])
    assert e.value.code == 2 and "another space" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["search", "select", *args, "--goal", "size=1/1000", "--out", str(recipe)])
    assert e.value.code == 2 and "cannot be reached" in capsys.readouterr().err


def test_search_budgets_say_what_they_are_for_the_whole_model(cache, capsys):
    import struct

    space = cache / "space.yaml"
    space.write_text("variants: [w8, w4, w2]\n")
    db = cache / "db"
    args = ["--model", "digits-cnn", "--db", str(db), "--calibration-samples", "128", "--no-progress"]
    # fc1 holds 74,000 of the 94,000 weights: left out, the rest of the model stays large
    assert main(["search", "build", *args, "--space", str(space), "--ignore", "fc1"]) == 0
    recipe = cache / "r.yaml"
    assert main(["search", "select", *args, "--goal", "size=1/8", "--out", str(recipe)]) == 0
    text = capsys.readouterr().out
    line = next(s for s in text.splitlines() if "on the whole model" in s)
    searched, whole = (float(part.split("x ")[0].split()[-1]) for part in line.split(", ")[:2])
    assert "on the 3 searched layers" in line and searched >= 8 and whole < 1.5
    assert recipe.read_text().startswith(f"# dp at size=1/8: {line.split(' (')[0]}")
    # what the artifact really weighs: fp32 size over its tensor bytes (JSON files and header aside)
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--out", str(cache / "art"),
                 "--calibration-samples", "128", "--no-progress"]) == 0
    fp32 = int(capsys.readouterr().out.split("fp32 ")[1].split(" bytes")[0].replace(",", ""))
    blob = (cache / "art" / "model.safetensors").read_bytes()
    tensor_bytes = len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]
    assert f"{fp32 / tensor_bytes:.2f}" == f"{whole:.2f}"
    sweep = cache / "sweep"
    assert main(["search", "sweep", *args, "--goals", "size=1/8", "--methods", "dp", "--out", str(sweep)]) == 0
    assert f"reached {searched:.2f}x on the searched layers, {whole:.2f}x on the whole model" in capsys.readouterr().out
    assert main(["report", str(sweep)]) == 0
    row = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("size 8x"))
    assert row.split()[-2:] == [f"{searched:.2f}x", f"{whole:.2f}x"]


def test_search_fit_writes_recipe_and_path(cache, capsys):
    out = cache / "fit"
    assert main(["search", "fit", "--model", "digits-cnn", "--goal", "size=1/10", "--out", str(out),
                 "--calibration-samples", "256", "--apply", "rtn", "--fisher-batches", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "rtn (" in text and "FIT" in text
    doc = json.loads((out / "fit_path.json").read_text())
    assert doc["reduction"] >= 10 * (1 - 1e-9) and doc["path"][0]["fit"] <= doc["path"][-1]["fit"]
    # the goal counts the searched layers' weights; the whole model adds its biases (234 floats)
    whole = doc["whole_model"]
    rest = 8 * 4 * (32 + 64 + 128 + 10)
    assert whole["whole_reduction"] == pytest.approx((rest + doc["dense_cost"]) / (rest + doc["cost"]))
    assert f"{doc['reduction']:.2f}x on the 4 searched layers, {whole['whole_reduction']:.2f}x on the whole model" in text
    assert (out / "fit_path.png").read_bytes()[:4] == b"\x89PNG" and (out / "recipe.yaml").exists()
    with pytest.raises(SystemExit) as e:
        main(["search", "fit", "--model", "digits-cnn", "--goal", "size=1/1000", "--out", str(out), "--apply", "none",
              "--fisher-batches", "2"])
    assert e.value.code == 2 and "cannot be reached" in capsys.readouterr().err


_EMBEDDER = '''
import torch
from torch import nn
from obcompress.zoo.registry import FisherTask


class Head(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.register_buffer("w", torch.randn(8, 3, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return self.body(x) @ self.w


def factory():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))  # embeddings, no logits
    X = torch.randn(256, 16)
    head = Head(body)
    y = head(X).argmax(1).detach()
    with torch.no_grad():
        ref = body(X)
    evaluate = lambda m: {"cosine": float(nn.functional.cosine_similarity(m(X).detach(), ref).mean())}
    task = FisherTask(head, [(X[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)],
                      lambda h: {"accuracy": float((h(X).detach().argmax(1) == y).float().mean())}, ["re:body\\\\..*"], "body.")
    return body, list(X.split(64)), evaluate, task
'''


def test_search_fit_on_a_model_without_logits_uses_its_fisher_task(cache, capsys):
    spec = cache / "embedder.py"
    spec.write_text(_EMBEDDER)
    out = cache / "fit"
    assert main(["search", "fit", "--model", f"{spec}:factory", "--goal", "size=1/6", "--out", str(out),
                 "--calibration-samples", "256", "--apply", "obc", "--fisher-batches", "4", "--no-progress"]) == 0
    assert "accuracy" in capsys.readouterr().out
    import yaml
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    # Named as in the factory's own model, so that `compress --model` applies it as it is.
    assert set(recipe["targets"]) <= {"0", "2"} and recipe["targets"]
    assert main(["compress", "--model", f"{spec}:factory", "--recipe", str(out / "recipe.yaml"), "--out",
                 str(cache / "art"), "--calibration-samples", "256", "--no-progress"]) == 0


def test_report_refuses_a_damaged_artifact(cache, capsys):
    recipe = cache / "r.yaml"
    recipe.write_text("solver: rtn\nquantization:\n  num_bits: 4\n")
    out = cache / "art"
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--out", str(out),
                 "--calibration-samples", "64", "--no-progress"]) == 0
    capsys.readouterr()
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-64])
    with pytest.raises(SystemExit) as e:
        main(["report", str(out)])
    assert e.value.code == 2 and "truncated" in capsys.readouterr().err


def test_help_imports_no_torch_and_documents_every_option():
    import subprocess
    import sys

    code = ("import sys; from obcompress.cli import build_parser; p = build_parser(); p.format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # --help must not wait seconds for torch to import

    from obcompress.cli import SWEEP_METHODS, build_parser
    from obcompress.search.sweep import METHODS

    assert tuple(SWEEP_METHODS) == tuple(METHODS)
    parser = build_parser()
    subs = {a.dest: a for a in parser._actions if a.dest == "command"}["command"].choices
    search = {a.dest: a for a in subs["search"]._actions if a.dest == "search_command"}["search_command"].choices
    commands = dict(subs, **{f"search {k}": v for k, v in search.items()})
    for name, p in commands.items():
        if name == "search":
            continue
        assert p.description or name.startswith("search "), f"{name}: no description"
        for a in p._actions:
            if a.option_strings and a.dest != "help":
                assert a.help, f"{name} {a.option_strings[0]}: no help"
    assert "default 256" in subs["compress"].format_help()
    assert "uniform, dp, spdy" in search["sweep"].format_help()


def test_compress_help_lists_the_solver_registry(capsys):
    from obcompress.solvers.registry import SOLVERS

    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    listed = text.split("obcompress.solvers.registry):", 1)[1].split()
    for name, spec in SOLVERS.items():
        assert name in listed and spec.summary in " ".join(text.split()), name


def test_executor_ray_without_ray_says_what_to_install(cache, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    recipe = cache / "r.yaml"
    recipe.write_text("solver: rtn\nquantization:\n  num_bits: 4\n")
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--out", str(cache / "a"),
              "--executor", "ray", "--no-progress"])
    assert e.value.code == 2 and "pip install 'obcompress[ray]'" in capsys.readouterr().err
