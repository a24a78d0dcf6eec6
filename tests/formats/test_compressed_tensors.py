"""The compressed-tensors export: the bit layout against its definition and against the package,
the checkpoint's structure and sizes, and the proof that transformers loads it in a fresh process
with logits equal to obcompress's own compressed model."""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from obcompress.api import compress
from obcompress.formats import save
from obcompress.formats.compressed_tensors import (
    ct_layout,
    export_compressed_tensors,
    pack_int32,
    read_ct_weight,
    unpack_int32,
)

transformers = pytest.importorskip("transformers", reason="the compressed-tensors export needs transformers")

from obcompress.zoo.hf import calibration_windows, load_hf_model, tokenize_file  # noqa: E402


def _ct_installed():
    try:
        import compressed_tensors  # noqa: F401 (whether it imports is the question)

        return True
    except ImportError:
        return False


needs_ct = pytest.mark.skipif(not _ct_installed(), reason="loading the checkpoint needs compressed-tensors "
                                                          "(pip install 'obcompress[hf]')")


# ------------------------------------------------------------------------------------------ packing


def _words_by_definition(codes, bits, dense):
    """Word values from the layout's definition, one bit at a time (no numpy, no shifts of tensors)."""
    out = []
    for row in codes.tolist():
        words = []
        if dense:
            stream = [(c >> b) & 1 for c in row for b in range(bits)]
            stream += [0] * (-len(stream) % 32)
            chunks = [stream[i:i + 32] for i in range(0, len(stream), 32)]
        else:
            per = 32 // bits
            row = row + [0] * (-len(row) % per)
            chunks = [[(c >> b) & 1 for c in row[i:i + per] for b in range(bits)] for i in range(0, len(row), per)]
        for chunk in chunks:
            v = sum(bit << k for k, bit in enumerate(chunk))
            words.append(v - (1 << 32) if v >= 1 << 31 else v)  # as int32
        out.append(words)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_pack_int32_is_the_defined_bit_layout_and_unpacks(bits, dense):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 37), generator=g)
    words = pack_int32(codes, bits, dense)
    assert torch.equal(words, _words_by_definition(codes, bits, dense))
    assert torch.equal(unpack_int32(words, bits, 37, dense), codes)
    down = pack_int32(codes, bits, dense, dim=0)  # zero points pack along the rows
    assert torch.equal(down, _words_by_definition(codes.t(), bits, dense).t())
    assert torch.equal(unpack_int32(down, bits, 3, dense, dim=0), codes)


@needs_ct
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_int32_equals_the_installed_compressed_tensors(bits):
    import compressed_tensors
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:  # older package layout
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32
    dense = ct_layout(compressed_tensors.__version__).dense_packing
    codes = torch.randint(0, 2**bits, (5, 70), generator=torch.Generator().manual_seed(0))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # the package packs signed values
    assert torch.equal(pack_int32(codes, bits, dense), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes, bits, dense, dim=0), pack_to_int32(signed, bits, packed_dim=0))


def test_layout_follows_the_reader_version():
    old, mid, new = ct_layout("0.15.0.1"), ct_layout("0.18.0"), ct_layout("0.20.1")
    assert (old.dense_packing, old.g_idx, old.zero_points) == (False, True, True)
    assert (mid.dense_packing, mid.g_idx, mid.zero_points) == (True, True, False)
    assert (new.dense_packing, new.g_idx, new.zero_points) == (True, False, False)
    with pytest.raises(ValueError, match="predates 0.15"):
        ct_layout("0.14.0")
    with pytest.raises(ValueError, match="not a version"):
        ct_layout("latest")


# ------------------------------------------------------------------------------------------ models

