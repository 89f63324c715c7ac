"""Stage `prepare`: prompt-format and tokenize the raw splits once, for every training stage and generation.

Train and validation become (input_ids, attention_mask, labels) rows. The test split becomes
one row per unique dialogue with all its human references, because DialogSum's test split
repeats each dialogue once per reference (1500 rows = 500 dialogues x 3) and generating the
same summary three times is wasted work. Truncation counts go to metrics/prepare.json.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_progress_bars
from transformers import PreTrainedTokenizerBase

from stages.errors import run_stage
from stages.modeling import load_tokenizer
from stages.params import PrepareParams, load_params

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
STATS_FILE = Path("metrics/prepare.json")


def read_snapshot(path: Path) -> list[dict]:
    # the data stage wrote and validated this file; one JSON object per line
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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


def group_references(rows: list[dict]) -> list[dict]:
    """One entry per dialogue with every reference summary: adjacent rows sharing the dialogue text.

    Groups by the text itself, not by an id pattern (ids differ between releases).
    """
    return [
        {"id": group[0]["id"], "dialogue": text, "references": [r["summary"] for r in group]}
        for text, group in ((text, list(rows)) for text, rows in itertools.groupby(rows, key=lambda r: r["dialogue"]))
    ]


def prepare_training_split(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, params: PrepareParams
) -> tuple[Dataset, dict[str, int]]:
    prompts = [format_prompt(params.prompt_template, r["dialogue"]) for r in rows]
    input_ids, source_truncated = tokenize(prompts, tokenizer, params.max_source_length)
    labels, target_truncated = tokenize([r["summary"] for r in rows], tokenizer, params.max_target_length)
    dataset = Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(x) for x in input_ids],
            "labels": labels,
        }
    )
    return dataset, {"source_truncated": source_truncated, "target_truncated": target_truncated}


def prepare_test_split(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, params: PrepareParams
) -> tuple[Dataset, dict[str, int]]:
    dialogues = group_references(rows)
    prompts = [format_prompt(params.prompt_template, d["dialogue"]) for d in dialogues]
    input_ids, source_truncated = tokenize(prompts, tokenizer, params.max_source_length)
    dataset = Dataset.from_dict(
        {
            "id": [d["id"] for d in dialogues],
            "dialogue": [d["dialogue"] for d in dialogues],
            "references": [d["references"] for d in dialogues],
            "input_ids": input_ids,
        }
    )
    return dataset, {
        "source_truncated": source_truncated,
        "dialogues": len(dialogues),
        "references": sum(len(d["references"]) for d in dialogues),
    }


def main() -> None:
    params = load_params()
    disable_progress_bars()  # DVC logs stdout; a bar per split is noise
    tokenizer = load_tokenizer(params.model.name, params.model.revision)
    raw = {split: read_snapshot(RAW_DIR / f"{split}.jsonl") for split in ("train", "validation", "test")}
    train, train_stats = prepare_training_split(raw["train"], tokenizer, params.prepare)
    validation, validation_stats = prepare_training_split(raw["validation"], tokenizer, params.prepare)
    # validation by generation (stages/validation.py) scores against the reference text itself, not labels
    # decoded back (cut at max_target_length, characters the tokenizer lacks lost), row-aligned by construction
    validation = validation.add_column("id", [r["id"] for r in raw["validation"]])
    validation = validation.add_column("summary", [r["summary"] for r in raw["validation"]])
    test, test_stats = prepare_test_split(raw["test"], tokenizer, params.prepare)
    DatasetDict(train=train, validation=validation, test=test).save_to_disk(str(PREPARED_DIR))
    stats = {
        f"{split}_{key}": value
        for split, split_stats in (("train", train_stats), ("validation", validation_stats), ("test", test_stats))
        for key, value in split_stats.items()
    }
    STATS_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATS_FILE.write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    run_stage(main)
