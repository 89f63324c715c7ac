#!/usr/bin/env python
"""Write a small DialogSum-shaped sample data set: train, validation and test JSONL files.

For the offline smoke run and the tests that need data of the right shape but not the real
DialogSum: dialogues of "#Person1#: ..." / "#Person2#: ..." turns, one per line, with third-person
summaries, drawn from the same generated corpus make_tiny_model.py trains its tokenizers on
(scripts/dialogue_corpus.py), so a tiny model's tokenizer covers the sample's words. As in
DialogSum, train and validation have one summary per dialogue and test repeats each dialogue once
per reference (several references, scored by multi-reference ROUGE).

Usage::

    python scripts/make_sample_data.py OUT_DIR [--train 60] [--validation 20] [--test 10] [--references 3]

then point the pipeline at it: `data.source=OUT_DIR`. The output is a pure function of the
arguments. Its ROUGE says nothing about any real model: the sample checks the plumbing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the shared dialogue corpus
from dialogue_corpus import dialogue, summary, tagged  # noqa: E402

SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}  # each split its own dialogues


def split_rows(split: str, dialogues: int, references: int, seed: int) -> list[dict]:
    """`dialogues` distinct dialogues, each repeated once per reference (1 for train and validation)."""
    rng = random.Random(seed * 1000 + SPLIT_SEEDS[split])
    rows, seen = [], set()
    while len(seen) < dialogues:
        turns, a, b = dialogue(rng)
        text = tagged(turns, "\n")
        if text in seen:  # a repeat would merge two dialogues' references
            continue
        seen.add(text)
        number = len(seen)
        for r in range(references):
            rows.append(
                {
                    "id": f"{split}_{number}_{r + 1}" if references > 1 else f"{split}_{number}",
                    "dialogue": text,
                    "summary": summary(rng, a, b),
                    "topic": "sample",
                }
            )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write train.jsonl, validation.jsonl and test.jsonl into")
    parser.add_argument("--train", type=int, default=60, help="train dialogues (default %(default)s)")
    parser.add_argument("--validation", type=int, default=20, help="validation dialogues (default %(default)s)")
    parser.add_argument("--test", type=int, default=10, help="test dialogues (default %(default)s)")
    parser.add_argument(
        "--references", type=int, default=3, help="summaries per test dialogue (DialogSum: 3; default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the draw (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("train", "validation", "test", "references"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": (args.train, 1), "validation": (args.validation, 1), "test": (args.test, args.references)}
    for split, (dialogues, references) in sizes.items():
        rows = split_rows(split, dialogues, references, args.seed)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(
        f"wrote {args.train} train, {args.validation} validation and {args.test} test dialogues "
        f"(x{args.references} references) to {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
