"""examples/: the recipes run as shipped on digits-cnn, and a user's factory works through the CLI."""

import json
from pathlib import Path

import pytest

from obcompress.cli import main
from obcompress.recipe import Recipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted((EXAMPLES / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One cache for the module: digits-cnn and the example CNN are trained once, not per test.
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("examples")
    mp.setenv("OBCOMPRESS_CACHE", str(root / "cache"))
    yield root
    mp.undo()


def test_the_common_recipes_are_there():
    assert {p.name for p in RECIPES} >= {"gptq-4bit.yaml", "obq-4bit-asym.yaml", "exactobs-50.yaml",
                                         "sparsegpt-50.yaml", "2of4-obq-4bit.yaml", "w4a8.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_runs_on_digits_cnn(path, cache, capsys, one_thread):
    recipe = Recipe.from_yaml(str(path))  # parses and validates
    out = cache / path.stem
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(path), "--out", str(out),
                 "--calibration-samples", "128", "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["accuracy"] > 0.9
    for layer in report["layers"]:
        scheme = recipe.for_layer(layer["name"], None)
        want_bits = None if scheme.quantization is None else scheme.quantization.num_bits
        assert layer["bits"] == want_bits, layer
        if scheme.sparsity is None or layer["name"] in report["unfit"]:
            assert layer["sparsity"] == 0, layer
        else:
            assert layer["sparsity"] == pytest.approx(0.5, abs=0.01), layer
    config = json.loads((out / "compression_config.json").read_text())
    for name, layer in config["layers"].items():
        q = recipe.for_layer(name, None).quantization
        if q is not None:
            assert layer["quantization"]["symmetric"] == q.symmetric, name
    has_activations = recipe.quantization is not None and recipe.quantization.activations is not None
    assert bool(config["activation_quantizers"]) == has_activations


_SPEC = str(EXAMPLES / "my_cnn.py") + ":factory"


def test_the_example_factory_through_the_cli(cache, capsys, one_thread):
    assert main(["eval", "--model", _SPEC]) == 0
    assert "dense: accuracy" in capsys.readouterr().out
    art = cache / "my_cnn_art"
    assert main(["compress", "--model", _SPEC, "--recipe", str(EXAMPLES / "recipes" / "w4a8.yaml"),
                 "--out", str(art), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "features.0" in text and "classifier.3" in text  # the user's own layer names
    report = json.loads((art / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["accuracy"] > 0.9 and 0.9 < metrics["agreement"] < 1.0  # agreement with the dense model
    # a fresh factory() call gives the model the artifact was made from: eval reproduces the metrics
    assert main(["eval", "--model", _SPEC, "--artifact", str(art)]) == 0
    line = capsys.readouterr().out
    assert line.strip() == "compressed: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