RECIPES = {
    "gptq_w4g128": {"solver": "gptq", "ignore": ["lm_head"],
                    "quantization": {"num_bits": 4, "strategy": "group", "group_size": 128}},
    "sparsegpt_24_w4": {"solver": "sparsegpt", "ignore": ["lm_head"], "sparsity": {"mask_structure": "2:4"},
                        "quantization": {"num_bits": 4}},
    "exactobs_50": {"solver": "exact", "ignore": ["lm_head"], "sparsity": {"sparsity": 0.5}},
    # What `search select` / `search fit` write: one scheme per layer, several bit widths and sparsities.
    "mixed": {"solver": "rtn", "ignore": ["lm_head", "model.layers.1.self_attn.o_proj"],
              "quantization": {"num_bits": 4, "strategy": "group", "group_size": 96},
              "layers": {"re:.*q_proj": {"quantization": {"num_bits": 8, "strategy": "channel"}},
                         "re:.*k_proj": {"solver": "magnitude", "sparsity": {"mask_structure": "2:4"}},
                         "re:.*v_proj": {"solver": "magnitude", "sparsity": {"sparsity": 0.5}, "quantization": None},
                         "re:.*up_proj": {"solver": "magnitude", "sparsity": {"mask_structure": "block:4",
                                                                              "sparsity": 0.5}},
                         "re:.*down_proj": {"quantization": {"num_bits": 3, "symmetric": False,
                                                             "group_size": 128}}}},
    "gptq_act_order": {"solver": "gptq", "ignore": ["lm_head"],
                       "quantization": {"num_bits": 4, "strategy": "group", "group_size": 32, "act_order": True}},
    "w4a8": {"solver": "rtn", "ignore": ["lm_head"], "quantization": {"num_bits": 4, "activations": {"num_bits": 8}}},
}


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, tiny_texts, tmp_path_factory):
    """{recipe: (artifact dir, logits of obcompress's compressed model)} and the test input."""
    root = tmp_path_factory.mktemp("ct")
    _, tok = load_hf_model(tiny_llama_dir)
    calib = calibration_windows(tokenize_file(tok, tiny_texts[0]), 64, 16)
    ids = tokenize_file(tok, tiny_texts[1])[:96].reshape(2, 48)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems: one thread is fastest and leaves the other core free
    try:
        _compress_all(tiny_llama_dir, calib, ids, root, out)
    finally:
        torch.set_num_threads(threads)  # the next test modules see the machine as they expect
    return root, ids, out


def _compress_all(tiny_llama_dir, calib, ids, root, out):
    for key, recipe in RECIPES.items():
        model, _ = load_hf_model(tiny_llama_dir)
        result = compress(model, recipe, calib, num_calibration_samples=16, progress=False)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        save(model, result, root / f"art_{key}")
        out[key] = (root / f"art_{key}", logits)


