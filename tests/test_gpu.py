"""The CUDA code paths, on a real card: `pytest -m gpu` (benchmarks/gpu.sh runs it on a GPU machine).

Skipped without CUDA, so CI (CPU only) collects and skips every test here.

(a) precision `auto` picks native bf16 on compute capability >= 8.0, and generation loads the model
    in bf16 on the card;
(b) a LoRA adapter is evaluated unmerged in bf16 on the card, exactly as peft's own PeftModel;
(c) a real CUDA out-of-memory during generation (the card filled up to a margin first) is retried
    with halved batches and gives the same summaries;
(d) training through the stages' Trainer recipe (stages/recipe.py) on the card: bf16 autocast, TF32, fused AdamW, loss falls;
(e) the offline tiny-model `dvc repro` end to end in a temp repo, training on the card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

from stages import generate as gen
from stages.modeling import native_bf16, use_bf16
from stages.params import ModelParams, load_params
from tests.conftest import DIALOGSUM, FLAN_SMALL, REPO, SHARED, dialogsum_rows, make_tiny_model, require_shared

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu.sh on a GPU machine)"
    ),
]

FLAN_BASE = SHARED / "models" / "flan-t5-base-config"
CUDA = torch.device("cuda")


def generation_params(**overrides):
    """The committed `generate` params with overrides."""
    return dataclasses.replace(load_params(REPO / "params.yaml").generate, **overrides)


def cards_native_bf16() -> bool:
    return torch.cuda.get_device_capability(CUDA)[0] >= 8


def tf32_matmuls() -> bool:
    """Whether fp32 matmuls run as TF32 (torch >= 2.9 API; reading the legacy flag after the new
    API was used raises, and transformers uses the new one)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


@contextlib.contextmanager
def fp32_matmul_precision(mode: str | None = None):
    """Set fp32 matmuls to `mode` ("ieee" or "tf32") for the block, if given; restore on exit."""
    if hasattr(torch.backends, "fp32_precision"):
        backends = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn]
        before = [b.fp32_precision for b in backends]
        if mode is not None:
            torch.backends.cuda.matmul.fp32_precision = mode
        try:
            yield
        finally:
            for backend, value in zip(backends, before):
                backend.fp32_precision = value
    else:  # torch < 2.9
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        if mode is not None:
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------- (a) precision auto


def summarize_with_stage_code(gen, model_dir: Path, test, params):
    """The stage's own load and generation: device, dtype from params.precision, load, generate."""
    model_params = ModelParams(name=str(model_dir), revision="main")
    tokenizer, model, _ = gen.load_for_generation(Path(model_dir), model_params, params.precision)  # a full model
    generated, _ = gen.timed_generation(model, tokenizer, test, params, "test")
    return generated


def test_auto_precision_picks_native_bf16_and_generation_runs_bf16_on_the_card(tiny_model_dir, monkeypatch):
    from datasets import Dataset

    native = cards_native_bf16()
    assert native_bf16(CUDA) is native
    assert use_bf16("auto", CUDA) is native  # compute capability >= 8.0 (Ampere and newer): bf16, else fp32
    assert use_bf16("fp32", CUDA) is False

    seen = []
    real = gen.generate_summaries

    def spy(model, *args, **kwargs):
        seen.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_summaries", spy)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["hello there", "see you at the station tomorrow morning", "a table for two, please"]
    test = Dataset.from_dict({"id": ["a", "b", "c"], "dialogue": texts, "input_ids": tokenizer(texts)["input_ids"]})
    params = generation_params(precision="auto", batch_size=2, num_beams=2, max_new_tokens=6)
    summaries, lengths, _, _ = summarize_with_stage_code(gen, tiny_model_dir, test, params)
    assert seen == [(torch.bfloat16 if native else torch.float32, "cuda")]
    assert len(summaries) == 3 and all(0 < n <= 6 for n in lengths)


# --------------------------------------------------------------------------- (b) LoRA unmerged, bf16


