"""The prompt as real checkpoints read it (stages/input_format.py): the word boundary on byte-level
BPE tokenizers, the chat-template rule for chat-tuned models only, the end-of-turn stop and the
pinned date. The tokenizers are make_tiny_model.py's byte-level BPE ones (GPT-2's and Llama 3's
special tokens, no pad token), given the chat templates and special tokens the real checkpoints
publish in their tokenizer_config.json (Qwen2.5's ChatML, Llama 3.1/3.2 Instruct's headers)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json

import pytest
import torch
from transformers import AutoTokenizer

from stages import family
from stages.input_format import end_of_turn, read_stop_ids, resolve, stop_ids
from stages.params import PrepareParams, load_params
from stages.prepare import FORMAT_PATH, prepare_test_split, prepare_training_split
from tests.conftest import FLAN_SMALL, REPO, dialogsum_rows, load_script, make_tiny_model, require_shared

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "

# Qwen2.5 (base and Instruct ship the same template; trimmed of its tool-calling branches)
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3.2 Instruct (trimmed of tools): today's date through strftime_now unless date_string is given
LLAMA3_INSTRUCT = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
    "{%- endif %}{%- endif %}"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}{{- "Today Date: " + date_string + "\\n\\n" }}'
    '{{- "<|eot_id|>" }}'
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def byte_level():
    """{family: tokenizer} for make_tiny_model.py's llama and gpt2 tokenizers (trained in-process)."""
    script = load_script("make_tiny_model")
    return {name: script.train_byte_level_tokenizer(name) for name in ("llama", "gpt2")}


