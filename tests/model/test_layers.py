import pytest
import torch
import torch.nn as nn

from obcompress.model import LayerInfo, find_layers, is_compressible, set_weight_groups, weight_groups
from obcompress.solvers.hessian import unfold_conv_input


class Conv1D(nn.Module):
    """Stand-in for transformers.pytorch_utils.Conv1D: a linear layer with weight stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(size_out)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Conv1D(5, 16))

    def forward(self, x):  # x: (B, 3, 16)
        y = self.conv1(x).reshape(x.shape[0], 4, 4, 4)
        y = self.bn(self.depthwise(self.grouped(self.conv2(y))))
        return self.head(y.flatten(2).transpose(1, 2))  # tokens: (B, 4, 8)


ALL = ["conv1", "conv2", "grouped", "depthwise", "head.0", "head.2"]


def _toy():
    torch.manual_seed(0)
    return Toy()


# ---------------------------------------------------------------- selection


def test_find_layers_default_takes_every_compressible_layer_in_order_with_shapes():
    layers = find_layers(_toy())
    assert list(layers) == ALL
    got = {n: (i.kind, i.groups, i.taps, i.rows, i.cols) for n, i in layers.items()}
    assert got == {
        "conv1": ("conv1d", 1, 3, 4, 9),
        "conv2": ("conv2d", 1, 9, 8, 36),
        "grouped": ("conv2d", 2, 9, 4, 36),
        "depthwise": ("conv2d", 8, 9, 1, 9),
        "head.0": ("linear", 1, 1, 16, 8),
        "head.2": ("conv1d_hf", 1, 1, 5, 16),
    }
    assert layers["depthwise"].depthwise and not layers["grouped"].depthwise and not layers["head.0"].depthwise
    assert all(isinstance(i, LayerInfo) and i.name == n for n, i in layers.items())


@pytest.mark.parametrize(
    "targets, ignore, expected",
    [
        (["Conv2d"], (), ["conv2", "grouped", "depthwise"]),
        ("Linear", (), ["head.0"]),
        (["Conv1D"], (), ["head.2"]),  # class names are exact: nn.Conv1d is "Conv1d"
        (["Conv1d"], (), ["conv1"]),
        (["head.0", "conv1"], (), ["conv1", "head.0"]),  # model order, not target order
        (["re:head\\..*"], (), ["head.0", "head.2"]),  # the ReLU also matches and is skipped
        (["re:.*conv.*"], (), ["conv1", "conv2"]),
        (None, ["Conv2d"], ["conv1", "head.0", "head.2"]),
        (None, ["re:head\\..*", "conv1"], ["conv2", "grouped", "depthwise"]),
        (["Conv2d", "Linear"], ["grouped"], ["conv2", "depthwise", "head.0"]),
        (None, ["head"], ALL),  # ignoring a container matches its name only, not its children
    ],
)
def test_find_layers_selection(targets, ignore, expected):
    assert list(find_layers(_toy(), targets=targets, ignore=ignore)) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": ["nope"]}, "'nope' matches no module"),
        ({"targets": ["bn"]}, "'bn' matches no compressible layer"),
        ({"targets": ["BatchNorm2d"]}, "'BatchNorm2d' matches no compressible layer"),
        ({"targets": ["re:head\\.1"]}, "matches no compressible layer"),
        ({"targets": ["re:conv["]}, r"targets\[0\]: bad regular expression"),
        ({"targets": []}, "targets is empty"),
        ({"targets": [3]}, r"targets\[0\] must be a non-empty string"),
        ({"ignore": ["convv1"]}, "ignore entry 'convv1' matches no module"),
        ({"ignore": ["Conv1d", "Conv2d", "Linear", "Conv1D"]}, "no layer left"),
        ({"targets": ["conv1"], "ignore": ["re:conv.*"]}, "no layer left"),
    ],
)
def test_find_layers_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_layers(_toy(), **kwargs)


def test_find_layers_model_without_compressible_layer():
    with pytest.raises(ValueError, match="no compressible layer"):
        find_layers(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        find_layers(lambda x: x)


def test_hf_conv1d_detected_by_duck_type_only():
    class Conv1DLike(nn.Module):  # right attributes, wrong name
        def __init__(self):
            super().__init__()
            self.nf = 2
            self.weight = nn.Parameter(torch.zeros(3, 2))

    class NoNf(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 2))

    NoNf.__name__ = "Conv1D"
    assert is_compressible(Conv1D(2, 3))
    assert not is_compressible(Conv1DLike()) and not is_compressible(NoNf())


def test_multihead_attention_out_proj_is_skipped():
    # MultiheadAttention never calls out_proj (it uses the weight directly), so no hook would see inputs.
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    assert list(find_layers(model)) == ["fc"]
    with pytest.raises(ValueError, match="never calls"):
        find_layers(model, targets=["attn.out_proj"])


# ---------------------------------------------------------------- weight mapping


def test_weight_groups_round_trip_is_exact_and_a_copy():
    model = _toy()
    for info in find_layers(model).values():
        before = info.module.weight.detach().clone()
        W = weight_groups(info)
        assert W.shape == (info.groups, info.rows, info.cols) and W.dtype == torch.float32
        W.zero_()  # a copy: the module is untouched
        assert torch.equal(info.module.weight, before)
        set_weight_groups(info, weight_groups(info))
        assert torch.equal(info.module.weight, before)
        new = torch.randn(info.groups, info.rows, info.cols)
        set_weight_groups(info, new)
        assert info.module.weight.shape == before.shape
        assert torch.equal(weight_groups(info), new)


def test_weight_groups_layout_per_kind():
    layers = find_layers(_toy())
    g = layers["grouped"]
    w = g.module.weight  # (8, 4, 3, 3): group 1 = output channels 4..7
    assert torch.equal(weight_groups(g)[1, 2], w[6].flatten())
    hf = layers["head.2"]
    assert torch.equal(weight_groups(hf)[0], hf.module.weight.t())  # stored (in, out)


def test_set_weight_groups_keeps_dtype_and_checks_input():
    layer = nn.Linear(4, 3).to(torch.bfloat16)
    info = find_layers(nn.Sequential(layer))["0"]
    W = torch.randn(3, 4)
    set_weight_groups(info, W)  # 2-D is accepted for a single group
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.requires_grad
    assert torch.equal(layer.weight, W.to(torch.bfloat16))
    with pytest.raises(ValueError, match="layer '0'.*shape"):
        set_weight_groups(info, torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="layer '0'.*non-finite"):
        set_weight_groups(info, torch.full((1, 3, 4), float("nan")))
    grouped = find_layers(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)))["0"]
    with pytest.raises(ValueError, match="shape"):
        set_weight_groups(grouped, torch.randn(4, 2))  # 2-D only for one group


CASES = [
    ("linear", lambda: nn.Linear(6, 5), (2, 7, 6)),
    ("conv1d_hf", lambda: Conv1D(5, 6), (3, 4, 6)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, groups=2, padding="same", padding_mode="circular"), (2, 4, 9)),
    ("conv2d", lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=1), (2, 3, 7, 6)),
    ("conv2d", lambda: nn.Conv2d(6, 4, 3, groups=2, padding=1, padding_mode="reflect"), (2, 6, 5, 5)),
    ("conv2d", lambda: nn.Conv2d(5, 5, 3, groups=5, padding="same", dilation=2, bias=False), (2, 5, 6, 6)),
]


@pytest.mark.parametrize("kind, make, shape", CASES)
def test_output_from_weight_groups_and_unfolded_inputs_equals_module(kind, make, shape):
    torch.manual_seed(1)
    layer = make().double()
    info = find_layers(nn.Sequential(layer))["0"]
    assert info.kind == kind
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    W = weight_groups(info).double()
    bias = layer.bias if layer.bias is not None else torch.zeros(info.groups * info.rows, dtype=torch.float64)
    bias = bias.detach().reshape(info.groups, 1, info.rows)
    if kind in ("linear", "conv1d_hf"):
        X = x.reshape(1, -1, info.cols)
        expected = y.reshape(1, -1, info.rows)
    else:
        m = layer
        X = unfold_conv_input(x, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        B = x.shape[0]
        # Sample n of group g is output position n % L of image n // L, channels of group g.
        expected = y.reshape(B, info.groups, info.rows, -1).permute(1, 0, 3, 2).reshape(info.groups, -1, info.rows)
    assert X.shape[-1] == info.cols
    torch.testing.assert_close(X @ W.transpose(1, 2) + bias, expected, rtol=1e-12, atol=1e-12)