def load_lora_with_stage_code(gen, adapter: Path, base_dir: Path, tmp_path: Path, monkeypatch):
    """The stage's load_variant() for a LoRA adapter on `base_dir`, loaded in bf16."""
    model_params = ModelParams(name=str(base_dir), revision="main")
    pin = adapter / "pin.json"  # the base model's pin, as train@lora writes it beside the adapter
    pin.write_text(json.dumps({"name": str(base_dir), "revision": "main", "resolved_revision": "sha256:test"}))
    return gen.load_variant(adapter, model_params, torch.bfloat16)


def test_lora_is_evaluated_unmerged_in_bf16_on_the_card(tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    from tests.test_evaluate import tiny_lora

    adapter = tiny_lora(tiny_model_dir, tmp_path / "lora")
    tokenizer, evaluated = load_lora_with_stage_code(gen, adapter, tiny_model_dir, tmp_path, monkeypatch)
    evaluated.to(CUDA).eval()  # as the stage does after loading

    def peft_model():
        base = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        return PeftModel.from_pretrained(base, str(adapter)).to(CUDA).eval()

    reference = peft_model()
    merged = peft_model().merge_and_unload()  # merged on the card, in bf16
    lora_dtypes = {p.dtype for n, p in evaluated.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}  # the adapter stays fp32 on a bf16 base, as in training
    assert next(evaluated.get_base_model().parameters()).dtype == torch.bfloat16

    batch = tokenizer(["how are you today my friend", "see you at the station"], return_tensors="pt", padding=True).to(
        CUDA
    )
    labels = tokenizer(["fine thanks", "see you"], return_tensors="pt", padding=True)["input_ids"].to(CUDA)
    with torch.no_grad():
        got = evaluated(**batch, labels=labels).logits.float()
        want = reference(**batch, labels=labels).logits.float()
        merged_logits = merged(**batch, labels=labels).logits.float()
    scale = want.abs().max()
    merge_error = (merged_logits - want).abs().max()
    assert merge_error > 1e-3 * scale  # the premise: a bf16 merge moves the logits on the card too
    assert (got - want).abs().max() <= min(1e-4 * scale, 0.1 * merge_error)  # evaluated = the unmerged adapter

    texts = ["how are you today my friend", "see you at the station", "thanks a lot"]
    params = generation_params(batch_size=2, precision="bf16", num_beams=2, max_new_tokens=8)
    input_ids = tokenizer(texts)["input_ids"]
    assert gen.generate_summaries(evaluated, tokenizer, input_ids, params) == gen.generate_summaries(
        reference, tokenizer, input_ids, params
    )


# --------------------------------------------------------------------------- (c) a real out-of-memory

OOM_DIALOGUES = 32  # the first batch: 32 dialogues x 4 beams x 512 source tokens
OOM_SOURCE_TOKENS = 512
# Memory left free while generating. flan-t5-base in fp32 caches cross-attention keys and values of
# about 150 MiB per dialogue at 4 beams x 512 tokens, so batch 32 (~5 GiB with the encoder's
# attention scores) cannot fit, and batch 1 or 2 (~0.2-0.4 GiB) fits with room for the allocator.
OOM_MARGIN_BYTES = 2**30


@contextlib.contextmanager
def card_filled(margin: int):
    """Hold all of the card's free memory but `margin` bytes; yield the bytes left; always release."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held: list[torch.Tensor] = []
    try:
        while True:
            free = torch.cuda.mem_get_info(CUDA)[0]
            size = min(2**30, free - margin) // 2**21 * 2**21  # 1 GiB pieces, whole 2 MiB pages
            if size <= 0:
                break
            try:
                held.append(torch.empty(size, dtype=torch.uint8, device=CUDA))
            except torch.cuda.OutOfMemoryError:
                break
        yield torch.cuda.mem_get_info(CUDA)[0]
    finally:
        held.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def long_inputs(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` inputs of exactly `length` tokens (DialogSum test dialogues run together), so no
    batch has padding and every batch size computes the same shapes per dialogue."""
    dialogues = list(
        dict.fromkeys(
            json.loads(line)["dialogue"] for line in (DIALOGSUM / "test.jsonl").read_text(encoding="utf-8").splitlines()
        )
    )
    inputs = []
    for i in range(count):
        tokens, j = [], i
        while len(tokens) < length:
            tokens += tokenizer(dialogues[j % len(dialogues)], add_special_tokens=False)["input_ids"]
            j += 1
        inputs.append(tokens[: length - 1] + [tokenizer.eos_token_id])
    return inputs


def test_real_out_of_memory_in_generation_is_retried_with_halved_batches(capsys):
    require_shared()

    tokenizer = AutoTokenizer.from_pretrained(FLAN_BASE)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(FLAN_BASE)).to(CUDA).eval()
    input_ids = long_inputs(tokenizer, OOM_DIALOGUES, OOM_SOURCE_TOKENS)
    # fp32 with IEEE matmuls: summaries then do not hinge on bf16/TF32 rounding, which differs
    # between batch shapes; this test is about the retry, test (a) covers bf16 generation
    params = generation_params(
        batch_size=OOM_DIALOGUES, precision="fp32", num_beams=4, max_new_tokens=8, min_new_tokens=8
    )
    with fp32_matmul_precision("ieee"):
        one_by_one = gen.generate_summaries(model, tokenizer, input_ids, dataclasses.replace(params, batch_size=1))
        capsys.readouterr()
        with card_filled(OOM_MARGIN_BYTES) as left:
            pressed = gen.generate_summaries(model, tokenizer, input_ids, params)
        err = capsys.readouterr().err
        retries = [int(n) for n in re.findall(r"CUDA out of memory: retrying with \w+\.batch_size=(\d+)", err)]
        print(f"{left / 2**20:.0f} MiB left on the card: batch {params.batch_size} retried as {retries}")
        assert retries, (
            f"batch {params.batch_size} x 4 beams x {OOM_SOURCE_TOKENS} tokens fit in "
            f"{left / 2**20:.0f} MiB: no out-of-memory happened, the premise failed"
        )
        assert retries == [params.batch_size >> k for k in range(1, len(retries) + 1)]  # halved each time
        unpressed = gen.generate_summaries(
            model, tokenizer, input_ids, dataclasses.replace(params, batch_size=retries[-1])
        )
    assert pressed == unpressed  # the retry lost, repeated and reordered nothing
    assert pressed.batch_size == retries[-1]  # recorded as generation_batch_size
    assert pressed.summaries == one_by_one.summaries, (
        "summaries differ from batch 1 (fp32 batch variance on this card, not the retry)"
    )


