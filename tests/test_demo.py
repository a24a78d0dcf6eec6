import io
import math

import pytest

from obcompress import __version__
from obcompress.cli import main
from obcompress.demo import METHOD_KEYS, METHODS, run_demo

LAYERS = ["conv1", "conv2", "fc2"]  # fc1 (128 x 576) is the slow one; `make demo` covers it
NM_KEYS = {m.key for m in METHODS if m.nm}
# Each error-compensating method against the baseline at the same target.
BEATS = {
    "gptq4": "rtn4", "obq4": "rtn4",
    "sgpt50": "mag50", "obs50": "mag50",
    "sgpt24": "mag24", "obs24": "mag24",
    "sgpt24_4": "mag24_rtn4", "obc24_4": "mag24_rtn4",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "obcompress-cache"  # shared with tests/zoo/test_digits.py
    path.mkdir(exist_ok=True)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OBCOMPRESS_CACHE", str(path))
        rep = run_demo(calibration_samples=256, layers=LAYERS, out=out, progress=False)
    return rep, out.getvalue()


def test_every_layer_has_every_applicable_method(report):
    rep, _ = report
    assert rep.layers == {"conv1": (32, 9), "conv2": (64, 288), "fc2": (10, 128)}
    for layer, (_, cols) in rep.layers.items():
        got = [r.method for r in rep.rows if r.layer == layer]
        want = [k for k in METHOD_KEYS if cols % 4 == 0 or k not in NM_KEYS]
        assert got == want, layer
    assert set(rep.skipped) == NM_KEYS and all(v == ["conv1"] for v in rep.skipped.values())


def test_losses_are_finite_and_exact_solvers_beat_the_baselines(report):
    rep, _ = report
    for r in rep.rows:
        assert math.isfinite(r.loss) and r.loss >= 0 and r.seconds >= 0, (r.layer, r.method)
        if r.method in BEATS:
            base = rep.row(r.layer, BEATS[r.method]).loss
            assert r.baseline_loss == base
            assert r.loss <= base * (1 + 1e-6), (r.layer, r.method, r.loss, base)
    # Joint = pruning then quantization on the pruned support: never below the pruning alone.
    for layer in ("conv2", "fc2"):
        assert rep.row(layer, "obc24_4").loss >= rep.row(layer, "obs24").loss * (1 - 1e-6)
        assert rep.row(layer, "mag24").loss > 0


def test_accuracy_table(report):
    rep, text = report
    assert rep.dense_accuracy >= 0.95
    assert set(rep.accuracy) == set(METHOD_KEYS)
    assert all(0.0 <= a <= 1.0 for a in rep.accuracy.values())
    # 4-bit and exact 50% sparsity keep a tiny CNN close to dense; a wrong weight layout would not.
    for key in ("obq4", "gptq4", "obs50", "obs24", "obc24_4"):
        assert rep.accuracy[key] >= rep.dense_accuracy - 0.05, key
    for layer in LAYERS:
        assert f"layer {layer}" in text
    assert "test accuracy" in text and "ExactOBS 2:4 + OBQ 4-bit" in text


def test_method_subset_adds_baselines(tmp_path, monkeypatch):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path.parent / "obcompress-cache"))
    rep = run_demo(calibration_samples=64, methods=["obs50"], layers=["conv1"], out=io.StringIO(), progress=False)
    assert [r.method for r in rep.rows] == ["mag50", "obs50"]
    with pytest.raises(ValueError, match="unknown demo method"):
        run_demo(methods=["nope"], out=io.StringIO(), progress=False)


def test_cli_version_and_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--layers", "fc9", "--no-progress"])
    assert e.value.code == 2 and "fc9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["demo", "--calibration-samples", "0", "--no-progress"])
    assert e.value.code == 2 and "calibration_inputs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # both failed before training
    assert main([]) == 2


def test_model_demo_writes_an_artifact_and_a_table(tmp_path, monkeypatch):
    from obcompress.demo import run_model_demo

    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path / "cache"))
    out = io.StringIO()
    rep = run_model_demo(out_dir=tmp_path / "art", recipes=["RTN 4-bit", "2:4 + OBQ 4-bit"],
                         calibration_samples=128, out=out, progress=False)
    text = out.getvalue()
    assert "2:4 + OBQ 4-bit" in text and "x smaller" in text
    assert [r.name for r in rep.rows] == ["RTN 4-bit", "2:4 + OBQ 4-bit"]
    joint = rep.rows[1]
    assert joint.accuracy >= rep.dense_accuracy - 0.02
    assert joint.bytes_on_disk < rep.fp32_bytes / 6  # 2:4 + 4-bit really is small on disk
    assert (tmp_path / "art" / "model.safetensors").exists() and (tmp_path / "art" / "report.json").exists()


def test_demo_reports_its_total_time_after_both_parts(capsys, monkeypatch):
    import obcompress.demo

    monkeypatch.setattr(obcompress.demo, "run_demo", lambda **kw: print("per-layer part"))
    monkeypatch.setattr(obcompress.demo, "run_model_demo", lambda **kw: print("whole-model part"))
    assert main(["demo", "--no-progress"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert lines[:2] == ["per-layer part", "whole-model part"] and lines[-1].startswith("demo finished in")


def test_make_test_shows_skip_reasons():
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    test_rule = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "pytest" in test_rule and "-rs" in test_rule
