"""Tests for scripts/make_tiny_model.py.

The script is run as a subprocess, exactly as the pipeline runs it, and its
output is checked for the FLAN-T5 properties the pipeline depends on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from tests.conftest import FLAN_SMALL, load_script, make_tiny_model, require_shared

SENTENCE = "#Person1#: Hello, how are you? #Person2#: I'm fine, thanks. Let's meet at 9:30 a.m."


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    """The default output (self-trained tokenizer, seed 0): conftest's session-wide build."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return AutoModelForSeq2SeqLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_config_is_small_t5_v1_1(tiny_model):
    config = tiny_model.config
    assert config.model_type == "t5"
    assert config.feed_forward_proj == "gated-gelu"
    assert (config.num_layers, config.num_decoder_layers) == (2, 2)
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)


def test_saved_config_declares_untied_head(tiny_dir):
    saved = json.loads((tiny_dir / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False


def test_safetensors_holds_separate_head_and_embedding(tiny_dir):
    tensors = load_tensors(tiny_dir)
    assert "lm_head.weight" in tensors
    assert "shared.weight" in tensors
    assert not torch.equal(tensors["lm_head.weight"], tensors["shared.weight"])


def test_loaded_head_is_untied_and_matches_saved_head(tiny_dir, tiny_model):
    head, shared = tiny_model.lm_head.weight, tiny_model.shared.weight
    assert head.data_ptr() != shared.data_ptr()
    assert not torch.equal(head, shared)
    assert torch.equal(head, load_tensors(tiny_dir)["lm_head.weight"])


def test_vocab_covers_tokenizer(tiny_model, tiny_tokenizer):
    assert tiny_model.config.vocab_size >= len(tiny_tokenizer)
    assert tiny_model.shared.weight.shape[0] == tiny_model.config.vocab_size


def test_tokenizer_has_t5_special_tokens(tiny_tokenizer):
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tiny_tokenizer.eos_token, tiny_tokenizer.eos_token_id) == ("</s>", 1)
    assert (tiny_tokenizer.unk_token, tiny_tokenizer.unk_token_id) == ("<unk>", 2)
    assert 300 <= len(tiny_tokenizer) <= 1000


def test_tokenizer_round_trips_english(tiny_tokenizer):
    ids = tiny_tokenizer(SENTENCE).input_ids
    assert ids[-1] == tiny_tokenizer.eos_token_id  # </s> appended, as T5 does
    assert tiny_tokenizer.unk_token_id not in ids
    assert len(ids) < len(SENTENCE)  # pieces longer than single characters exist
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE


def test_model_generates(tiny_model, tiny_tokenizer):
    inputs = tiny_tokenizer(["summarize: " + SENTENCE], return_tensors="pt")
    output = tiny_model.generate(**inputs, max_new_tokens=5)
    assert output.shape[0] == 1
    assert 1 < output.shape[1] <= 6  # decoder start token + at most 5 new tokens
    assert output[0, 0].item() == tiny_model.config.decoder_start_token_id


def test_same_seed_gives_identical_output(tiny_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again")
    for name in ["model.safetensors", "config.json", "tokenizer.json"]:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_other_seed_gives_other_weights(tiny_dir, tmp_path):
    # In-process through main(argv), which is cheap once transformers is imported.
    script = load_script("make_tiny_model")
    assert script.main([str(tmp_path / "seed1"), "--seed", "1"]) == 0

    seed0, seed1 = load_tensors(tiny_dir), load_tensors(tmp_path / "seed1")
    assert seed0.keys() == seed1.keys()
    for name in ["shared.weight", "lm_head.weight"]:
        assert not torch.equal(seed0[name], seed1[name]), name
    # The tokenizer depends on the built-in corpus only, not on the seed.
    assert (tmp_path / "seed1" / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_with_flan_t5_tokenizer(tmp_path):
    require_shared()
    out_dir = make_tiny_model(tmp_path / "flan", "--tokenizer", str(FLAN_SMALL), "--seed", "1")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(out_dir)

    assert len(tokenizer) == 32100
    assert model.config.vocab_size >= 32100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert tokenizer.decode(tokenizer(SENTENCE).input_ids, skip_special_tokens=True) == SENTENCE
