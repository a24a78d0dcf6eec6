import pytest
import torch


@pytest.fixture
def one_thread():
    # Small problems run fastest on one thread, and the timings of other jobs stay honest.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# A tiny random Hugging Face Llama with a tokenizer trained here: no download, seconds to build.

_WORDS = ("the of and to a in that was her his she not be it had as for with which you he at but on "
          "have is by all so him my they were been this from said would could what one there any no mr "
          "elizabeth darcy bennet bingley sister mother letter house room walk evening morning ball").split()


def tiny_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-English: sentences of the words above, different for each seed."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(_WORDS), (n_words,), generator=g).tolist()
    words = [_WORDS[i] for i in idx]
    return " ".join(w + ("." if k % 11 == 10 else "") for k, w in enumerate(words)) + "\n"


def build_tiny_llama_dir(directory, tie_word_embeddings: bool = False, seed: int = 0):
    """A LlamaForCausalLM (hidden 128, 2 layers, 4 heads / 2 KV heads, FFN 384) saved with a byte-level
    BPE tokenizer of 384 tokens trained on tiny_text; returns the directory."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")
    tokenizers = pytest.importorskip("tokenizers", reason="the Hugging Face tests need tokenizers")
    from pathlib import Path

    directory = Path(directory)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    bpe.train_from_iterator([tiny_text(4000, 99)], trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=128, intermediate_size=384,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return build_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_texts(tmp_path_factory):
    """(calibration file, evaluation file) of pseudo-English text."""
    d = tmp_path_factory.mktemp("texts")
    calib, ev = d / "calib.txt", d / "eval.txt"
    calib.write_text(tiny_text(3000, 1), encoding="utf-8")
    ev.write_text(tiny_text(3000, 2), encoding="utf-8")
    return calib, ev
