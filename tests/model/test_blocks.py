import copy

import pytest
import torch
import torch.nn as nn

from obcompress.model import find_layers, weight_groups
from obcompress.model.blocks import find_blocks, plan_blocks, sequential_calibration
from obcompress.model.layers import set_weight_groups


def _hand_hessian(X):
    X = X.double().reshape(-1, X.shape[-1])
    return 2 * X.t() @ X / X.shape[0]


class Block(nn.Module):
    """A transformer-like block: q/k/v read one input, a mask and a per-depth rate as keyword arguments."""

    def __init__(self, d=6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x, mask=None, rate=0.0):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) + mask, dim=-1)
        return x + (1 + rate) * self.out(torch.tanh(a @ self.v(x)))


class Stack(nn.Module):
    def __init__(self, n=3, d=6, between=False):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)
        self.between = between

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), -1e4), 1)
        h = self.stem(x)
        for i, b in enumerate(self.blocks):
            h = b(h, mask=mask, rate=0.1 * i)
            if self.between:
                h = h * 0.5  # something between the blocks: they do not chain
        return self.head(h)


def _close(a, b, rtol, atol, what):
    # torch.testing's comparison imports torch.distributed on first use: seconds per test run.
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), what


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 4, generator=g) for _ in range(n)]


def _round_weights(names, hessians, layers, log):
    """A stand-in compressor: rounds each weight to 1/4 (what it does does not matter, only that
    later layers see its effect), and records the Hessians it was given."""
    for n in names:
        log[n] = hessians[n]
        set_weight_groups(layers[n], torch.round(weight_groups(layers[n]) * 4) / 4)


def test_find_blocks_longest_module_list_targets_and_none():
    m = Stack()
    blocks, how = find_blocks(m)
    assert [n for n, _ in blocks] == ["blocks.0", "blocks.1", "blocks.2"] and "3 x Block" in how
    blocks, how = find_blocks(m, ["re:blocks\\.[01]"])
    assert [n for n, _ in blocks] == ["blocks.0", "blocks.1"]
    assert find_blocks(m, ["Block"])[0][2][0] == "blocks.2"  # class names; outermost matches only
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))[0] == []
    with pytest.raises(ValueError, match="match no module"):
        find_blocks(m, ["nope"])

    class Two(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.long = nn.ModuleList(nn.Sequential(nn.Linear(2, 2)) for _ in range(4))
            self.blocks = nn.ModuleList(Block(2) for _ in range(2))

    assert find_blocks(Two())[0][0][0] == "blocks.0"  # the model's own block class wins over length


def test_plan_finds_blocks_layers_outside_them_shared_inputs_and_per_block_numbers():
    m = Stack()
    layers = find_layers(m)
    plan = plan_blocks(m, layers, _data(1)[0])
    assert plan.chained, plan.reason
    assert plan.before == ["stem"] and plan.after == ["head"]
    assert plan.block_layers[1] == ["blocks.1.q", "blocks.1.k", "blocks.1.v", "blocks.1.out"]
    assert plan.shares["blocks.0.k"] == "blocks.0.q" and plan.shares["blocks.0.v"] == "blocks.0.q"
    assert "blocks.0.out" not in plan.shares
    # The mask is the same tensor for every block; the rate grows with depth and is replayed per block.
    assert plan.kwarg_overrides[0] == {} and plan.kwarg_overrides[2] == {"rate": pytest.approx(0.2)}


def test_blocks_that_do_not_chain_fall_back_with_the_reason():
    m = Stack(between=True)
    plan = plan_blocks(m, find_layers(m), _data(1)[0])
    assert not plan.chained and "not fed the output of block blocks.0" in plan.reason


def _sequential_by_definition(model, data):
    """Sequential calibration by its definition: each layer (in call order), one full pass of the
    model as it is now for its Hessian, then the stand-in compression."""
    layers = find_layers(model)
    order = ["stem"] + [f"blocks.{i}.{x}" for i in range(len(model.blocks)) for x in "qkvo"] + ["head"]
    order = [n if not n.endswith(".o") else n + "ut" for n in order]
    got = {}
    for name in order:
        seen = []
        h = layers[name].module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        with torch.no_grad():
            for x in data:
                model(x)
        h.remove()
        got[name] = _hand_hessian(torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]))
        set_weight_groups(layers[name], torch.round(weight_groups(layers[name]) * 4) / 4)
    return got


@pytest.mark.parametrize("between", [False, True])
def test_hessians_are_those_of_the_model_compressed_up_to_there(between, one_thread):
    """Block by block (and the layer-wise fallback): every layer's H is the one a full pass of the
    model compressed up to that layer gives, except that a block's layers calibrate together: its
    output layer sees the block's q, k, v still dense (q, k and v share their input anyway)."""
    torch.manual_seed(0)
    model = Stack(between=between)
    ref_model = copy.deepcopy(model)
    data = _data()
    layers = find_layers(model)
    log = {}
    info = sequential_calibration(model, layers, data, lambda n, H: _round_weights(n, H, layers, log), progress=False)
    assert info["path"] == ("layers" if between else "blocks")
    assert sorted(log) == sorted(layers)
    if not between:
        assert info["blocks"] == 3 and info["block_passes"] == 3 + 2
        # One accumulator per distinct input: k and v get q's very tensor.
        assert log["blocks.1.k"] is log["blocks.1.q"] and log["blocks.1.v"] is log["blocks.1.q"]
    ref = _sequential_by_definition(ref_model, data)
    for name, H in log.items():
        if between or not name.endswith(".out"):
            _close(H[0], ref[name], 1e-9, 1e-12, name)
    # The stand-in ignores H: the weights agree everywhere.
    for n, p in model.state_dict().items():
        assert torch.equal(p, ref_model.state_dict()[n]), n


def test_block_inputs_stay_on_their_device_and_blocks_move_to_the_asked_one(one_thread):
    torch.manual_seed(0)
    model = Stack()
    layers = find_layers(model)
    log = {}
    info = sequential_calibration(model, layers, _data(2), lambda n, H: _round_weights(n, H, layers, log),
                                  device=torch.device("cpu"), progress=False)
    assert info["path"] == "blocks" and all(H.device.type == "cpu" for H in log.values())


def test_hf_llama_blocks_get_their_attention_kwargs(one_thread):
    """A tiny Hugging Face Llama: the decoder layers are the blocks, position embeddings and the
    mask are captured with their inputs, and each layer's H is what the model compressed up to its
    block gives (hooks on the full model, layers of later blocks dense)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 50, (2, 8), generator=g)} for _ in range(3)]
    layers = find_layers(model, None, ["lm_head"])
    log = {}
    info = sequential_calibration(model, layers, data, lambda n, H: _round_weights(n, H, layers, log), progress=False)
    assert info["path"] == "blocks" and "LlamaDecoderLayer" in info["found_by"] and info["blocks"] == 3
    assert log["model.layers.2.mlp.up_proj"] is log["model.layers.2.mlp.gate_proj"]
    assert model.config.use_cache == dense.config.use_cache
    for i in range(3):
        probe = copy.deepcopy(dense)
        # Blocks before i as compressed, block i and later dense.
        for b in range(i):
            probe.model.layers[b].load_state_dict(model.model.layers[b].state_dict())
        for short in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{short}"
            seen = []
            mod = dict(probe.named_modules())[name]
            h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
            with torch.no_grad():
                for batch in data:
                    probe(**batch, use_cache=False)
            h.remove()
            ref = _hand_hessian(torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]))
            _close(log[name][0], ref, 1e-6, 1e-9, name)
