import sys

import pytest

pytest.importorskip("matplotlib")

from obcompress.search.plots import layer_chart, pareto_plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    data = path.read_bytes()
    return len(data) > 500 and data.startswith(PNG)


def test_pareto_plot_writes_a_png_atomically(tmp_path):
    series = {
        "uniform": [(4.0, 0.70), (2.0, 0.74), (8.0, 0.55)],
        "DP": [(2.0, 0.75), (4.0, 0.73), (8.0, 0.68)],
        "SPDY": [(4, 0.735), (8, 0.69)],
    }
    out = pareto_plot(series, tmp_path / "sub" / "pareto.png", xlabel="BOPs reduction (x)",
                      ylabel="top-1", title="efficientnet-lite0", dense=0.752, dpi=50)
    assert out == tmp_path / "sub" / "pareto.png"
    assert is_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["pareto.png"]  # no temp file left behind


def test_layer_chart_for_fifty_layers(tmp_path):
    n = 50
    names = [f"blocks.{i}.conv_pw" for i in range(n)]
    sparsity = [(i % 10) / 10 for i in range(n)]
    bits = [None if i % 7 == 0 else [8, 6, 4, 3, 2][i % 5] for i in range(n)]
    out = layer_chart(names, sparsity, bits, tmp_path / "layers.png", title="DP at 8x", dpi=50)
    assert is_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]


def test_plots_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one entry per layer"):
        layer_chart(["a", "b"], [0.5], [4, 4], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one entry per layer"):
        layer_chart(["a", "b"], [0.5, 0.1], [4], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"sparsity of layer 1 \(b\) must be in \[0, 1\]"):
        layer_chart(["a", "b"], [0.5, 1.5], [4, 4], tmp_path / "x.png")
    with pytest.raises(ValueError, match="bits of layer 0"):
        layer_chart(["a"], [0.5], [4.5], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"'DP' point 1 must be an \(x, y\) pair"):
        pareto_plot({"DP": [(1, 2), (3,)]}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="non-empty mapping"):
        pareto_plot({}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match=r"\.png"):
        pareto_plot({"DP": [(1, 2)]}, tmp_path / "x.jpg", xlabel="x", ylabel="y")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        pareto_plot({"DP": [(1, 2)]}, tmp_path / "x.png", xlabel="x", ylabel="y")
