"""The summarize command, run as users run it: every input kind, base/full/LoRA models, errors, progress."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from stages.errors import StageError
from stages.generate import generate_summaries
from stages.params import load_params
from stages.prepare import fit_prompts
from summarize import read_input
from tests.conftest import REPO, write_jsonl

# over 255 characters without a slash, so it cannot even be a file name, and over
# prepare.max_source_length tokens below, so it is truncated
LONG_DIALOGUE = "\n".join(
    f"#Person{i % 2 + 1}#: Could we move the meeting about the budget to {i} o'clock?" for i in range(12)
)
DIALOGUES = [
    "#Person1#: Hello, I would like to book a table.\n#Person2#: Sure, for how many people?",
    "#Person1#: Is the train to the station late?\n#Person2#: Yes, by ten minutes.",
    "#Person1#: Thanks for the dinner!\n#Person2#: You are welcome, see you tomorrow.",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory with the repo's params.yaml pointed at the tiny model, with small generation."""
    root = tmp_path_factory.mktemp("summarize")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params["prepare"]["max_source_length"] = 128
    # fp32: the in-process reference below runs the model in fp32 too
    params["generate"].update(num_beams=2, max_new_tokens=6, batch_size=2, precision="fp32")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_summarize(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "summarize", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )


def expected_summaries(model, tokenizer, dialogues: list[str], params_file: Path) -> list[str]:
    """What the generate stage gives for these dialogues, in this process."""
    params = load_params(params_file)
    input_ids, _ = fit_prompts(params.prepare.prompt_template, dialogues, tokenizer, params.prepare.max_source_length)
    return generate_summaries(model.eval(), tokenizer, input_ids, params.generate).summaries


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)


def test_literal_text_with_base_model_prints_one_summary_per_line(workdir, base_model):
    result = run_summarize("--model", "base", LONG_DIALOGUE, DIALOGUES[0], cwd=workdir)
    assert result.returncode == 0, result.stderr
    tokenizer, model = base_model
    assert result.stdout.splitlines() == expected_summaries(
        model, tokenizer, [LONG_DIALOGUE, DIALOGUES[0]], workdir / "params.yaml"
    )
    assert "1 of 2 dialogue(s) exceed prepare.max_source_length=128" in result.stderr


def test_txt_jsonl_and_stdin_to_output_file_keep_ids_and_show_progress(workdir, tiny_model_dir, base_model):
    (workdir / "one.txt").write_text(LONG_DIALOGUE, encoding="utf-8")
    write_jsonl(
        workdir / "many.jsonl",
        [{"id": "d1", "dialogue": DIALOGUES[0]}, {"dialogue": DIALOGUES[1]}, {"id": 7, "dialogue": DIALOGUES[2]}],
    )
    result = run_summarize(
        "--model",
        str(tiny_model_dir),
        "one.txt",
        "many.jsonl",
        "-",
        "--output",
        "out/s.jsonl",
        cwd=workdir,
        stdin=DIALOGUES[1],
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (workdir / "out" / "s.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["one.txt", "d1", "many.jsonl:2", 7, "stdin"]
    tokenizer, model = base_model
    dialogues = [LONG_DIALOGUE, *DIALOGUES, DIALOGUES[1]]
    assert [r["summary"] for r in rows] == expected_summaries(model, tokenizer, dialogues, workdir / "params.yaml")
    assert result.stdout == ""
    # batch_size 2: one progress line per batch, on stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("summarized ")]
    assert progress == ["summarized 2/5 dialogues", "summarized 4/5 dialogues", "summarized 5/5 dialogues"]


def test_lora_adapter_is_applied_to_the_base_named_in_its_config(workdir, tiny_model_dir, base_model, tmp_path):
    tokenizer, _ = base_model
    peft_model = get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir),
        LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, target_modules=["q", "v"]),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): give it weights that change outputs
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(tiny_model_dir)})
    )

    result = run_summarize("--model", str(adapter_dir), *DIALOGUES, cwd=workdir)
    assert result.returncode == 0, result.stderr
    # the adapter unmerged, as the generate stage applies it (in fp32 a merge would give the same)
    adapted = expected_summaries(peft_model.eval(), tokenizer, DIALOGUES, workdir / "params.yaml")
    assert result.stdout.splitlines() == adapted
    assert adapted != expected_summaries(base_model[1], tokenizer, DIALOGUES, workdir / "params.yaml")

    # with the pin and quantization.json the train stage writes beside every adapter (stages/training.py
    # finish_run), the pinned base is used, not the config's
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "nowhere/moved-base"})
    )
    pin = {"name": str(tiny_model_dir), "revision": "main", "resolved_revision": "sha256:test"}
    (adapter_dir / "pin.json").write_text(json.dumps(pin))
    (adapter_dir / "quantization.json").write_text(json.dumps({"quantization": "none"}))
    pinned = run_summarize("--model", str(adapter_dir), *DIALOGUES, cwd=workdir)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.splitlines() == adapted


def test_missing_model_directory_is_one_error_line_and_exit_2(workdir):
    result = run_summarize("--model", "models/missing", "hello", cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model directory 'models/missing' not found; pass a trained model (models/full/seed42, models/lora/seed42) "
        "or --model base"
    )


@pytest.mark.parametrize(
    "arg, message",
    [
        ("missing.txt", "missing.txt: no such file"),
        ("notes.md", "notes.md: unsupported file type '.md'"),
        ("folder", "folder: is a directory"),
        ("bad.jsonl", "bad.jsonl:2: expected an object with a string 'dialogue' field"),
    ],
)
def test_inputs_that_are_not_dialogues_are_refused(tmp_path, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)
    Path("notes.md").write_text("# notes")
    Path("folder").mkdir()
    Path("bad.jsonl").write_text('{"dialogue": "hi"}\n{"text": "no dialogue field"}\n')
    with pytest.raises(StageError, match=message):
        read_input(arg, 1, io.StringIO())


def test_text_that_is_not_a_file_is_the_dialogue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [d.text for d in read_input(LONG_DIALOGUE, 1, io.StringIO())] == [LONG_DIALOGUE]
    assert [(d.id, d.text) for d in read_input("see you at 9.txt", 2, io.StringIO())] == [("arg2", "see you at 9.txt")]
    assert [(d.id, d.text) for d in read_input("-", 3, io.StringIO("from stdin"))] == [("stdin", "from stdin")]
