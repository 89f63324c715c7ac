"""Shared fixtures: the repo root, ../shared (required in CI, skipped elsewhere), a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

# One torch thread for every test and the stage processes they start (they inherit it): on tiny models
# thread wake-ups cost more than a second core saves. tests/test_peft_methods.py -k loss_falls took 25 s
# with one thread, 63-75 s with two, on a 2-core, 24 GiB CPU machine (2026-11-27, another job running).
# Set before anything imports torch (conftest is imported first); an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DIALOGSUM = SHARED / "data" / "dialogsum"
FLAN_SMALL = SHARED / "models" / "flan-t5-small-config"


def require_shared() -> Path:
    """../shared, or fail in CI (where it must exist) / skip elsewhere with the reason."""
    if (DIALOGSUM / "test.jsonl").is_file() and (FLAN_SMALL / "tokenizer.json").is_file():
        return SHARED
    message = f"{SHARED} (real DialogSum + FLAN-T5 tokenizer) not found"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must provide ../shared beside the project root")
    pytest.skip(f"{message}; this test runs where ../shared exists (CI has it)")


def copy_project(dest: Path) -> Path:
    """The project as a fresh clone holds it (git-tracked files only), in `dest`: where stages and DVC
    commands run, so nothing a run writes touches the repository."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def run_bare_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m <args>` in `cwd` with nothing but the project on the path (no venv variables, no Hub)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py as a module (scripts/ is not a package), to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(f"scripts.{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def make_tiny_model(out_dir: Path, *args: str) -> Path:
    """Run scripts/make_tiny_model.py as users do; return the model directory."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(out_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"make_tiny_model.py failed:\n{result.stdout}\n{result.stderr}"
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random FLAN-T5-family model with its own trained tokenizer (no ../shared needed)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dialogsum_rows(split: str, count: int, references: int = 1) -> list[dict]:
    """Small DialogSum-shaped rows; with references > 1 each dialogue repeats like the test split."""
    rows = []
    for i in range(count):
        dialogue = (
            f"#Person1#: Hello, I would like to book table {i} for dinner.\n"
            f"#Person2#: Sure, for how many people?\n#Person1#: {i % 5 + 2} people, at seven ({split})."
        )
        for r in range(references):
            rows.append(
                {
                    "id": f"{split}_{i}_{r + 1}" if references > 1 else f"{split}_{i}",
                    "dialogue": dialogue,
                    "summary": f"Person1 books table {i} for dinner (version {r}).",
                    "topic": "booking",
                }
            )
    return rows


def tiny_train_params(**changes):
    """A training recipe for the tiny model in tests: fp32, no warm-up, decay, grouping or retry,
    a log line every step, one process, the last weights kept; `changes` sets what a test varies."""
    from stages.method_params import TrainParams

    fixed = dict(
        epochs=1,
        learning_rate=1.0e-3,
        batch_size=2,
        gradient_accumulation_steps=1,
        eval_batch_size=2,
        weight_decay=0.0,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_grad_norm=1.0,
        precision="fp32",
        group_by_length=False,
        logging_steps=1,
        save_steps=1000,
        auto_find_batch_size=False,
        dataloader_workers=0,
        processes=1,
        select_by="last",  # no validation metric needed unless a test attaches validation by generation
        patience=0,
    )
    return TrainParams(**{**fixed, **changes})


@pytest.fixture()
def raw() -> dict:
    """The committed params.yaml as plain data, for a test to break one key of."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def problems(raw: dict) -> str:
    """The one error load_params would raise for `raw`, as text."""
    from stages.params import parse_params
    from stages.schema import ParamsError

    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


# Memorizing 8 short DialogSum-style pairs: the decoder-only ceiling tests (tests/test_family.py in
# process, tests/test_ceiling.py through the real stages). LoRA on every linear layer and the output
# head, rank 32, no dropout: enough capacity for a 64-wide Llama to memorize them.
MEMORIZATION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def memorization_rows() -> list[dict]:
    """8 short dialogue -> summary rows in DialogSum's shape (speaker tags, names, times)."""
    names = [("Tom", "Mary"), ("John", "Linda"), ("David", "Susan"), ("Mike", "Anna")]
    places = ["the bank", "the airport", "the library", "the hotel"]
    rows = []
    for i in range(8):
        a, b = names[i % 4]
        place = places[(i // 2) % 4]
        rows.append(
            {
                "id": f"memorized_{i}",
                "dialogue": f"#Person1#: Hi {b}, are you going to {place}?\n#Person2#: Yes, {a}. See you at {i + 2} o'clock.",
                "summary": f"#Person2# tells #Person1# they will meet at {place} at {i + 2}.",
                "topic": "meeting",
            }
        )
    return rows
