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


# --------------------------------------------------------------------------------------------
# what the sweep's figures draw (issue 14, item 13): asserted on the artists, not on pixels

import json  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from obcompress.search import plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plots module saves, by file name."""
    drawn = {}
    save = plots._save

    def recording(fig, canvas_cls, path, dpi):
        out = save(fig, canvas_cls, path, dpi)
        drawn[out.name] = fig
        return out

    monkeypatch.setattr(plots, "_save", recording)
    return drawn


def _run(method, cost, goal, reached, acc, reductions=None, whole=None):
    r = {"goal": {"cost": {"name": cost}, "fraction": 1 / goal, "reduction": goal}, "method": method,
         "metrics": {"accuracy": acc}, "reduction": reached, "choice": {"b": "w4", "a": "s0.5000"}}
    if reductions is not None:
        r["reductions"] = reductions
    if whole is not None:
        r["whole_model"] = {"whole_reduction": whole}
    return r


def _lines(ax):
    """(label, x, y, hollow) of every line with data."""
    out = []
    for line in ax.get_lines():
        x = list(line.get_xdata())
        if x and line.get_linestyle() != "--":
            out.append((line.get_label(), x, list(line.get_ydata()), line.get_markerfacecolor() == "none"))
    return out


def test_pareto_draws_every_run_where_it_landed(tmp_path, figures):
    from obcompress.search.sweep import write_sweep_plots

    runs = [
        # goal 16x, landed at 17.34x: drawn at 17.34
        _run("uniform", "size", 16, 17.34, 0.90, {"size": {"searched": 17.34, "whole": 9.0},
                                                  "bops": {"searched": 20.0, "whole": 15.0}}),
        _run("uniform", "size", 8, 8.5, 0.95, {"size": {"searched": 8.5, "whole": 6.0},
                                               "bops": {"searched": 9.0, "whole": 8.0}}),
        _run("dp", "size", 16, 16.01, 0.93, {"size": {"searched": 16.01, "whole": 8.8},
                                             "bops": {"searched": 12.0, "whole": 10.0}}),
        _run("dp", "bops", 8, 8.2, 0.96, {"size": {"searched": 6.5, "whole": 5.0},
                                          "bops": {"searched": 8.2, "whole": 7.5}}),
    ]
    doc = {"format": "obcompress-sweep", "metric": "accuracy", "dense": {"accuracy": 0.97}, "layers": ["b", "a"],
           "whole_model": {"size": {"rest": 100.0, "searched_dense_cost": 300.0, "outside": ["c"], "layers": 3,
                                    "counts": "..."},
                           "bops": {"rest": 0.0, "searched_dense_cost": 50.0, "outside": [], "layers": 2,
                                    "counts": "..."}},
           "runs": runs}
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    write_sweep_plots(tmp_path)
    ax = figures["pareto_size.png"].axes[0]
    lines = _lines(ax)
    curves = {label: (x, y) for label, x, y, hollow in lines if not hollow}
    assert curves["uniform"] == ([8.5, 17.34], [95.0, 90.0])       # a curve through both size goals, as reached
    assert curves["dp"] == ([16.01], [93.0])
    hollow = [(x, y) for label, x, y, h in lines if h]
    assert ([6.5], [96.0]) in hollow                               # the bops run, at the size it reached
    # the top axis reads the whole model's reduction: (rest + dense) / (rest + dense / x)
    top = [a for a in ax.child_axes if a is not ax]
    assert len(top) == 1 and top[0].get_xlabel() == "whole model (x)"
    fmt = top[0].xaxis.get_major_formatter()
    assert fmt(3.0, 0) == f"{400 / (100 + 300 / 3):.3g}" and "searched layers" in ax.get_xlabel()
    # bops: every layer searched (nothing outside), so no second axis
    assert not figures["pareto_bops.png"].axes[0].child_axes
    assert {label: x for label, x, y, h in _lines(figures["pareto_bops.png"].axes[0]) if not h}["dp"] == [8.2]
    # per-layer charts list the layers in the model's order, and say what was reached
    chart = figures["layers_uniform_size_16x.png"]
    assert [t.get_text() for t in chart.axes[1].get_xticklabels()] == ["b", "a"]
    assert "17.34x" in chart.axes[0].get_title() and "9.00x" in chart.axes[0].get_title()


def test_a_sweep_without_whole_model_figures_is_drawn_at_its_reached_reductions(tmp_path, figures):
    from obcompress.search.sweep import write_sweep_plots

    doc = {"format": "obcompress-sweep", "metric": "accuracy", "dense": {"accuracy": 0.97}, "layers": ["b", "a"],
           "runs": [_run("uniform", "size", 16, 17.34, 0.9), _run("dp", "size", 16, 16.2, 0.93)]}
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    write_sweep_plots(tmp_path)
    ax = figures["pareto_size.png"].axes[0]
    assert {label: x for label, x, y, h in _lines(ax)} == {"uniform": [17.34], "dp": [16.2]}
    assert not ax.child_axes


class Ordered(nn.Module):
    """Layers declared (and called) in an order that is not alphabetical."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.body = nn.Linear(16, 16)
        self.alpha = nn.Linear(16, 4)

    def forward(self, x):
        return self.alpha(torch.relu(self.body(torch.relu(self.stem(x)))))


def test_layer_charts_follow_the_model_order(tmp_path, figures, one_thread):
    from obcompress.search import SearchSpace, Variant
    from obcompress.search.database import build_database, load_database
    from obcompress.search.sweep import run_sweep, write_sweep_plots

    torch.manual_seed(0)
    model = Ordered().eval()
    data = [torch.randn(64, 8)]
    space = SearchSpace((Variant(bits=8), Variant(bits=4)))
    build_database(model, data, tmp_path / "db", space, num_calibration_samples=64, progress=False)
    db = load_database(tmp_path / "db", model)
    assert db.names == ["stem", "body", "alpha"]
    run_sweep(db, model, data, lambda m: {"accuracy": 0.5}, ["size=1/4"], tmp_path / "sweep", methods=("dp",),
              num_calibration_samples=64, progress=False, log=lambda s: None)
    write_sweep_plots(tmp_path / "sweep")
    chart = figures["layers_dp_size_4x.png"]
    assert [t.get_text() for t in chart.axes[1].get_xticklabels()] == ["stem", "body", "alpha"]


def _inside(fig, artist):
    fig.canvas.draw()
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= fig.bbox.x1 + 0.5 and box.y1 <= fig.bbox.y1 + 0.5


def test_saved_figures_keep_their_labels_and_titles_inside(tmp_path):
    # As fit_path.png is drawn: no layout asked for, and a linear axis of small numbers whose wide
    # tick labels pushed the y label off the left edge.
    Figure, Canvas = plots._matplotlib()
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([4, 5, 6], [0.0123456, 0.0123457, 0.0123458])
    ax.set_ylabel("FIT")
    ax.set_xlabel("size reduction (x)")
    plots._save(fig, Canvas, tmp_path / "fit.png", 50)
    assert _inside(fig, ax.yaxis.label) and _inside(fig, ax.xaxis.label)
    drawn = {}
    save = plots._save
    try:
        plots._save = lambda f, c, p, d: drawn.setdefault("fig", f) and save(f, c, p, d)
        layer_chart(["conv1", "conv2", "fc1"], [0, 0.75, 0.75], [2, 2, 2], tmp_path / "l.png",
                    title="uniform at 16x size (reached 20.15x on the searched layers, 15.40x on the whole model): "
                          "accuracy 98.0 %")
    finally:
        plots._save = save
    assert _inside(drawn["fig"], drawn["fig"].axes[0].title)
