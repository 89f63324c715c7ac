"""Prompt formatting, truncation that keeps the prompt's cue, and grouping of test references."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from stages.errors import StageError
from stages.params import PrepareParams
from stages.prepare import (
    fit_prompt,
    fit_prompts,
    format_prompt,
    group_references,
    prepare_test_split,
    prepare_training_split,
)
from tests.conftest import DIALOGSUM, FLAN_SMALL, dialogsum_rows, require_shared

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompt_formatting_is_literal():
    assert format_prompt(TEMPLATE, "#Person1#: Hi {there}") == (
        "Summarize the following conversation.\n\n#Person1#: Hi {there}\n\nSummary: "
    )


def test_truncation_keeps_eos_and_is_counted(tokenizer):
    rows = [{"dialogue": "#Person1#: Hi.", "summary": text} for text in ("hello", "hello " * 50)]
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=512, max_target_length=10)
    dataset, stats = prepare_training_split(rows, tokenizer, params)
    assert stats["target_truncated"] == 1
    labels = dataset["labels"]
    assert len(labels[1]) == 10 and labels[1][-1] == tokenizer.eos_token_id
    assert labels[0] == tokenizer("hello")["input_ids"]  # short summaries are untouched


def test_training_split_has_labels_and_stats(tokenizer):
    tail = tokenizer("\n\nSummary: ")["input_ids"][-4:]  # the template's last tokens, then </s>
    full = len(tokenizer(format_prompt(TEMPLATE, dialogsum_rows("train", 1)[0]["dialogue"]))["input_ids"])
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=full - 5, max_target_length=64)
    dataset, stats = prepare_training_split(dialogsum_rows("train", 3), tokenizer, params)
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    assert stats == {"dialogue_cut": 3, "target_truncated": 0}
    for ids in dataset["input_ids"]:  # the dialogue lost its end, the prompt kept its cue
        assert len(ids) <= full - 5 and ids[-4:] == tail
        assert tokenizer.decode(ids, skip_special_tokens=True).endswith("Summary:")
    assert (
        tokenizer.decode(dataset[0]["labels"], skip_special_tokens=True)
        == "Person1 books table 0 for dinner (version 0)."
    )


def test_references_group_by_dialogue_text_not_id():
    rows = dialogsum_rows("test", 2, references=3)
    rows[4]["id"] = "renamed"  # grouping must not depend on the id pattern
    groups = group_references(rows)
    assert [g["id"] for g in groups] == ["test_0_1", "test_1_1"]
    assert groups[1]["references"] == [f"Person1 books table 1 for dinner (version {r})." for r in range(3)]


def test_references_group_by_dialogue_not_by_adjacency():
    rows = dialogsum_rows("test", 3, references=3)
    shuffled = random.Random(0).sample(rows, len(rows))  # rows of a dialogue no longer all adjacent
    groups = {g["dialogue"]: sorted(g["references"]) for g in group_references(shuffled)}
    assert groups == {g["dialogue"]: sorted(g["references"]) for g in group_references(rows)}
    assert len(groups) == 3 and all(len(refs) == 3 for refs in groups.values())


def test_single_reference_test_split(tokenizer):
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=512, max_target_length=64)
    dataset, references, stats = prepare_test_split(dialogsum_rows("test", 4), tokenizer, params)
    assert stats == {"dialogue_cut": 0, "dialogues": 4, "references": 4}
    assert dataset.column_names == ["id", "dialogue", "input_ids"]  # generation never sees references
    assert [r["references"] for r in references] == [
        [f"Person1 books table {i} for dinner (version 0)."] for i in range(4)
    ]
    assert [r["id"] for r in references] == dataset["id"]


def test_a_template_longer_than_the_limit_is_one_clear_error(tokenizer):
    with pytest.raises(StageError) as info:
        fit_prompt(TEMPLATE, "#Person1#: Hi.", tokenizer, max_length=4)
    template_tokens = len(tokenizer(format_prompt(TEMPLATE, ""))["input_ids"])
    assert str(info.value) == (
        f"prepare.max_source_length: the prompt template alone takes {template_tokens} tokens, more than "
        "max_source_length=4; raise it or shorten prepare.prompt_template"
    )


def test_prompts_that_fit_are_tokenized_whole(tokenizer):
    dialogues = [r["dialogue"] for r in dialogsum_rows("train", 3)]
    ids, cut = fit_prompts(TEMPLATE, dialogues, tokenizer, max_length=512)
    assert cut == 0 and ids == tokenizer([format_prompt(TEMPLATE, d) for d in dialogues])["input_ids"]


def test_real_test_split_groups_and_keeps_every_cue():
    """The real DialogSum test split with the FLAN-T5 tokenizer: 500 dialogues x 3 references, and
    the 13 prompts over 512 tokens lose the end of their dialogue, not "Summary:"."""
    require_shared()
    rows = [json.loads(line) for line in (DIALOGSUM / "test.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(FLAN_SMALL)
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=512, max_target_length=128)
    dataset, references, stats = prepare_test_split(rows, tokenizer, params)
    assert stats == {"dialogue_cut": 13, "dialogues": 500, "references": 1500}
    assert all(len(r["references"]) == 3 for r in references)
    tail = tokenizer(format_prompt(TEMPLATE, ""))["input_ids"][-3:]  # "▁Summary", ":" and </s>
    assert all(len(ids) <= 512 and ids[-3:] == tail for ids in dataset["input_ids"])
    reordered = list(reversed(rows))
    regrouped = {g["dialogue"]: sorted(g["references"]) for g in group_references(reordered)}
    assert regrouped == {g["dialogue"]: sorted(g["references"]) for g in group_references(rows)}


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """make_tiny_model.py's Llama-style tokenizer: adds BOS, has no pad token."""
    from tests.conftest import make_tiny_model

    return AutoTokenizer.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("llama") / "m", "--family", "llama"))


def test_causal_rows_cut_the_dialogue_and_keep_the_summary_eos(llama_tokenizer):
    tokenizer = llama_tokenizer
    rows = dialogsum_rows("train", 3)
    rows[2]["summary"] = "booked " * 40  # longer than max_target_length: cut, its EOS kept
    prompt = tokenizer(format_prompt(TEMPLATE, rows[0]["dialogue"]), add_special_tokens=False)["input_ids"]
    max_source = len(prompt) - 5  # every dialogue must lose its end
    longest = max(len(tokenizer(r["summary"], add_special_tokens=False)["input_ids"]) for r in rows[:2])
    max_target = longest + 1  # the short summaries and their EOS fit exactly
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=max_source, max_target_length=max_target)
    dataset, stats = prepare_training_split(rows, tokenizer, params, "causal")
    assert stats == {"dialogue_cut": 3, "target_truncated": 1}
    for row in dataset:
        ids, labels = row["input_ids"], row["labels"]
        prompt_length = labels.index(next(x for x in labels if x != -100))
        assert ids[0] == tokenizer.bos_token_id and prompt_length <= max_source  # BOS the tokenizer's way
        assert tokenizer.decode(ids[:prompt_length], skip_special_tokens=True).rstrip().endswith("Summary:")
        assert labels[:prompt_length] == [-100] * prompt_length  # no loss on the prompt
        assert labels[prompt_length:] == ids[prompt_length:] and ids[-1] == tokenizer.eos_token_id
        assert len(ids) - prompt_length <= max_target
    test, _, _ = prepare_test_split(dialogsum_rows("test", 2), tokenizer, params, "causal")
    for ids in test["input_ids"]:  # generation prompts: BOS, no EOS (the text has not ended)
        assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
