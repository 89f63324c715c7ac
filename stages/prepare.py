"""Stage `prepare`: prompt-format and tokenize the raw splits once, for every training stage and generation.

Train and validation become (input_ids, attention_mask, labels) rows. The test split becomes
one row per unique dialogue, because DialogSum's test split repeats each dialogue once per
reference (1500 rows = 500 dialogues x 3) and generating the same summary three times is wasted
work; its human references go to a file of their own (data/prepared/references.jsonl), so that a
reference edit rescores without regenerating anything. Tokenization uses the tokenizer of the
commit the `base` stage pinned. A prompt longer than max_source_length loses the end of its
dialogue, never the template's tail (the "Summary:" cue). Counts go to metrics/prepare.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_progress_bars
from transformers import PreTrainedTokenizerBase

from stages.errors import StageError, run_stage
from stages.jsonio import read_jsonl, write_json, write_jsonl
from stages.modeling import load_tokenizer, read_pin
from stages.params import PrepareParams, load_params

RAW_DIR = Path("data/raw")
BASE_PIN = Path("models/base/pin.json")
PREPARED_DIR = Path("data/prepared")  # train/, validation/, test/ (datasets folders), references.jsonl
REFERENCES_FILE = PREPARED_DIR / "references.jsonl"
STATS_FILE = Path("metrics/prepare.json")


def format_prompt(template: str, dialogue: str) -> str:
    # str.replace, not str.format: dialogues may contain braces
    return template.replace("{dialogue}", dialogue)


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list[list[int]], int]:
    """Token ids truncated to max_length (keeping the final </s>), and how many were truncated.

    Tokenizing without truncation first is what lets us count the truncated rows.
    """
    # verbose=False: the over-length warning is expected here, we count those rows below
    ids = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    truncated = sum(len(x) > max_length for x in ids)
    return [x if len(x) <= max_length else x[: max_length - 1] + [eos] for x in ids], truncated


def fit_prompt(
    template: str, dialogue: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[int], bool]:
    """The prompt's token ids within max_length, and whether its dialogue had to be cut.

    A prompt that fits is tokenized whole, exactly as written. One that does not keeps the
    template intact and the longest prefix of the dialogue, cut at a whitespace boundary, that
    fits (a binary search over those boundaries: a few tokenizer calls for the ~2% of DialogSum
    prompts that are too long). Cutting the token list instead would drop the template's tail
    ("Summary:"), the cue a zero-shot model answers to.
    """
    ids = tokenizer(format_prompt(template, dialogue), verbose=False)["input_ids"]
    if len(ids) <= max_length:
        return ids, False
    cuts = [0] + [i for i in range(1, len(dialogue)) if dialogue[i].isspace() and not dialogue[i - 1].isspace()]
    low, high = 0, len(cuts) - 1  # cuts[low] fits (checked below); find the last cut that fits
    best = tokenizer(format_prompt(template, ""), verbose=False)["input_ids"]
    if len(best) > max_length:
        raise StageError(
            f"prepare.max_source_length: the prompt template alone takes {len(best)} tokens, more than "
            f"max_source_length={max_length}; raise it or shorten prepare.prompt_template"
        )
    while low < high:
        middle = (low + high + 1) // 2
        candidate = tokenizer(format_prompt(template, dialogue[: cuts[middle]]), verbose=False)["input_ids"]
        if len(candidate) <= max_length:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best, True


def fit_prompts(
    template: str, dialogues: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[list[int]], int]:
    """fit_prompt for each dialogue (one batched call for the prompts that fit); the ids and how
    many dialogues were cut."""
    ids = tokenizer([format_prompt(template, d) for d in dialogues], verbose=False)["input_ids"]
    long = [i for i, x in enumerate(ids) if len(x) > max_length]
    for i in long:
        ids[i], _ = fit_prompt(template, dialogues[i], tokenizer, max_length)
    return ids, len(long)


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
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, params: PrepareParams
) -> tuple[Dataset, dict[str, int]]:
    input_ids, dialogue_cut = fit_prompts(
        params.prompt_template, [r["dialogue"] for r in rows], tokenizer, params.max_source_length
    )
    labels, target_truncated = tokenize([r["summary"] for r in rows], tokenizer, params.max_target_length)
    dataset = Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(x) for x in input_ids],
            "labels": labels,
        }
    )
    return dataset, {"dialogue_cut": dialogue_cut, "target_truncated": target_truncated}


def prepare_test_split(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, params: PrepareParams
) -> tuple[Dataset, list[dict], dict[str, int]]:
    """The generation inputs (id, dialogue, input_ids: no references) and the references apart."""
    dialogues = group_references(rows)
    input_ids, dialogue_cut = fit_prompts(
        params.prompt_template, [d["dialogue"] for d in dialogues], tokenizer, params.max_source_length
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


def main() -> None:
    params = load_params()
    disable_progress_bars()  # DVC logs stdout; a bar per split is noise
    base = read_pin(BASE_PIN, params.model)  # the commit the base stage pinned: its tokenizer
    tokenizer = load_tokenizer(base.name, base.revision)
    raw = {split: read_jsonl(RAW_DIR / f"{split}.jsonl") for split in ("train", "validation", "test")}
    train, train_stats = prepare_training_split(raw["train"], tokenizer, params.prepare)
    validation, validation_stats = prepare_training_split(raw["validation"], tokenizer, params.prepare)
    # validation by generation (stages/validation.py) scores against the reference text itself, not labels
    # decoded back (cut at max_target_length, characters the tokenizer lacks lost), row-aligned by construction
    validation = validation.add_column("id", [r["id"] for r in raw["validation"]])
    validation = validation.add_column("summary", [r["summary"] for r in raw["validation"]])
    test, references, test_stats = prepare_test_split(raw["test"], tokenizer, params.prepare)
    # each split in its own folder, so training depends on train/ and validation/ only and
    # generation on test/ only (dvc.yaml): an edit to one split reruns only its readers
    DatasetDict(train=train, validation=validation, test=test).save_to_disk(str(PREPARED_DIR))
    write_jsonl(references, REFERENCES_FILE)
    stats = {
        f"{split}_{key}": value
        for split, split_stats in (("train", train_stats), ("validation", validation_stats), ("test", test_stats))
        for key, value in split_stats.items()
    }
    write_json(stats, STATS_FILE)
    print(json.dumps(stats))


if __name__ == "__main__":
    run_stage(main)
