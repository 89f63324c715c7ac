"""Tests for stages/family.py, the model family seam, on tiny random models of every tested family.

The models come from scripts/make_tiny_model.py (run in-process, once per module): FLAN-T5-style
(head apart), T5 v1.0-style (tied head), BART, Llama-style and GPT-2-style, with the tokenizers
the script trains (GPT-2's and Llama's have no pad token; Llama's adds BOS, BART's <s> ... </s>).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from stages import family as F
from stages.errors import StageError
from stages.generate import generation_config
from stages.modeling import head_is_tied, save_model
from stages.params import parse_params
from stages.quantization import quantization_config
from stages.rouge import mean_scores, score_corpus
from tests.conftest import MEMORIZATION_LORA_TARGETS, REPO, load_script, memorization_rows

FAMILIES = ("t5", "t5_tied", "bart", "llama", "gpt2")
CAUSAL = ("llama", "gpt2")
PROMPT = "Summarize the following conversation.\n\n#Person1#: Hello, how are you?\n#Person2#: I'm fine.\n\nSummary: "
SUMMARY = "#Person1# and #Person2# greet each other."
# Llama at width 64: capacity to memorize 8 summaries (the ceiling test). The QLoRA test quantizes a
# 128-wide one: bitsandbytes' CPU 4-bit kernel needs every quantized layer's input width to be a
# multiple of 64 (its block) and output width a multiple of 32 (8 heads share 2 key/value heads of 16)
BUILD_ARGS = {
    "t5_tied": ["--tied"],
    "bart": ["--family", "bart"],
    "llama": ["--family", "llama", "--width", "64"],
    "llama128": ["--family", "llama", "--width", "128"],
    "gpt2": ["--family", "gpt2"],
}
BEAMS = GenerationConfig(num_beams=4, max_new_tokens=16, early_stopping=True, do_sample=False, length_penalty=1.0)


@pytest.fixture(scope="module")
def script():
    """scripts/make_tiny_model.py as a module: main(argv) runs in-process (one interpreter start)."""
    return load_script("make_tiny_model")


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dir, script, tmp_path_factory) -> dict[str, Path]:
    """One directory per family: conftest's session FLAN-T5-style model and the others built
    in-process through make_tiny_model.main."""
    root = tmp_path_factory.mktemp("families")
    for name, args in BUILD_ARGS.items():
        assert script.main([str(root / name), *args]) == 0
    return {"t5": tiny_model_dir, **{name: root / name for name in BUILD_ARGS}}


def load(tiny_dirs, name: str, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    return tokenizer, F.load_model(str(tiny_dirs[name]), **kwargs)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompts(tokenizer, model_family) -> list[list[int]]:
    """Three prompts of different lengths, so a batch really pads."""
    dialogues = ["Hi.", "Hello, how are you? I'm fine, thanks.", "Could you do me a favor? Sure. What do you need?"]
    return [
        F.encode_prompt(model_family, tokenizer, text_ids(tokenizer, f"Summarize: {d}\nSummary: ")) for d in dialogues
    ]


# --------------------------------------------------------------------------- identity and loading


def test_tiny_models_are_a_pure_function_of_the_arguments(tiny_dirs, script, tmp_path):
    for name in ("bart", "gpt2"):
        assert script.main([str(tmp_path / name), *BUILD_ARGS[name]]) == 0
        for file in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
            assert (tmp_path / name / file).read_bytes() == (tiny_dirs[name] / file).read_bytes(), (name, file)


def test_tied_is_for_t5_only(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["unused", "--family", "llama", "--tied"])
    assert "--tied builds a T5 v1.0-style model; --family llama has its own head layout" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, expected, auto_class",
    [
        ("t5", "seq2seq", AutoModelForSeq2SeqLM),
        ("t5_tied", "seq2seq", AutoModelForSeq2SeqLM),
        ("bart", "seq2seq", AutoModelForSeq2SeqLM),
        ("llama", "causal", AutoModelForCausalLM),
        ("gpt2", "causal", AutoModelForCausalLM),
    ],
)
def test_family_comes_from_the_config(tiny_dirs, name, expected, auto_class):
    config = F.load_config(str(tiny_dirs[name]))
    assert F.family(config) == expected
    assert F.auto_model_class(expected) is auto_class
    assert F.task_type(expected).value == ("SEQ_2_SEQ_LM" if expected == "seq2seq" else "CAUSAL_LM")
    model = F.load_model(str(tiny_dirs[name]))
    assert model.config.model_type == {"t5_tied": "t5"}.get(name, name)


def test_load_model_refuses_pickled_weights(tiny_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"])
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickled weights only
    with pytest.raises(StageError, match="could not load"):
        F.load_model(str(tmp_path))


def test_unknown_quantization_is_refused():
    with pytest.raises(StageError, match="quantization must be one of none, 4bit, 8bit, not '3bit'"):
        quantization_config("3bit")


# --------------------------------------------------------------------------- inputs and labels


def test_causal_example_masks_the_prompt_and_ends_with_eos(tiny_dirs):
    for name, bos in (("llama", True), ("gpt2", False)):
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
        prompt, summary = text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY)
        row = F.training_example("causal", prompt, summary, tokenizer)
        expected_prompt = ([tokenizer.bos_token_id] if bos else []) + prompt  # BOS as the tokenizer adds it
        assert row["input_ids"] == expected_prompt + summary + [tokenizer.eos_token_id], name
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        # prompt tokens carry no loss; the summary and its EOS do, so the model learns to stop
        assert row["labels"] == [-100] * len(expected_prompt) + summary + [tokenizer.eos_token_id], name


def test_causal_prompt_never_ends_with_eos_even_with_a_t5_tokenizer(tiny_dirs):
    # the FLAN-T5-style tokenizer appends </s> to every text; inside a causal input that would say
    # "the text ended" before the summary
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["t5"])
    prompt, summary = text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY)
    row = F.training_example("causal", prompt, summary, tokenizer)
    assert row["input_ids"] == prompt + summary + [tokenizer.eos_token_id]
    assert row["input_ids"].count(tokenizer.eos_token_id) == 1


def test_summary_is_cut_to_max_target_length_keeping_eos(tiny_dirs):
    for name, model_family in (("llama", "causal"), ("t5", "seq2seq"), ("bart", "seq2seq")):
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
        summary = text_ids(tokenizer, SUMMARY * 3)
        row = F.training_example(model_family, text_ids(tokenizer, PROMPT), summary, tokenizer, max_target_length=6)
        target = [t for t in row["labels"] if t != -100]
        assert len(target) == 6, name
        assert target[-1] == tokenizer.eos_token_id, name
        budget = F.target_text_budget(model_family, tokenizer, 6)
        assert summary[:budget] == [t for t in target if t not in tokenizer.all_special_ids], name


def test_seq2seq_example_is_what_the_tokenizer_gives(tiny_dirs):
    """The pipeline's original layout: encoder input = tokenizer(prompt), labels = tokenizer(summary)
    (T5: text </s>; BART: <s> text </s>)."""
    for name in ("t5", "bart"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
        row = F.training_example("seq2seq", text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY), tokenizer)
        assert row["input_ids"] == tokenizer(PROMPT)["input_ids"], name
        assert row["labels"] == tokenizer(SUMMARY)["input_ids"], name


def test_prompt_budget_leaves_room_for_special_tokens(tiny_dirs):
    expected = {"t5": ("seq2seq", 1), "bart": ("seq2seq", 2), "llama": ("causal", 1), "gpt2": ("causal", 0)}
    for name, (model_family, added) in expected.items():
        tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
        budget = F.prompt_text_budget(model_family, tokenizer, 512)
        assert budget == 512 - added, name
        assert len(F.encode_prompt(model_family, tokenizer, list(range(10, 10 + budget)))) == 512, name


def test_tokenizer_without_pad_gets_eos_without_new_embeddings(tiny_dirs):
    tokenizer, model = load(tiny_dirs, "gpt2")
    assert tokenizer.pad_token_id is None
    size = len(tokenizer)
    assert F.ensure_pad_token(tokenizer) is True
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == size == model.get_input_embeddings().weight.shape[0]
    assert F.ensure_pad_token(tokenizer) is False  # a second call changes nothing


def test_causal_collator_keeps_the_eos_label_when_pad_is_eos(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    F.ensure_pad_token(tokenizer)
    eos = tokenizer.eos_token_id
    rows = [
        F.training_example("causal", text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY), tokenizer),
        F.training_example("causal", text_ids(tokenizer, "Hi"), text_ids(tokenizer, "Hello"), tokenizer),
    ]
    batch = F.data_collator("causal", tokenizer, model=None)(rows)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(rows[0]["input_ids"])
    short = len(rows[1]["input_ids"])
    assert batch["labels"][1, short - 1].item() == eos  # the short row's real EOS still carries loss
    assert batch["labels"][1, short:].tolist() == [-100] * (width - short)
    assert batch["input_ids"][1, short:].tolist() == [eos] * (width - short)  # padded with pad = eos
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (width - short)


def test_causal_collator_needs_a_pad_token(tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    with pytest.raises(StageError, match="no pad token; call ensure_pad_token"):
        F.data_collator("causal", tokenizer, model=None)


# --------------------------------------------------------------------------- training through peft


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_auto_targets_train_a_step(tiny_dirs, name):
    tokenizer, model = load(tiny_dirs, name)
    F.ensure_pad_token(tokenizer)
    model_family = F.family(model.config)
    targets = F.default_target_modules(model.config, "lora")
    assert targets == {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}.get(
        model.config.model_type, ["c_attn"]
    )
    fan_in_fan_out = F.fan_in_fan_out(model, targets)
    assert fan_in_fan_out is (name == "gpt2")  # GPT-2's c_attn is a Conv1D
    config = LoraConfig(task_type=F.task_type(model_family), r=4, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(model, config)
    rows = [
        F.training_example(model_family, text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY), tokenizer),
        F.training_example(model_family, text_ids(tokenizer, "Hi"), text_ids(tokenizer, "Hello there"), tokenizer),
    ]
    batch = F.data_collator(model_family, tokenizer, peft_model)(rows)
    lora_b = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b and all(any(f".{t}." in n for t in targets) for n in lora_b)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss = peft_model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in peft_model.named_parameters() if n in lora_b and not torch.equal(p, lora_b[n])]
    assert sorted(changed) == sorted(lora_b)


@pytest.mark.parametrize("name", FAMILIES)
def test_ia3_auto_targets_train_a_step(tiny_dirs, name):
    tokenizer, model = load(tiny_dirs, name)
    F.ensure_pad_token(tokenizer)
    model_family = F.family(model.config)
    targets = F.default_target_modules(model.config, "ia3")
    config = IA3Config(
        task_type=F.task_type(model_family),
        target_modules=targets,
        feedforward_modules=F.default_feedforward_modules(model.config),
        fan_in_fan_out=F.fan_in_fan_out(model, targets),
    )
    peft_model = get_peft_model(model, config)
    row = F.training_example(model_family, text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY), tokenizer)
    batch = F.data_collator(model_family, tokenizer, peft_model)([row])
    vectors = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert vectors and all("ia3_l" in n for n in vectors)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**batch).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, vectors[n]) for n, p in peft_model.named_parameters() if n in vectors)


def test_default_targets_are_peft_mappings(tiny_dirs):
    for name in FAMILIES:
        config = F.load_config(str(tiny_dirs[name]))
        model_type = config.model_type
        assert F.default_target_modules(config, "lora") == list(
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
        )
        ia3 = F.default_target_modules(config, "ia3")
        assert ia3 == list(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type])
        feedforward = F.default_feedforward_modules(config)
        assert feedforward == list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
        assert set(feedforward) <= set(ia3)
        with torch.device("meta"):
            model = F.auto_model_class(F.family(config)).from_config(config)
        assert F.missing_target_modules(model, ia3 + ["no_such_layer"]) == ["no_such_layer"], name


def test_unknown_architecture_has_no_default_targets(tiny_dirs):
    config = F.load_config(str(tiny_dirs["llama"]))
    config.model_type = "not_a_model"
    with pytest.raises(StageError, match="peft has no default lora target modules for model type 'not_a_model'"):
        F.default_target_modules(config, "lora")


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", CAUSAL)
def test_batched_beam_generation_equals_one_at_a_time(tiny_dirs, name):
    tokenizer, model = load(tiny_dirs, name)
    model.eval()
    batch = prompts(tokenizer, "causal")
    batched = F.generate_continuations(model, tokenizer, batch, BEAMS)
    single = [F.generate_continuations(model, tokenizer, [p], BEAMS)[0] for p in batch]
    assert batched == single
    eos = tokenizer.eos_token_id
    for prompt, continuation in zip(batch, batched):
        # the continuation is exactly what follows the (unpadded) prompt, cut after its first EOS
        raw = model.generate(input_ids=torch.tensor([prompt]), generation_config=model.generation_config)[0].tolist()
        assert raw[: len(prompt)] == prompt
        after = raw[len(prompt) :]
        assert continuation == (after[: after.index(eos) + 1] if eos in after else after)
        assert 0 < len(continuation) <= BEAMS.max_new_tokens
        assert eos not in continuation[:-1]


@pytest.mark.parametrize("name", CAUSAL)
def test_prompt_tuned_causal_generation_batches_and_matches_a_recomputation(tiny_dirs, name):
    """Virtual tokens go between the left padding and the prompt, so batches equal single prompts;
    and the continuation is what the model says when recomputed from scratch each step (peft
    0.21's own generate drifts from that after a few tokens on transformers 5.24)."""
    tokenizer, model = load(tiny_dirs, name)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=F.task_type("causal"), num_virtual_tokens=5)).eval()
    batch = prompts(tokenizer, "causal")
    batched = F.generate_continuations(peft_model, tokenizer, batch, BEAMS)
    assert batched == [F.generate_continuations(peft_model, tokenizer, [p], BEAMS)[0] for p in batch]

    greedy = GenerationConfig(num_beams=1, max_new_tokens=8, do_sample=False)
    continuation = F.generate_continuations(peft_model, tokenizer, [batch[1]], greedy)[0]
    sequence, recomputed = list(batch[1]), []
    with torch.no_grad():
        for _ in range(len(continuation)):  # no cache: virtual tokens, prompt and what came so far
            embeds = torch.cat(
                [peft_model.get_prompt(batch_size=1), peft_model.word_embeddings(torch.tensor([sequence]))], 1
            )
            token = int(peft_model.get_base_model()(inputs_embeds=embeds).logits[0, -1].argmax())
            recomputed.append(token)
            sequence.append(token)
    assert continuation == recomputed


