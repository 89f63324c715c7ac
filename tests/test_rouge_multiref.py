"""Tests for stages/rouge_multiref: the project's multi-reference ROUGE as an `evaluate` module.

A notebook (`evaluate.load` by path), a Trainer (`make_compute_metrics`) and the evaluate stage
must give the numbers `stages.rouge` gives today, exactly (==), offline, from any directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.rouge import mean_scores, score_corpus
from tests.conftest import REPO

MODULE_DIR = REPO / "stages" / "rouge_multiref"

# 20 DialogSum-like dialogues with 3 references each. Predictions are single-spaced lines (so a
# whitespace tokenizer round-trips them exactly); first references too (they serve as labels).
_SUBJECTS = ["#Person1#", "Amanda", "Mr. Smith", "The customer", "Jerry", "#Person2#", "Ms. Wang"]
_ACTIONS = [
    ("books a table for four at 7 p.m.", "reserves a table for dinner tonight"),
    ("asks about the price of the flat, which is $1,200 a month.", "wants to rent the flat"),
    ("can't find the keys; they're in the car!", "lost the keys"),
    ("will meet #Person2# at the station tomorrow morning.", "arranges a meeting"),
    ("complains that the soup is cold and orders a new one", "is unhappy with the food"),
    ("explains the 3-step refund process (2-3 days).", "gets a refund"),
    ("invites Jerry to the party on Friday. Jerry agrees.", "throws a party"),
]
_EDGE = [
    ("", ["Nobody says anything.", "Silence.", "#Person1# and #Person2# say nothing."]),
    ("...", ["#Person1# hesitates...", "They pause.", "Nothing happens."]),
    ("?!", ["#Person1# is surprised?!", "A surprise!\nEveryone laughs.", "What?!"]),
    (
        "Amanda baked cookies. She will bring Jerry some tomorrow!",
        [
            "Amanda baked cookies. She will bring Jerry some tomorrow!",  # identical: 100 on every type
            "Amanda made cookies for Jerry.",
            "Jerry will get cookies from Amanda.",
        ],
    ),
    ("the the the the the", ["The cat sat on the mat.", "the end", "THE THE"]),
    (
        "Café owner Zoë serves crème brûlée to #Person2#.",
        ["Zoë, the café owner, serves dessert.", "#Person2# orders crème brûlée.\nZoë serves it.", "A café visit."],
    ),
]


def _sample() -> tuple[list[str], list[list[str]]]:
    predictions, references = [], []
    for i in range(20 - len(_EDGE)):
        subject, (action, gist) = _SUBJECTS[i % len(_SUBJECTS)], _ACTIONS[i % len(_ACTIONS)]
        other = _SUBJECTS[(i + 3) % len(_SUBJECTS)]
        predictions.append(f"{subject} {action}" if i % 3 else f"{subject} {gist}.")
        references.append(
            [
                f"{subject} {action}",
                f"{other} talks with {subject}.\n{subject} {gist}.",  # already split into sentences
                f"{subject.upper()} {gist} -- then leaves!! Dialogue {i}.",
            ]
        )
    for prediction, refs in _EDGE:
        predictions.append(prediction)
        references.append(refs)
    return predictions, references


PREDICTIONS, REFERENCES = _sample()


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    """The module as a notebook loads it, with evaluate's caches in a temp dir and no network."""
    import evaluate

    cache = tmp_path_factory.mktemp("hf")
    sys_path = list(sys.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate.config, "HF_MODULES_CACHE", cache / "modules")
        mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        _block_network(mp)
        loaded = evaluate.load(str(MODULE_DIR), cache_dir=str(cache / "metrics"), keep_in_memory=True)
    assert (cache / "modules" / "evaluate_modules" / "metrics" / "rouge_multiref").is_dir()
    yield loaded
    # evaluate appended the temp modules cache to sys.path and imported `evaluate_modules` from
    # it: undo both, so a later evaluate.load in this process uses its own cache
    sys.path[:] = sys_path
    for name in [n for n in sys.modules if n == "evaluate_modules" or n.startswith("evaluate_modules.")]:
        del sys.modules[name]


def test_scorer_travels_with_the_module_as_a_symlink_to_stages_rouge() -> None:
    # evaluate copies relative imports next to the script in its cache: this is how the one
    # implementation in stages/rouge.py reaches a module loaded from outside the repo
    link = MODULE_DIR / "rouge.py"
    assert link.is_symlink(), f"{link} must be a symlink to ../rouge.py (git: core.symlinks=true)"
    assert link.resolve() == (REPO / "stages" / "rouge.py").resolve()


_NOTEBOOK = """
import importlib.util, json, socket, sys
def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
socket.socket.connect = socket.socket.connect_ex = refuse
assert importlib.util.find_spec("stages") is None, "the repo must not be importable here"
import evaluate
module_dir, metrics_dir = sys.argv[1], sys.argv[2]
predictions, references = json.load(sys.stdin)
rouge = evaluate.load(module_dir, cache_dir=metrics_dir)  # default: arrow cache files, as users get
scores = rouge.compute(predictions=predictions, references=references)
assert not any(n == "stages" or n.startswith("stages.") for n in sys.modules)
print(json.dumps({"scores": scores, "modules_cache": str(evaluate.config.HF_MODULES_CACHE)}))
"""


