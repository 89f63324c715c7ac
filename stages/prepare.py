"""Stage `prepare`: prompt-format and tokenize the raw splits once, for every training stage and generation.

Train and validation become (input_ids, attention_mask, labels) rows. The test split becomes
one row per unique dialogue, because DialogSum's test split repeats each dialogue once per
reference (1500 rows = 500 dialogues x 3) and generating the same summary three times is wasted
work; its human references go to a file of their own (data/prepared/references.jsonl), so that a
reference edit rescores without regenerating anything. Tokenization uses the tokenizer of the
commit the `base` stage pinned, laid out as the model's family needs (stages/family.py: a
decoder-only model reads prompt, summary and EOS in one sequence, with loss on the summary only).
A prompt longer than max_source_length loses the end of its dialogue, never the template's tail
(the "Summary:" cue), and a cut summary keeps its EOS. Counts go to metrics/prepare.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_progress_bars
from transformers import PreTrainedTokenizerBase

from stages import family
from stages.errors import StageError, run_stage
from stages.input_format import FORMAT_FILE, PromptFormat, resolve, summary_ids, text_ids
from stages.jsonio import read_jsonl, write_json, write_jsonl
from stages.modeling import generation_eos_ids, load_tokenizer, read_pin
from stages.params import PrepareParams, load_params

RAW_DIR = Path("data/raw")
BASE_PIN = Path("models/base/pin.json")
PREPARED_DIR = Path("data/prepared")  # train/, validation/, test/ (datasets folders), references.jsonl
REFERENCES_FILE = PREPARED_DIR / "references.jsonl"
# the prompt format (chat template or not, its end-of-turn token): generation stops on that token too
FORMAT_PATH = PREPARED_DIR / FORMAT_FILE
STATS_FILE = Path("metrics/prepare.json")


def format_prompt(template: str, dialogue: str) -> str:
    # str.replace, not str.format: dialogues may contain braces
    return template.replace("{dialogue}", dialogue)


def fit_prompt_text(
    template: str, dialogue: str, tokenizer: PreTrainedTokenizerBase, max_length: int, added: int
) -> tuple[list[int], bool]:
    """The prompt's text ids (no special tokens) within max_length - `added` (the special tokens the
    family adds around a prompt), and whether its dialogue had to be cut.

    A prompt that fits is tokenized whole, exactly as written. One that does not keeps the
    template intact and the longest prefix of the dialogue, cut at a whitespace boundary, that
    fits (a binary search over those boundaries: a few tokenizer calls for the ~2% of DialogSum
    prompts that are too long). Cutting the token list instead would drop the template's tail
    ("Summary:"), the cue a zero-shot model answers to.
    """
    budget = max_length - added
    ids = text_ids(tokenizer, [format_prompt(template, dialogue)])[0]
    if len(ids) <= budget:
        return ids, False
    cuts = [0] + [i for i in range(1, len(dialogue)) if dialogue[i].isspace() and not dialogue[i - 1].isspace()]
    low, high = 0, len(cuts) - 1  # cuts[low] fits (checked below); find the last cut that fits
    best = text_ids(tokenizer, [format_prompt(template, "")])[0]
    if len(best) > budget:
        raise StageError(
            f"prepare.max_source_length: the prompt template alone takes {len(best) + added} tokens, more than "
            f"max_source_length={max_length}; raise it or shorten prepare.prompt_template"
        )
    while low < high:
        middle = (low + high + 1) // 2
        candidate = text_ids(tokenizer, [format_prompt(template, dialogue[: cuts[middle]])])[0]
        if len(candidate) <= budget:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best, True


def fit_prompts_text(
    template: str, dialogues: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, model_family: str
) -> tuple[list[list[int]], int]:
    """fit_prompt_text for each dialogue (one batched call for the prompts that fit); the text ids
    and how many dialogues were cut."""
    tokens = family.special_tokens(model_family, tokenizer)
    added = len(tokens.prompt_prefix) + len(tokens.prompt_suffix)
    ids = text_ids(tokenizer, [format_prompt(template, d) for d in dialogues])
    long = [i for i, x in enumerate(ids) if len(x) > max_length - added]
    for i in long:
        ids[i], _ = fit_prompt_text(template, dialogues[i], tokenizer, max_length, added)
    return ids, len(long)


def fit_prompt(
    template: str,
    dialogue: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    model_family: str = family.SEQ2SEQ,
) -> tuple[list[int], bool]:
    """The ids the model reads for the prompt (its family's special tokens included) within
    max_length, and whether its dialogue had to be cut (see fit_prompt_text)."""
    tokens = family.special_tokens(model_family, tokenizer)
    added = len(tokens.prompt_prefix) + len(tokens.prompt_suffix)
    ids, cut = fit_prompt_text(template, dialogue, tokenizer, max_length, added)
    return family.encode_prompt(model_family, tokenizer, ids), cut


def fit_prompts(
    template: str,
    dialogues: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    model_family: str = family.SEQ2SEQ,
) -> tuple[list[list[int]], int]:
    """fit_prompt for each dialogue; the ids the model reads and how many dialogues were cut."""
    ids, cut = fit_prompts_text(template, dialogues, tokenizer, max_length, model_family)
    return [family.encode_prompt(model_family, tokenizer, x) for x in ids], cut


def group_references(rows: list[dict]) -> list[dict]:
    """One entry per dialogue with every reference summary, grouped by the dialogue text.

    Not by row adjacency (a reordered or shuffled source must give the same groups) and not by
    an id pattern (ids differ between releases). Dialogues keep their first appearance's order
    and id; references keep the source's order.
    """
    groups: dict[str, dict] = {}
    for row in rows:
        group = groups.setdefault(row["dialogue"], {"id": row["id"], "dialogue": row["dialogue"], "references": []})
        group["references"].append(row["summary"])
    return list(groups.values())


def prepare_training_split(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    params: PrepareParams,
    model_family: str = family.SEQ2SEQ,
    gap: str = "",
) -> tuple[Dataset, dict[str, int]]:
    """(input_ids, attention_mask, labels) rows as the family lays them out (stages/family.py
    training_example): seq2seq labels = summary + EOS; causal input = prompt, summary, EOS with
    the prompt's labels -100. The dialogue is cut to fit max_source_length; the summary is cut
    to max_target_length with its EOS kept. `gap`: the whitespace the prompt template's end gave
    up to the summary (stages/input_format.py), which a decoder-only summary starts with."""
    prompts, dialogue_cut = fit_prompts_text(
        params.prompt_template, [r["dialogue"] for r in rows], tokenizer, params.max_source_length, model_family
    )
    summaries = summary_ids(
        params.prompt_template, gap, tokenizer, [r["summary"] for r in rows], family.continues_prompt(model_family)
    )
    budget = family.target_text_budget(model_family, tokenizer, params.max_target_length)
    examples = [
        family.training_example(model_family, prompt, summary, tokenizer, params.max_target_length)
        for prompt, summary in zip(prompts, summaries)
    ]
    dataset = Dataset.from_dict({key: [e[key] for e in examples] for key in ("input_ids", "attention_mask", "labels")})
    return dataset, {"dialogue_cut": dialogue_cut, "target_truncated": sum(len(x) > budget for x in summaries)}


def prepare_test_split(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, params: PrepareParams, model_family: str = family.SEQ2SEQ
) -> tuple[Dataset, list[dict], dict[str, int]]:
    """The generation inputs (id, dialogue, input_ids: no references) and the references apart."""
    dialogues = group_references(rows)
    input_ids, dialogue_cut = fit_prompts(
        params.prompt_template, [d["dialogue"] for d in dialogues], tokenizer, params.max_source_length, model_family
    )
    dataset = Dataset.from_dict(
        {"id": [d["id"] for d in dialogues], "dialogue": [d["dialogue"] for d in dialogues], "input_ids": input_ids}
    )
    references = [{"id": d["id"], "references": d["references"]} for d in dialogues]
    return (
        dataset,
        references,
        {
            "dialogue_cut": dialogue_cut,
            "dialogues": len(dialogues),
            "references": sum(len(d["references"]) for d in dialogues),
        },
    )


def prompt_format(params: PrepareParams, tokenizer: PreTrainedTokenizerBase, base, config) -> PromptFormat:
    """The prompt format for the pinned base (stages/input_format.py): its EOS ids decide the chat rule."""
    return resolve(params, tokenizer, generation_eos_ids(base.name, base.revision, config))


def main() -> None:
    params = load_params()
    disable_progress_bars()  # DVC logs stdout; a bar per split is noise
    base = read_pin(BASE_PIN, params.model)  # the commit the base stage pinned: its tokenizer
    tokenizer = load_tokenizer(base.name, base.revision)
    config = family.load_config(base.name, base.revision)
    model_family = family.family(config)  # inputs and labels differ by family
    layout = prompt_format(params.prepare, tokenizer, base, config)
    prepare = dataclasses.replace(params.prepare, prompt_template=layout.template)
    raw = {split: read_jsonl(RAW_DIR / f"{split}.jsonl") for split in ("train", "validation", "test")}
    train, train_stats = prepare_training_split(raw["train"], tokenizer, prepare, model_family, layout.gap)
    validation, validation_stats = prepare_training_split(
        raw["validation"], tokenizer, prepare, model_family, layout.gap
    )
    # validation by generation (stages/validation.py) scores against the reference text itself, not labels
    # decoded back (cut at max_target_length, characters the tokenizer lacks lost), row-aligned by construction
    validation = validation.add_column("id", [r["id"] for r in raw["validation"]])
    validation = validation.add_column("summary", [r["summary"] for r in raw["validation"]])
    test, references, test_stats = prepare_test_split(raw["test"], tokenizer, prepare, model_family)
    # each split in its own folder, so training depends on train/ and validation/ only and
    # generation on test/ only (dvc.yaml): an edit to one split reruns only its readers
    DatasetDict(train=train, validation=validation, test=test).save_to_disk(str(PREPARED_DIR))
    write_jsonl(references, REFERENCES_FILE)
    write_json({**layout.record(), "prompt_template": layout.template}, FORMAT_PATH)  # the exact template too
    stats = {
        f"{split}_{key}": value
        for split, split_stats in (("train", train_stats), ("validation", validation_stats), ("test", test_stats))
        for key, value in split_stats.items()
    }
    write_json({**stats, **layout.record(), "model_family": model_family}, STATS_FILE)
    print(json.dumps(stats))


if __name__ == "__main__":
    run_stage(main)