def test_seq2seq_continuation_drops_the_decoder_start(tiny_dirs):
    tokenizer, model = load(tiny_dirs, "t5")
    model.eval()
    batch = prompts(tokenizer, "seq2seq")
    batched = F.generate_continuations(model, tokenizer, batch, BEAMS)
    assert batched == [F.generate_continuations(model, tokenizer, [p], BEAMS)[0] for p in batch]
    raw = model.generate(input_ids=torch.tensor([batch[0]]), generation_config=model.generation_config)[0].tolist()
    assert raw[0] == model.config.decoder_start_token_id
    assert batched[0] == raw[1 : 1 + len(batched[0])]


def test_bart_forced_bos_survives(tiny_dirs):
    tokenizer, model = load(tiny_dirs, "bart")
    model.eval()
    tokens = F.generation_special_tokens(model)
    assert tokens == {"eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2, "forced_bos_token_id": 0}
    params_only = GenerationConfig(num_beams=2, max_new_tokens=8, do_sample=False)  # as the generate stage builds it
    installed = F.install_generation_config(model, params_only)
    assert installed.forced_bos_token_id == 0 and params_only.forced_bos_token_id is None
    assert F.generation_special_tokens(model) == tokens  # installing again keeps them
    peft_model = get_peft_model(model, LoraConfig(task_type=F.task_type("seq2seq"), r=4, target_modules=["q_proj"]))
    for continuation in F.generate_continuations(peft_model, tokenizer, prompts(tokenizer, "seq2seq"), params_only):
        assert continuation[0] == tokenizer.bos_token_id  # forced <s>, as BART was trained


def test_generation_config_injects_nothing_from_the_checkpoint(tiny_dirs):
    tokenizer, model = load(tiny_dirs, "llama")
    model.generation_config.min_new_tokens = 10  # a checkpoint's decoding choice
    installed = F.install_generation_config(model, GenerationConfig(max_new_tokens=4, do_sample=False))
    assert installed.min_new_tokens is None and model.generation_config is installed
    assert installed.pad_token_id == installed.eos_token_id == tokenizer.eos_token_id  # Llama 3 has no pad


# --------------------------------------------------------------------------- head tying


def test_tied_head_stays_tied_and_separate_head_stays_apart(tiny_dirs, tmp_path):
    for name, tied in (("t5_tied", True), ("t5", False), ("gpt2", True), ("llama", False)):
        tokenizer, model = load(tiny_dirs, name)
        assert head_is_tied(model) is tied, name
        save_model(model, tokenizer, tmp_path / name)
        assert json.loads((tmp_path / name / "config.json").read_text())["tie_word_embeddings"] is tied, name
        again = F.load_model(str(tmp_path / name))
        assert head_is_tied(again) is tied, name
        assert torch.equal(again.get_output_embeddings().weight, model.get_output_embeddings().weight), name


# --------------------------------------------------------------------------- QLoRA


def test_qlora_4bit_trains_saves_and_reloads(tiny_dirs, tmp_path):
    from bitsandbytes.nn import Linear4bit

    tokenizer, model = load(tiny_dirs, "llama128", quantization="4bit")
    F.ensure_pad_token(tokenizer)
    assert F.is_quantized(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model.model.norm.weight.dtype == torch.float32  # unquantized parameters: fp32, as prepared
    model = F.prepare_for_kbit_training(model)
    targets = F.default_target_modules(model.config, "lora")
    peft_model = get_peft_model(model, LoraConfig(task_type=F.task_type("causal"), r=8, target_modules=targets))
    row = F.training_example("causal", text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY), tokenizer)
    batch = F.data_collator("causal", tokenizer, peft_model)([row])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):  # a few steps, so the adapter changes what the model says
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    peft_model.eval()
    batch_prompts = prompts(tokenizer, "causal")
    with torch.no_grad():
        trained_logits = peft_model(input_ids=torch.tensor([batch_prompts[2]])).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=torch.tensor([batch_prompts[2]])).logits
    assert not torch.equal(trained_logits, base_logits)  # the adapter matters
    trained = F.generate_continuations(peft_model, tokenizer, batch_prompts, BEAMS)
    peft_model.save_pretrained(tmp_path / "adapter")

    _, fresh = load(tiny_dirs, "llama128", quantization="4bit")
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=torch.tensor([batch_prompts[2]])).logits, trained_logits)
    assert F.generate_continuations(reloaded, tokenizer, batch_prompts, BEAMS) == trained