# --------------------------------------------------------------------------- (d) training on the card


def tokenized_rows(tokenizer, count: int):
    from datasets import Dataset

    rows = dialogsum_rows("train", count)
    source = tokenizer([r["dialogue"] for r in rows])["input_ids"]
    labels = tokenizer([r["summary"] for r in rows])["input_ids"]
    return Dataset.from_dict({"input_ids": source, "attention_mask": [[1] * len(x) for x in source], "labels": labels})


def train_briefly(model_dir: Path, out_dir: Path, device: torch.device):
    """params.yaml's recipe of the full method through stages.recipe, shortened: 8 epochs of 16 rows."""
    from stages.recipe import build_trainer, training_arguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    data = tokenized_rows(tokenizer, 16)
    recipe = dataclasses.replace(
        load_params(REPO / "params.yaml").recipe("full"),
        epochs=8,
        learning_rate=3.0e-3,
        batch_size=4,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=10**6,
        precision="auto",
        select_by="last",  # no validation by generation here: the recipe's numerics are under test
    )
    args = training_arguments(recipe, seed=0, output_dir=out_dir, device=device, section="full")
    tf32 = tf32_matmuls() if device.type == "cuda" else None
    trainer = build_trainer(model, tokenizer, data, data, args)
    activations = set()  # dtype of an inner layer's output during training: bf16 under autocast
    hook = (
        model.get_encoder()
        .block[0]
        .layer[0]
        .SelfAttention.q.register_forward_hook(lambda module, inputs, output: activations.add(output.dtype))
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    return trainer, args, tf32, activations


def test_training_on_the_card_runs_bf16_tf32_and_fused_adamw(tiny_model_dir, tmp_path):
    from stages.ledger import training_costs

    native = cards_native_bf16()
    with fp32_matmul_precision():  # training_arguments turns TF32 on for the whole process: undo it after
        trainer, args, tf32, activations = train_briefly(tiny_model_dir, tmp_path / "out", CUDA)
    assert args.bf16 is native and args.tf32 is (True if native else None)
    assert tf32 is native  # fp32 matmuls ran as TF32 (Ampere and newer)
    assert activations == ({torch.bfloat16} if native else {torch.float32})  # autocast: bf16 compute...
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # ...on fp32 master weights
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused") is True
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 32 and all(loss == loss for loss in losses)  # one per step, no NaN
    assert losses[-1] < 0.5 * losses[0], losses
    assert training_costs(trainer)["peak_gpu_memory_mb"] > 0


# --------------------------------------------------------------------------- (e) dvc repro on the card

SKIPPED_WHEN_COPYING = {".git", ".gpu", ".venv", ".pytest_cache", "__pycache__"}


def copy_project(src: Path, dest: Path) -> Path:
    """The working tree as it is copied to a GPU machine: tracked and untracked-not-ignored files
    (from git where it works; else every file but git's, caches and carried folders)."""
    names = None
    if shutil.which("git"):
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src, capture_output=True
        )
        if listed.returncode == 0:
            names = [n for n in listed.stdout.decode().split("\0") if n]
    if names is None:
        names = [
            str(p.relative_to(src))
            for p in src.rglob("*")
            if p.is_file()
            and not SKIPPED_WHEN_COPYING & set(p.relative_to(src).parts)
            and p.relative_to(src).parts[:2] not in {(".dvc", "cache"), (".dvc", "tmp")}
        ]
    for name in names:
        if (src / name).is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)
    return dest


