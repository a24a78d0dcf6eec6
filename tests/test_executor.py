import sys

import pytest
import torch

from obcompress.executor import EtaLine, LayerJob, LocalExecutor, format_seconds, make_executor
from obcompress.solvers import exact_obs_prune
from obcompress.solvers.progress import listen


def _square(x):
    return x * x


def test_local_runs_jobs_in_order_and_lets_their_arguments_go():
    jobs = [LayerJob(f"l{i}", _square, (torch.tensor(float(i)),)) for i in range(4)]
    assert [float(r) for r in LocalExecutor().map(jobs)] == [0, 1, 4, 9]
    assert all(j.args == () for j in jobs)  # the Hessians of done jobs are freed as the work goes


def test_make_executor_choices_and_what_to_install_without_ray(monkeypatch):
    assert make_executor().kind == "local" and make_executor("local").kind == "local"
    ex = LocalExecutor()
    assert make_executor(ex) is ex
    with pytest.raises(ValueError, match="executor must be one of local, ray"):
        make_executor("dask")
    with pytest.raises(ValueError, match="--executor ray"):
        make_executor("local", "10.0.0.1:6379")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(ValueError, match=r"pip install 'obcompress\[ray\]'"):
        make_executor("ray")


def test_an_exact_solve_reports_rows_done_to_its_listener():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 64, generator=g, dtype=torch.float64)
    W = torch.randn(40, 64, generator=g)
    seen = []
    with listen(lambda done, total: seen.append((done, total))):
        exact_obs_prune(W, 2 * X.t() @ X / 600, 0.5)
    assert seen[0] == (0, 40) and seen[-1] == (40, 40)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    seen.clear()
    exact_obs_prune(W, 2 * X.t() @ X / 600, 0.5)  # nobody listening: nothing reported
    assert seen == []


def test_eta_line_and_seconds():
    shown = []
    eta = EtaLine(shown.append, every=0.0)
    eta(0, 10)
    eta(5, 10)
    assert shown and shown[-1].startswith("rows 5/10, ETA ")
    assert format_seconds(42) == "42 s" and format_seconds(125) == "2 min 05 s" and format_seconds(7500) == "2 h 05 min"