def test_8bit_base_trains_lora_and_generates(tiny_dirs):
    from bitsandbytes.nn import Linear8bitLt

    tokenizer, model = load(tiny_dirs, "llama128", quantization="8bit")
    F.ensure_pad_token(tokenizer)
    assert F.is_quantized(model) and isinstance(model.model.layers[0].mlp.down_proj, Linear8bitLt)
    model = F.prepare_for_kbit_training(model)
    targets = F.default_target_modules(model.config, "lora")
    peft_model = get_peft_model(model, LoraConfig(task_type=F.task_type("causal"), r=8, target_modules=targets))
    row = F.training_example("causal", text_ids(tokenizer, PROMPT), text_ids(tokenizer, SUMMARY), tokenizer)
    loss = peft_model(**F.data_collator("causal", tokenizer, peft_model)([row])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.eval()
    batch = prompts(tokenizer, "causal")
    continuations = F.generate_continuations(peft_model, tokenizer, batch, BEAMS)
    assert len(continuations) == 3 and all(0 < len(c) <= BEAMS.max_new_tokens for c in continuations)


# --------------------------------------------------------------------------- ceiling


# Full-batch training of the 64-wide Llama; seeded, so the run is the same each time. LoRA adapts
# every linear layer and the output head (the embedding stays frozen and random), rank 32, no
# dropout: enough capacity to memorize. Measured: full 98.9, LoRA 100 ROUGE-L.
CEILING = {
    "full": dict(steps=200, learning_rate=3.0e-3),
    "lora": dict(steps=200, learning_rate=5.0e-3),
}


@pytest.mark.parametrize("method", CEILING)
def test_memorized_llama_reaches_the_rouge_ceiling_under_default_generation(tiny_dirs, method):
    """A decoder-only model that memorized its data must score ROUGE-L >= 90 under params.yaml's
    generate defaults (4 beams, 128 new tokens, ...): a prompt echoed into the prediction, a
    missing EOS or a padding bug would cost it."""
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    template = params.prepare.prompt_template
    tokenizer, model = load(tiny_dirs, "llama")
    F.ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    if method == "lora":
        lora = LoraConfig(
            task_type=F.task_type("causal"),
            r=32,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=MEMORIZATION_LORA_TARGETS,
        )
        model = get_peft_model(model, lora)
    pairs = [(row["dialogue"], row["summary"]) for row in memorization_rows()]
    prompt_ids = [text_ids(tokenizer, template.replace("{dialogue}", d)) for d, _ in pairs]
    rows = [F.training_example("causal", p, text_ids(tokenizer, s), tokenizer) for p, (_, s) in zip(prompt_ids, pairs)]
    batch = F.data_collator("causal", tokenizer, model)(rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=CEILING[method]["learning_rate"], weight_decay=0.0)
    model.train()
    for _ in range(CEILING[method]["steps"]):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()

    config = generation_config(params.generate)
    assert (config.num_beams, config.max_new_tokens) == (4, 128)  # the defaults, not a test setting
    encoded = [F.encode_prompt("causal", tokenizer, p) for p in prompt_ids]
    continuations = F.generate_continuations(model, tokenizer, encoded, config)
    predictions = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in continuations]
    assert all(c[-1] == tokenizer.eos_token_id for c in continuations)  # it learned to stop
    assert not any("Summary:" in p or "#Person1#: Hi" in p for p in predictions)  # no prompt echoed
    rouge_l = mean_scores(score_corpus(predictions, [[s] for _, s in pairs]))["rougeL"]
    assert rouge_l >= 90, (rouge_l, predictions)
    # and on a model that says something real, batched beams still equal one at a time
    assert continuations == [F.generate_continuations(model, tokenizer, [e], config)[0] for e in encoded]