def without_git(repo: Path) -> None:
    """DVC without a git repo (a machine without git): core.no_scm."""
    config = repo / ".dvc" / "config"
    text = config.read_text() if config.is_file() else ""
    config.parent.mkdir(exist_ok=True)
    config.write_text(
        text.replace("[core]", "[core]\n    no_scm = true", 1)
        if "[core]" in text
        else text + "[core]\n    no_scm = true\n"
    )


def test_offline_tiny_pipeline_reproduces_end_to_end_on_the_card(tmp_path_factory):
    from tests.test_pipeline import git_commit, run, smoke_params, stages_run

    require_shared()
    root = tmp_path_factory.mktemp("gpu-pipeline")
    model_dir = make_tiny_model(root / "tiny", "--tokenizer", str(FLAN_SMALL))
    repo = copy_project(REPO, root / "repo")
    params_file = repo / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(smoke_params(yaml.safe_load(params_file.read_text()), model_dir), sort_keys=False)
    )
    if shutil.which("git"):
        run(["git", "init", "-q"], repo)
        git_commit(repo, "baseline")
    else:
        without_git(repo)

    output = run(["dvc", "repro"], repo)
    listed = subprocess.run(
        ["dvc", "stage", "list", "--name-only"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        check=True,
    ).stdout
    assert stages_run(output) == set(listed.split())  # every declared stage ran
    for method in ("full", "lora"):  # trained on the card: CUDA's peak memory, not the CPU's RSS
        costs = json.loads((repo / "metrics" / "timing" / "train" / method / "seed42.json").read_text())
        assert costs.get("peak_gpu_memory_mb", 0) > 0, costs
    assert "up to date" in run(["dvc", "status"], repo)