def test_loads_offline_by_path_from_another_directory(tmp_path: Path) -> None:
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "XDG_")) and k != "PYTHONPATH"
    }
    env.update(
        HOME=str(tmp_path / "home"),
        HF_HOME=str(tmp_path / "hf"),
        HF_EVALUATE_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    result = subprocess.run(
        [sys.executable, "-c", _NOTEBOOK, str(MODULE_DIR), str(tmp_path / "metrics")],
        input=json.dumps([PREDICTIONS, REFERENCES]),
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # JSON round-trips floats exactly (repr), so == is the real test
    assert out["scores"] == mean_scores(score_corpus(PREDICTIONS, REFERENCES))
    assert Path(out["modules_cache"]) == tmp_path / "hf" / "modules"
    copies = list((tmp_path / "hf" / "modules").rglob("rouge.py"))
    assert len(copies) == 1 and not copies[0].is_symlink()
    assert copies[0].read_bytes() == (REPO / "stages" / "rouge.py").read_bytes()
    assert not list((tmp_path / "metrics").rglob("*.arrow"))  # its temp files cleaned up
    assert {p.name for p in tmp_path.iterdir()} <= {"notebooks", "home", "hf", "metrics"}


def test_numbers_equal_todays_scorer_exactly(metric) -> None:
    expected = mean_scores(score_corpus(PREDICTIONS, REFERENCES))
    scores = metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert scores == expected
    assert list(scores) == list(expected)  # same keys, same order
    assert scores["rouge1"] > scores["rouge1_mean_ref"] > 0  # a real multi-reference sample


def test_per_dialogue_matches_score_corpus(metric) -> None:
    per_dialogue = score_corpus(PREDICTIONS, REFERENCES)
    scores = metric.compute(predictions=PREDICTIONS, references=REFERENCES, per_dialogue=True)
    assert scores.pop("per_dialogue") == per_dialogue
    assert scores == mean_scores(per_dialogue)


def test_single_string_references_are_one_reference_each(metric) -> None:
    firsts = [refs[0] for refs in REFERENCES]
    assert metric.compute(predictions=PREDICTIONS, references=firsts) == mean_scores(
        score_corpus(PREDICTIONS, [[r] for r in firsts])
    )


def test_empty_reference_list_is_refused(metric) -> None:
    with pytest.raises(ValueError, match="dialogue 1 has an empty reference list"):
        metric.compute(predictions=["a", "b"], references=[["a"], []])


def _word_tokenizer(texts: list[str]):
    """A real fast tokenizer that maps each whitespace-separated word to one id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in sorted({w for t in texts for w in t.split()}):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def _padded(rows: list[list[int]], width: int, fill: int) -> np.ndarray:
    return np.array([row + [fill] * (width - len(row)) for row in rows], dtype=np.int64)


def test_trainer_compute_metrics_gives_the_same_numbers(metric) -> None:
    from transformers import EvalPrediction

    firsts = [refs[0] for refs in REFERENCES]
    tokenizer = _word_tokenizer(PREDICTIONS + firsts)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PREDICTIONS]
    # generate(): decoder start (pad) + tokens + </s>, padded per batch with pad; the Trainer then
    # concatenates batches padding with -100. Two batches of 10:
    generated = [[tokenizer.pad_token_id] + row + [tokenizer.eos_token_id] for row in ids]
    width = max(map(len, generated)) + 3
    batches = [
        _padded(generated[s : s + 10], max(map(len, generated[s : s + 10])), tokenizer.pad_token_id) for s in (0, 10)
    ]
    predictions = np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=-100) for b in batches])
    labels = _padded(
        [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in firsts], width, -100
    )
    assert (predictions == -100).any() and (predictions == tokenizer.pad_token_id).any()
    eval_prediction = EvalPrediction(predictions=predictions, label_ids=labels)

    with_references = metric.make_compute_metrics(tokenizer, REFERENCES)(eval_prediction)
    assert with_references == mean_scores(score_corpus(PREDICTIONS, REFERENCES))
    with_labels = metric.make_compute_metrics(tokenizer)(eval_prediction)
    assert with_labels == mean_scores(score_corpus(PREDICTIONS, [[r] for r in firsts]))

    with pytest.raises(ValueError, match="predict_with_generate"):  # logits, not generated ids
        metric.make_compute_metrics(tokenizer)(EvalPrediction(predictions=np.zeros((2, 3, 5)), label_ids=labels[:2]))
    with pytest.raises(ValueError, match="got 20 predictions but 19 reference lists"):
        metric.make_compute_metrics(tokenizer, REFERENCES[:-1])(eval_prediction)
