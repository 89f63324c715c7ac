"""Evaluation: the lead baseline, and batched generation equal to one-at-a-time generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from stages.evaluate import generate_summaries, lead_summary
from stages.params import EvaluateParams


def test_lead_summary_takes_first_turns_without_speaker_tags():
    dialogue = "#Person1#: Hello there.\n#Person2#: Hi! How are you?\n\n#Person1#: Fine."
    assert lead_summary(dialogue, 2) == "Hello there. Hi! How are you?"
    assert lead_summary(dialogue, 10) == "Hello there. Hi! How are you? Fine."


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_sorted_generation_matches_per_example(tiny_model_dir, num_beams):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval()
    texts = ["hello", "how are you today my friend", "see you at the station tomorrow morning at nine",
             "thanks", "I would like to book a table for two people please"]
    input_ids = tokenizer(texts)["input_ids"]
    params = EvaluateParams(batch_size=4, num_beams=num_beams, max_new_tokens=8, length_penalty=1.0,
                            no_repeat_ngram_size=0, bootstrap_resamples=100)
    batched = generate_summaries(model, tokenizer, input_ids, params)
    one_by_one = [generate_summaries(model, tokenizer, [ids], EvaluateParams(**{**params.__dict__, "batch_size": 1}))
                  for ids in input_ids]
    assert batched[0] == [s[0][0] for s in one_by_one]  # same summaries, in input order
    assert batched[1] == [s[1][0] for s in one_by_one]  # same generated lengths
    assert all(0 < n <= 8 for n in batched[1])
