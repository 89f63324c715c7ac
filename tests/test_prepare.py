"""Prompt formatting, tokenization with truncation counts, and grouping of test references."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from stages.params import PrepareParams
from stages.prepare import format_prompt, group_references, prepare_test_split, prepare_training_split, tokenize
from tests.conftest import dialogsum_rows

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompt_formatting_is_literal():
    assert format_prompt(TEMPLATE, "#Person1#: Hi {there}") == (
        "Summarize the following conversation.\n\n#Person1#: Hi {there}\n\nSummary: "
    )


def test_truncation_keeps_eos_and_is_counted(tokenizer):
    texts = ["hello", "hello " * 50]
    ids, truncated = tokenize(texts, tokenizer, max_length=10)
    assert truncated == 1
    assert len(ids[1]) == 10 and ids[1][-1] == tokenizer.eos_token_id
    assert ids[0] == tokenizer("hello")["input_ids"]  # short inputs are untouched


def test_training_split_has_labels_and_stats(tokenizer):
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=16, max_target_length=64)
    dataset, stats = prepare_training_split(dialogsum_rows("train", 3), tokenizer, params)
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    assert stats == {"source_truncated": 3, "target_truncated": 0}
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


def test_single_reference_test_split(tokenizer):
    params = PrepareParams(prompt_template=TEMPLATE, max_source_length=512, max_target_length=64)
    dataset, stats = prepare_test_split(dialogsum_rows("test", 4), tokenizer, params)
    assert stats == {"source_truncated": 0, "dialogues": 4, "references": 4}
    assert dataset["references"] == [[f"Person1 books table {i} for dinner (version 0)."] for i in range(4)]
