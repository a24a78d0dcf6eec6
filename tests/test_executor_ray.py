"""The Ray executor against the local one: the same bits, retries, errors, a resumable database.

One local Ray on 2 CPUs for the whole module (starting Ray takes seconds); skipped without Ray.
"""

import copy
import os

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'obcompress[ray]')")

import obcompress.search.database as dbmod  # noqa: E402
from obcompress.api import compress  # noqa: E402
from obcompress.executor import LayerJob, RayExecutor  # noqa: E402
from obcompress.search import SearchSpace, Variant  # noqa: E402
from obcompress.search.database import build_database, load_database  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The job functions of this test module travel by value (workers cannot import tests/).
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    yield
    if started:
        ray.shutdown()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _setup():
    torch.manual_seed(0)
    return Net(), [torch.randn(32, 3, 4, 4) for _ in range(2)]


@pytest.mark.parametrize("recipe", [
    {"solver": "exact", "sparsity": {"mask_structure": "2:4", "unfit_layers": "dense"},
     "quantization": {"num_bits": 4}},
    {"solver": "sparsegpt", "sparsity": {"sparsity": 0.5}, "calibration": "sequential"},
])
def test_compress_on_ray_gives_the_local_bits(recipe):
    model, data = _setup()
    local, remote = copy.deepcopy(model), copy.deepcopy(model)
    a = compress(local, recipe, data, num_calibration_samples=64, progress=False)
    b = compress(remote, dict(recipe, executor="ray"), data, num_calibration_samples=64, progress=False)
    assert b.executor == "ray"
    for (n, p), q in zip(local.state_dict().items(), remote.state_dict().values()):
        assert torch.equal(p, q), n
    assert [r.loss for r in a.layers] == [r.loss for r in b.layers]
    for n in a.states:
        sa, sb = a.states[n], b.states[n]
        assert (sa.mask is None) == (sb.mask is None) and (sa.mask is None or torch.equal(sa.mask, sb.mask))
        for ga, gb in zip(sa.grids, sb.grids):
            assert (ga is None) == (gb is None) and (ga is None or torch.equal(ga.scale, gb.scale))


SPACE = SearchSpace((Variant("unstructured", 0.5), Variant("2:4"), Variant(bits=4), Variant("2:4", bits=4)),
                    joint_min_cols=8)


def _tensors(d):
    from safetensors import safe_open

    out = {}
    for p in sorted((d / "layers").glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out.update({(p.name, k): f.get_tensor(k) for k in f.keys()})
    return out


def test_database_on_ray_has_the_local_tensors_and_resumes_after_a_killed_driver(tmp_path, monkeypatch):
    model, data = _setup()
    build_database(model, data, tmp_path / "local", SPACE, num_calibration_samples=64, progress=False)
    writes = []
    real = dbmod._write_layer

    def dying_writer(path, tensors, meta):
        if len(writes) == 2:
            raise KeyboardInterrupt  # the driver killed after two layer files
        writes.append(path)
        real(path, tensors, meta)

    monkeypatch.setattr(dbmod, "_write_layer", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        build_database(model, data, tmp_path / "ray", SPACE, num_calibration_samples=64, progress=False,
                       executor="ray")
    monkeypatch.setattr(dbmod, "_write_layer", real)
    assert len(list((tmp_path / "ray" / "layers").glob("*.safetensors"))) == 2
    db = build_database(model, data, tmp_path / "ray", SPACE, num_calibration_samples=64, progress=False,
                        executor="ray")
    local, remote = _tensors(tmp_path / "local"), _tensors(tmp_path / "ray")
    assert local.keys() == remote.keys()
    for k in local:
        assert torch.equal(local[k], remote[k]), k
    # Stitching through Ray rebuilds the same weights.
    choice = {"conv": "s0.5000", "dw": "w4", "fc1": "2:4", "fc2": "2:4+w4"}
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    load_database(tmp_path / "local", m1).apply(m1, choice)
    remote_db = load_database(tmp_path / "ray", m2, executor="ray")
    assert remote_db.executor.kind == "ray" and db.names == remote_db.names
    remote_db.apply(m2, choice)
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), n


def _die_once(marker, x):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies mid-task
    return x + 1


def _refuse(x):
    raise ValueError("layer fc9: H is not positive definite")


def test_a_task_whose_worker_dies_is_retried_and_errors_come_back_as_they_were(tmp_path):
    ex = RayExecutor()
    assert ex.map([LayerJob("fc1", _die_once, (str(tmp_path / "died"), torch.ones(3)))])[0].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="^layer fc9: H is not positive definite$"):
        ex.map([LayerJob("fc9", _refuse, (1,))])


def _threads(_):
    return torch.get_num_threads()


def test_a_job_larger_than_its_share_asks_for_more_cpus():
    ex = RayExecutor()
    jobs = [LayerJob("big", _threads, (0,), estimate=10.0)] + [LayerJob(f"s{i}", _threads, (0,), estimate=1.0)
                                                               for i in range(3)]
    assert ex._cpus(jobs) == [2.0, 1.0, 1.0, 1.0]  # 2 CPUs here: the big job gets the node
    assert ex.map(jobs) == [2, 1, 1, 1]  # and runs with as many threads
