"""hf:DIR models, text calibration windows and the perplexity evaluation, on a tiny random Llama."""

import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="hf: models need transformers")

from obcompress.cli import main  # noqa: E402
from obcompress.zoo.hf import (  # noqa: E402
    NextTokenLogits,
    calibration_windows,
    evaluation_windows,
    hf_entry,
    load_hf_model,
    perplexity,
    tokenize_file,
)
from obcompress.zoo.registry import resolve  # noqa: E402


def test_model_by_local_path_and_class(tiny_llama_dir):
    model, tok = load_hf_model(f"hf:{tiny_llama_dir}")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32 and tok is not None
    base, _ = load_hf_model(tiny_llama_dir, hf_class="AutoModel")  # the override: the bare decoder
    assert type(base).__name__ == "LlamaModel"
    with pytest.raises(ValueError, match="not a transformers model class"):
        load_hf_model(tiny_llama_dir, hf_class="NoSuchModel")


def test_only_local_directories(tmp_path):
    with pytest.raises(ValueError, match="never downloads from the Hugging Face hub"):
        load_hf_model("hf:HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_model(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="no such local directory"):
        resolve(f"hf:{tmp_path / 'missing'}")


def test_calibration_windows_spread_over_the_text():
    tokens = torch.arange(1000)
    w = calibration_windows(tokens, 64, 5)
    starts = [int(b["input_ids"][0, 0]) for b in w]
    assert starts == [0, 234, 468, 702, 936]  # round(i * (1000 - 64) / 4): first token to last full window
    for b, s in zip(w, starts):
        assert b["input_ids"].shape == (1, 64) and torch.equal(b["input_ids"][0], tokens[s:s + 64])
    assert [int(b["input_ids"][0, 0]) for b in calibration_windows(tokens, 64, 5)] == starts  # deterministic
    assert int(calibration_windows(tokens, 64, 1)[0]["input_ids"][0, 0]) == 0
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 64, 1)


def test_evaluation_windows_are_consecutive_and_disjoint():
    tokens = torch.arange(1000)
    w = evaluation_windows(tokens, 64)
    assert len(w) == 15  # 1000 // 64; the partial last window is dropped
    assert torch.equal(torch.cat([b["input_ids"][0] for b in w]), tokens[:960])
    assert len(evaluation_windows(tokens, 64, max_windows=4)) == 4
    with pytest.raises(ValueError, match="positive integer"):
        evaluation_windows(tokens, 64, max_windows=0)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_llama_dir, tiny_texts):
    model, tok = load_hf_model(tiny_llama_dir)
    windows = evaluation_windows(tokenize_file(tok, tiny_texts[1]), 32, 3)
    got = perplexity(model, windows)
    # Oracle: transformers' own language-model loss, the mean NLL of each window's shifted tokens;
    # every window predicts the same number of tokens, so the mean over windows is the mean over tokens.
    with torch.no_grad():
        losses = [float(model(input_ids=w["input_ids"], labels=w["input_ids"]).loss) for w in windows]
    mean = sum(losses) / len(losses)
    assert got["windows"] == 3
    assert got["nll"] == pytest.approx(mean, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)


def test_entry_calibrates_on_text_and_warns_when_files_coincide(tiny_llama_dir, tiny_texts):
    calib, ev = tiny_texts
    entry = hf_entry(f"hf:{tiny_llama_dir}", data=f"text:{calib}", eval_data=f"perplexity:{ev}", seq_len=32,
                     num_calibration=6, eval_windows=2)
    batches = list(entry.calibration)
    assert len(batches) == 6 and all(b["input_ids"].shape == (1, 32) for b in batches)
    assert entry.evaluate(entry.model)["windows"] == 2
    with pytest.warns(UserWarning, match="same file"):
        hf_entry(f"hf:{tiny_llama_dir}", data=f"text:{calib}", eval_data=f"perplexity:{calib}")
    no_data = hf_entry(f"hf:{tiny_llama_dir}")
    with pytest.raises(ValueError, match="needs calibration data: --data text:FILE"):
        list(no_data.calibration)
    assert no_data.evaluate(no_data.model) == {}
    with pytest.raises(ValueError, match="takes text:FILE"):
        hf_entry(f"hf:{tiny_llama_dir}", data=str(calib))


def test_fisher_task_is_next_token_cross_entropy(tiny_llama_dir, tiny_texts):
    entry = hf_entry(f"hf:{tiny_llama_dir}", data=f"text:{tiny_texts[0]}", seq_len=32, num_calibration=2)
    task = entry.fisher_task()
    assert isinstance(task.model, NextTokenLogits) and task.prefix == "lm."
    assert "lm.lm_head" not in task.targets and len(task.targets) == 14
    x, y = task.data[0]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(task.model(x), y)
        ref = entry.model(input_ids=x, labels=x).loss
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_cli_compress_eval_with_text_data(tiny_llama_dir, tiny_texts, tmp_path, capsys):
    calib, ev = tiny_texts
    recipe = tmp_path / "r.yaml"
    recipe.write_text("solver: rtn\nignore: [lm_head]\nquantization: {num_bits: 8}\n")
    hf = ["--model", f"hf:{tiny_llama_dir}", "--seq-len", "32"]
    assert main(["compress", *hf, "--recipe", str(recipe), "--data", f"text:{calib}", "--eval-data",
                 f"perplexity:{ev}", "--eval-windows", "3", "--calibration-samples", "4", "--out",
                 str(tmp_path / "art"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "compressed: perplexity" in out and "windows 3" in out
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["calibration_samples"] == 4 and report["metrics"]["windows"] == 3
    assert main(["eval", *hf, "--artifact", str(tmp_path / "art"), "--eval-data", f"perplexity:{ev}",
                 "--eval-windows", "3"]) == 0
    again = capsys.readouterr().out
    assert float(again.split("perplexity ")[1].split(",")[0]) == pytest.approx(report["metrics"]["perplexity"],
                                                                                rel=1e-3)
    assert main(["eval", *hf]) == 0
    assert "no evaluation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "digits-cnn", "--data", f"text:{calib}"])
    assert e.value.code == 2 and "only for Hugging Face models" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["compress", *hf, "--recipe", str(recipe), "--out", str(tmp_path / "a2")])
    assert e.value.code == 2 and "--data text:FILE" in capsys.readouterr().err