def _export(tiny_llama_dir, art, out, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = export_compressed_tensors(load_hf_model(tiny_llama_dir)[0], art, out, **kw)
    return res, [str(w.message) for w in caught]


def _dir_bytes(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def test_checkpoint_structure_sizes_and_tokenizer(compressed, tiny_llama_dir):
    root, _, arts = compressed
    res, notes = _export(tiny_llama_dir, arts["gptq_w4g128"][0], root / "ct_struct", ct_version="0.20.1")
    assert not notes
    cfg = json.loads((res.directory / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["version"] == "0.20.1"
    # 128-column layers have one group of 128, which is per-channel; down_proj (384 columns) has three.
    schemes = {(g["weights"]["strategy"], g["weights"]["group_size"]): g["targets"] for g in q["config_groups"].values()}
    assert set(schemes) == {("channel", None), ("group", 128)}
    assert schemes[("group", 128)] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(schemes[("channel", None)]) == 12 and "lm_head" not in schemes[("channel", None)]
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "generation_config.json"):
        assert (res.directory / f).is_file()
    from safetensors.torch import load_file

    t = load_file(str(res.directory / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert name + ".weight" not in t
    assert t[name + ".weight_packed"].dtype == torch.int32 and tuple(t[name + ".weight_packed"].shape) == (128, 48)
    assert tuple(t[name + ".weight_scale"].shape) == (128, 3) and t[name + ".weight_shape"].tolist() == [128, 384]
    assert name + ".weight_zero_point" not in t  # symmetric
    # Reported = measured: the directory on disk, and each layer's tensors in the file.
    assert res.bytes == _dir_bytes(res.directory)
    layer_bytes = sum(v.numel() * v.element_size() for k, v in t.items() if k.startswith(name + "."))
    assert res.layers[name]["bytes"] == layer_bytes
    assert res.weights_bytes == (res.directory / "model.safetensors").stat().st_size
    # 4-bit codes: the checkpoint is well under a third of fp32 (the embeddings stay float).
    assert res.bytes < res.fp32_bytes / 3


def test_ragged_groups_become_equal_groups(compressed, tiny_llama_dir):
    root, _, arts = compressed
    res, notes = _export(tiny_llama_dir, arts["mixed"][0], root / "ct_ragged", ct_version="0.17.1")
    # 128 columns in groups of 96 are groups of 96 and 32: written as four groups of 32.
    gate = res.layers["model.layers.0.mlp.gate_proj"]
    assert (gate["strategy"], gate["group_size"], gate["bits"]) == ("group", 32, 4)
    # Asymmetric 3-bit keeps its zero points for 0.17 readers ...
    down = res.layers["model.layers.0.mlp.down_proj"]
    assert (down["strategy"], down["group_size"], down["bits"]) == ("group", 128, 3)
    assert not any("one bit wider" in n for n in notes)
    # ... and is widened to symmetric 4-bit for 0.20 readers, whose transformers path cannot load them.
    res2, notes2 = _export(tiny_llama_dir, arts["mixed"][0], root / "ct_ragged2", ct_version="0.20.1")
    down2 = res2.layers["model.layers.0.mlp.down_proj"]
    assert (down2["bits"], down2["group_size"]) == (4, 128)
    assert any("one bit wider" in n for n in notes2)


def test_mixed_precision_is_one_config_group_per_scheme(compressed, tiny_llama_dir):
    root, _, arts = compressed
    res, notes = _export(tiny_llama_dir, arts["mixed"][0], root / "ct_mixed", ct_version="0.17.1")
    q = json.loads((res.directory / "config.json").read_text())["quantization_config"]
    by_scheme = {}
    for g in q["config_groups"].values():
        w = g["weights"]
        by_scheme[(w["num_bits"], w["symmetric"], w["strategy"], w["group_size"])] = set(g["targets"])
    both = lambda s: {f"model.layers.{i}.{s}" for i in (0, 1)}  # noqa: E731
    assert by_scheme == {
        (8, True, "channel", None): both("self_attn.q_proj"),
        (4, True, "group", 32): both("self_attn.k_proj") | both("mlp.gate_proj") | both("mlp.up_proj")
        | {"model.layers.0.self_attn.o_proj"},
        (3, False, "group", 128): both("mlp.down_proj"),
    }
    assert res.layers["model.layers.0.self_attn.v_proj"]["written"] == "dense"  # pruned, not quantized
    assert "model.layers.1.self_attn.o_proj" not in res.layers  # left dense by the recipe
    sp = q["sparsity_config"]
    assert sp["format"] == "dense"
    assert set(sp["targets"]) == both("self_attn.k_proj") | both("self_attn.v_proj") | both("mlp.up_proj")
    assert sp["sparsity_structure"] == "unstructured"  # 2:4, block and unstructured layers together
    assert any("pruned layer(s) written densely" in n for n in notes)
    assert any("fuse into one matrix" in n and "model.layers.0.self_attn.q_proj" in n for n in notes)


def test_act_order_needs_an_older_reader_else_dense(compressed, tiny_llama_dir):
    root, _, arts = compressed
    res, _ = _export(tiny_llama_dir, arts["gptq_act_order"][0], root / "ct_act18", ct_version="0.18.0")
    assert all(e["written"] == "pack-quantized" and e["act_order"] for e in res.layers.values())
    res, notes = _export(tiny_llama_dir, arts["gptq_act_order"][0], root / "ct_act20", ct_version="0.20.1")
    assert all(e["written"] == "dense" for e in res.layers.values())
    assert any("weight_g_idx" in n for n in notes)


def test_refusals(compressed, tiny_llama_dir, tmp_path):
    _, _, arts = compressed
    model = load_hf_model(tiny_llama_dir)[0]
    with pytest.raises(ValueError, match="Hugging Face transformers model"):
        export_compressed_tensors(torch.nn.Linear(2, 2), arts["gptq_w4g128"][0], tmp_path / "x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a compressed-tensors export; refusing"):
        export_compressed_tensors(model, arts["gptq_w4g128"][0], foreign)
    with pytest.raises(ValueError, match="asymmetric must be one of"):
        export_compressed_tensors(model, arts["gptq_w4g128"][0], tmp_path / "y", asymmetric="maybe")
    # An input quantizer needs its layer's scheme; a layer written densely cannot carry it.
    art = tmp_path / "art_wa_act"
    m, tok = load_hf_model(tiny_llama_dir)
    calib = [{"input_ids": torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    recipe = {"solver": "gptq", "ignore": ["lm_head"], "quantization": {
        "num_bits": 4, "strategy": "group", "group_size": 32, "act_order": True, "activations": {"num_bits": 8}}}
    save(m, compress(m, recipe, calib, num_calibration_samples=4, progress=False), art)
    with pytest.raises(ValueError, match="input quantizer cannot be written"):
        export_compressed_tensors(load_hf_model(tiny_llama_dir)[0], art, tmp_path / "z", ct_version="0.20.1")
    assert not (tmp_path / "z").exists()


def test_written_weights_decode_to_the_models(compressed, tiny_llama_dir):
    """The format's definition (read_ct_weight) gives back exactly the weights obcompress computed."""
    root, _, arts = compressed
    from safetensors.torch import load_file

    from obcompress.formats import load

    for version in ("0.17.1", "0.20.1"):
        res, _ = _export(tiny_llama_dir, arts["mixed"][0], root / f"ct_dec_{version}", ct_version=version)
        t = load_file(str(res.directory / "model.safetensors"))
        ref = load(arts["mixed"][0], load_hf_model(tiny_llama_dir)[0]).state_dict()
        groups = json.loads((res.directory / "config.json").read_text())["quantization_config"]["config_groups"]
        for g in groups.values():
            for name in g["targets"]:
                W = read_ct_weight(t, name, g, ct_layout(version).dense_packing)
                assert torch.equal(W, ref[name + ".weight"]), name


# ------------------------------------------------------------------------------------------ the proof

_RELOAD = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error(); logging.disable_progress_bar()
    ids = load_file(sys.argv[1])["ids"]
    out = {}
    for d in sys.argv[2:]:
        m = AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            out[d] = {"logits": m(input_ids=ids).logits.tolist(), "class": type(m).__name__}
    print(json.dumps(out))
""")


@needs_ct
def test_transformers_loads_the_export_in_a_fresh_process(compressed, tiny_llama_dir):
    """GPTQ 4-bit g128, SparseGPT 2:4 + 4-bit, ExactOBS 50 %, a mixed-precision recipe, act-order and
    W4A8, each exported for the installed compressed-tensors and loaded by
    AutoModelForCausalLM.from_pretrained in a new Python process: its logits equal those of
    obcompress's compressed model, and the directory holds the bytes the export reports."""
    from safetensors.torch import save_file

    root, ids, arts = compressed
    dirs = {}
    for key, (art, _) in arts.items():
        res, _ = _export(tiny_llama_dir, art, root / f"proof_{key}")
        assert res.bytes == _dir_bytes(res.directory)
        dirs[key] = str(res.directory)
    save_file({"ids": ids.contiguous()}, str(root / "ids.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(root / "ids.safetensors"), *dirs.values()],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, d in dirs.items():
        ref = arts[key][1]
        logits = torch.tensor(got[d]["logits"])
        assert got[d]["class"] == "LlamaForCausalLM"
        rel = float((logits - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-4, f"{key}: max abs logit difference {rel:.3g} of the logit scale"


@needs_ct
def test_cli_export_then_perplexity_of_the_reloaded_model(compressed, tiny_llama_dir, tiny_texts, tmp_path, capsys):
    from obcompress.cli import main

    root, _, arts = compressed
    out = tmp_path / "ct_cli"
    assert main(["export", "--model", f"hf:{tiny_llama_dir}", "--artifact", str(arts["sparsegpt_24_w4"][0]),
                 "--format", "compressed-tensors", "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert f"{_dir_bytes(out):,d} bytes on disk" in text.out and "pruned layer(s) written densely" in text.err
    assert main(["eval", "--model", f"hf:{tiny_llama_dir}", "--artifact", str(arts["sparsegpt_24_w4"][0]),
                 "--eval-data", f"perplexity:{tiny_texts[1]}", "--seq-len", "64", "--eval-windows", "4"]) == 0
    line = capsys.readouterr().out
    ours = float(line.split("perplexity ")[1].split(",")[0])
    # The fresh-process proof is the test above; here the reloaded checkpoint's perplexity, in process.
    from obcompress.zoo.hf import evaluation_windows, perplexity, tokenize_file

    m = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))  # the copied tokenizer files
    theirs = perplexity(m, evaluation_windows(tokenize_file(tok, tiny_texts[1]), 64, 4))["perplexity"]
    assert math.isclose(theirs, ours, rel_tol=1e-3)  # the CLI prints 4 significant digits
