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
