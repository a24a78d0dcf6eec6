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


def test_search_fit_writes_recipe_and_path(cache, capsys):
    out = cache / "fit"
    assert main(["search", "fit", "--model", "digits-cnn", "--goal", "size=1/10", "--out", str(out),
                 "--calibration-samples", "256", "--apply", "rtn", "--fisher-batches", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "rtn (" in text and "FIT" in text
    doc = json.loads((out / "fit_path.json").read_text())
    assert doc["reduction"] >= 10 * (1 - 1e-9) and doc["path"][0]["fit"] <= doc["path"][-1]["fit"]
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