def qwen_like(byte_level):
    """A Qwen2.5-style tokenizer: GPT-2's byte-level BPE, <|endoftext|>, ChatML's specials and template."""
    tokenizer = copy.deepcopy(byte_level["gpt2"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def llama_instruct_like(byte_level):
    tokenizer = copy.deepcopy(byte_level["llama"])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.chat_template = LLAMA3_INSTRUCT
    return tokenizer


def params(**changes) -> PrepareParams:
    base = dict(prompt_template=TEMPLATE, max_source_length=512, max_target_length=64, chat_template="auto")
    return PrepareParams(**{**base, **changes})


def prepared(tokenizer, prepare: PrepareParams, eos_ids: set[int], rows: int = 6):
    """The training and test splits prepare builds, and the format it used."""
    layout = resolve(prepare, tokenizer, eos_ids)
    resolved = PrepareParams(**{**prepare.__dict__, "prompt_template": layout.template})
    train, _ = prepare_training_split(dialogsum_rows("train", rows), tokenizer, resolved, "causal", layout.gap)
    test, _, _ = prepare_test_split(dialogsum_rows("test", rows, 3), tokenizer, resolved, "causal")
    return layout, train, test


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_no_prepared_prompt_ends_in_a_whitespace_only_token(byte_level, name):
    tokenizer = byte_level[name]
    as_written = tokenizer(TEMPLATE.replace("{dialogue}", "Hi."), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(as_written[-1:]) == " "  # the fault: the template's space alone
    layout, train, test = prepared(tokenizer, params(), {tokenizer.eos_token_id})
    assert layout.gap == " " and layout.template == TEMPLATE.rstrip()
    for ids in test["input_ids"]:
        assert tokenizer.decode(ids[-1:]).strip(), tokenizer.convert_ids_to_tokens(ids[-3:])
    rows = dialogsum_rows("train", 6)
    for row, ids, labels in zip(rows, train["input_ids"], train["labels"]):
        start = next(i for i, label in enumerate(labels) if label != -100)
        assert tokenizer.decode(ids[start - 1 : start]).strip()  # the prompt's last token is text
        # prompt and summary are tokenized as the one natural text they make
        text = TEMPLATE.replace("{dialogue}", row["dialogue"]) + row["summary"]
        natural = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[len(ids) - 1 - len(natural) : -1] == natural and ids[-1] == tokenizer.eos_token_id
    # a summary whose first word the vocabulary knows with its space takes the space as one token
    word_first = [{**row, "summary": "Tom " + row["summary"]} for row in rows]
    resolved = PrepareParams(**{**params().__dict__, "prompt_template": layout.template})
    train, _ = prepare_training_split(word_first, tokenizer, resolved, "causal", layout.gap)
    for labels in train["labels"]:
        first = next(label for label in labels if label != -100)
        assert tokenizer.convert_ids_to_tokens(first) == "ĠTom"


def test_seq2seq_sentencepiece_prompts_are_unchanged():
    """FLAN-T5's SentencePiece tokenizer drops a trailing space: the template stays as written."""
    require_shared()
    tokenizer = AutoTokenizer.from_pretrained(FLAN_SMALL)
    layout = resolve(params(), tokenizer, {tokenizer.eos_token_id})
    assert (layout.template, layout.gap, layout.format) == (TEMPLATE, "", "prompt_template")


def test_auto_wraps_only_a_chat_tuned_model(byte_level):
    tokenizer = qwen_like(byte_level)
    im_end, endoftext = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn(tokenizer, "26 Jul 2024") == ("<|im_end|>", im_end)
    # Qwen2.5 base: ChatML template, but generation_config's eos is <|endoftext|> only
    base = resolve(params(), tokenizer, {endoftext})
    assert base.format == "prompt_template" and "<|im_start|>" not in base.template
    assert base.end_of_turn == "<|im_end|>" and stop_ids(base.record()) == []  # recorded, not used
    # Qwen2.5 Instruct: eos [<|im_end|>, <|endoftext|>]
    instruct = resolve(params(), tokenizer, {im_end, endoftext})
    assert instruct.format == "chat_template" and instruct.template.endswith("<|im_start|>assistant\n")
    assert stop_ids(instruct.record()) == [im_end]
    assert instruct.gap == ""  # ChatML's "\n" is its own token: the cue stays as the model was trained
    # always wraps the base model too, and generation then stops on its end of turn; none never wraps
    always = resolve(params(chat_template="always"), tokenizer, {endoftext})
    assert always.format == "chat_template" and stop_ids(always.record()) == [im_end]
    assert resolve(params(chat_template="none"), tokenizer, {im_end}).format == "prompt_template"
    # no chat template at all: as written, whatever the setting
    assert resolve(params(chat_template="always"), byte_level["gpt2"], {endoftext}).format == "prompt_template"


def test_a_wrapped_llama_prompt_has_one_bos_and_ends_in_the_assistant_header(byte_level):
    tokenizer = llama_instruct_like(byte_level)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    layout, _, test = prepared(tokenizer, params(), {tokenizer.eos_token_id, eot}, rows=2)
    assert layout.format == "chat_template" and layout.end_of_turn == "<|eot_id|>"
    ids = test["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    text = tokenizer.decode(ids)
    assert "user<|end_header_id|>\n\nSummarize the following" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_template_date_is_pinned_not_today(byte_level):
    tokenizer = llama_instruct_like(byte_level)
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    today = datetime.date.today().strftime("%d %b %Y")
    pinned = resolve(params(chat_date="26 Jul 2024"), tokenizer, eos)
    assert "Today Date: 26 Jul 2024" in pinned.template and (today == "26 Jul 2024" or today not in pinned.template)
    other = resolve(params(chat_date="01 Jan 2030"), tokenizer, eos)
    assert "Today Date: 01 Jan 2030" in other.template  # the param decides, so a rerun renders the same
    assert pinned.record()["chat_date"] == "26 Jul 2024"


def test_the_recorded_format_gives_generation_its_stop(tmp_path, byte_level):
    tokenizer = qwen_like(byte_level)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    layout = resolve(params(), tokenizer, {im_end})
    (tmp_path / FORMAT_PATH.name).write_text(json.dumps(layout.record()))
    assert read_stop_ids(tmp_path) == [im_end]
    assert layout.record()["chat_end_of_turn"] == "<|im_end|>" and layout.record()["chat_date"] == "26 Jul 2024"
    assert read_stop_ids(tmp_path / "missing") == []


def test_generation_stops_on_the_end_of_turn_token(tmp_path):
    """A tiny Llama generates greedily; made a stop token, its first generated token ends the summary."""
    from stages import generate
    from stages.generate import generate_summaries

    model_dir = make_tiny_model(tmp_path / "llama", "--family", "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = family.load_model(str(model_dir), dtype=torch.float32).eval()
    prompt = tokenizer("Summarize: #Person1#: Hello there.\n\nSummary:")["input_ids"]
    # the committed generate params, made small: greedy, 6 new tokens, one dialogue per batch
    committed = load_params(REPO / "params.yaml").generate
    decoding = dataclasses.replace(committed, batch_size=1, precision="fp32", num_beams=1, max_new_tokens=6)
    free = generate_summaries(model, tokenizer, [prompt], decoding)
    continuation = family.generate_continuations(model, tokenizer, [prompt], generate.generation_config(decoding))[0]
    assert free.lengths == [6] and free.hit_max == [True]  # a random model never says EOS in 6 tokens
    stopped = generate_summaries(model, tokenizer, [prompt], decoding, stop_ids=[continuation[0]])
    assert stopped.lengths == [1] and stopped.hit_max == [False]  # ended on the stop, not at the limit
