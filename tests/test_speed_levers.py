"""The speed and memory levers (docs/performance.md), on CPU with tiny models of both families (T5 and Llama):

- gradient checkpointing (train.gradient_checkpointing, or a method's own) gives the same loss and gradients for full
  fine-tuning and every PEFT method, and really recomputes each layer in backward;
- a PEFT method's frozen base loads in bf16 under bf16 training (the device's bf16 mocked), its
  adapter weights stay fp32, a step trains only them, and the saved adapter reloads through the
  generate stage's load path to the same model; full fine-tuning and fp32 runs are unchanged;
- model.attn_implementation: eager and sdpa give the same logits, auto resolves to sdpa;
- train.pad_to_multiple_of buckets batch lengths without changing the loss (padding is -100);
- train.compile trains through the Trainer's torch.compile (inductor).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from benchmarks.gpu_parts import plan  # the stages' own Plan per method, as the GPU script trains
from stages import family, methods, modeling, training
from stages.generate import load_variant
from stages.ledger import training_metrics
from stages.modeling import load_model, load_tokenizer, save_adapter
from stages.params import ModelParams, load_params
from stages.recipe import build_trainer, token_mean_loss, training_arguments
from tests.conftest import REPO, make_tiny_model, tiny_train_params

METHODS = ("full", "lora", "ia3", "prompt")
PARAMS = load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama") / "model", "--family", "llama")


@pytest.fixture(params=["t5", "llama"])
def model_dir(request, tiny_model_dir, tiny_llama_dir) -> Path:
    return tiny_model_dir if request.param == "t5" else tiny_llama_dir


def rows(model_dir: Path, count: int) -> Dataset:
    """Prepared training rows of the model's family, summaries of different lengths."""
    tokenizer = load_tokenizer(str(model_dir))
    model_family = family.family(family.load_config(str(model_dir)))
    examples = [
        family.training_example(
            model_family,
            tokenizer(
                f"#Person1#: I need table {i} for dinner. #Person2#: Sure." * (1 + i % 3), add_special_tokens=False
            )["input_ids"],
            tokenizer(f"Person1 books table {i}." + " Then they eat." * (i % 4), add_special_tokens=False)["input_ids"],
            tokenizer,
        )
        for i in range(count)
    ]
    return Dataset.from_list(examples)


class Capture(TrainerCallback):
    """The gradients of every trainable parameter just before the (only) optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def one_step(model_dir: Path, method: str, tmp_path: Path, **recipe) -> tuple[float, dict, int, object]:
    """One optimizer step of `method` through the real Trainer setup: (loss, gradients, training
    forward calls of the first linear layer inside the first checkpointable layer, trainer)."""
    tokenizer = load_tokenizer(str(model_dir))
    family.ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    model = plan(method, model_dir).build(load_model(str(model_dir)))
    data = rows(model_dir, 4)
    params = tiny_train_params(batch_size=4, **recipe)
    args = training_arguments(params, 0, tmp_path / f"{method}-{recipe}", torch.device("cpu"), method)
    trainer = build_trainer(model, tokenizer, data, data.select(range(2)), args, params.pad_to_multiple_of)
    capture = Capture(model)
    trainer.add_callback(capture)
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    # a linear layer inside it: the layer's own hooks stay outside the checkpointed forward
    layer = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    calls = []
    layer.register_forward_hook(lambda module, *_: calls.append(1) if module.training else None)  # not validation's
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return loss, capture.grads, len(calls), trainer


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes(model_dir, method, tmp_path):
    loss, grads, calls, _ = one_step(model_dir, method, tmp_path, gradient_checkpointing=False)
    gc_loss, gc_grads, gc_calls, trainer = one_step(model_dir, method, tmp_path, gradient_checkpointing=True)
    assert trainer.model.is_activation_checkpointing
    assert training_metrics(trainer)["train_gradient_checkpointing"] == 1
    # really on: each layer runs twice per step (forward, then again in backward), not once
    assert (calls, gc_calls) == (1, 2)
    assert gc_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == gc_grads.keys() and grads  # the same trainable parameters, all with gradients
    assert any(g.abs().sum() > 0 for g in grads.values())  # the premise: gradients reach what trains
    for name, grad in grads.items():
        torch.testing.assert_close(gc_grads[name], grad, msg=f"{method}: {name}")


# --------------------------------------------------------------------------- bf16 frozen base


def stage_run(model_dir: Path, workdir: Path, method: str, recipe, monkeypatch, **config) -> training.Run:
    """A workdir as the training stages expect it (pin, prepared splits) and a Run of train@<method>,
    its recipe `recipe` and its arguments the committed ones changed by `config`."""
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    data = rows(model_dir, 8)
    data.save_to_disk("data/prepared/train")
    validation = data.select(range(2)).add_column("id", ["v0", "v1"]).add_column("summary", ["a", "b"])
    validation.save_to_disk("data/prepared/validation")
    Path("models/base").mkdir(parents=True)
    pin = {"name": str(model_dir), "revision": "main", "resolved_revision": "sha256:test"}
    Path("models/base/pin.json").write_text(json.dumps(pin))
    params = dataclasses.replace(
        PARAMS,
        model=ModelParams(name=str(model_dir), revision="main"),
        validate=dataclasses.replace(PARAMS.validate, max_new_tokens=8),  # a random model never stops early
    )
    section = PARAMS.sections[method]
    section = dataclasses.replace(section, recipe=recipe, config=dataclasses.replace(section.config, **config))
    run = training.start_run(method, 42, dataclasses.replace(params, sections={**PARAMS.sections, method: section}))
    assert run.recipe == recipe and run.section.config == section.config  # the run trains what it was given
    return run


def mock_bf16_device(monkeypatch) -> None:
    """A bf16-native device (an H100, or an AVX512-BF16 CPU): precision auto resolves to bf16."""
    monkeypatch.setattr(modeling, "native_bf16", lambda device: True)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_peft_base_is_bf16_under_bf16_training_and_the_adapter_reloads(model_dir, method, tmp_path, monkeypatch):
    mock_bf16_device(monkeypatch)
    recipe = tiny_train_params(precision="auto", batch_size=4, learning_rate=1.0e-2)
    run = stage_run(model_dir, tmp_path / "work", method, recipe, monkeypatch)
    initial = {}
    method_plan = methods.plan(run.section, run.base, run.params.seed)  # as stages/train.py plans it
    assert method_plan.frozen_base and method_plan.quantization == "none"  # the plan asks for the bf16 base

    def build(base):
        model = method_plan.build(base)
        initial.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    trained = training.train(run, dataclasses.replace(method_plan, build=build))
    model = trained.trainer.model
    keep_fp32 = getattr(family.unwrap(model), "_keep_in_fp32_modules", None) or []  # T5's wo stays fp32
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert {p.dtype for n, p in frozen.items() if not any(f".{m}." in n for m in keep_fp32)} == {torch.bfloat16}
    metrics = training_metrics(trained.trainer)
    assert metrics["train_base_dtype"] == "bf16" and metrics["train_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert any(not torch.equal(p, initial[n]) for n, p in trainable.items())  # the adapter trained
    assert all(torch.equal(p, initial[n]) for n, p in frozen.items())  # the base did not
    # only what trains has optimizer state: fp32, the adapter's size
    state = [s for group in trained.trainer.optimizer.state.values() for s in group.values() if torch.is_tensor(s)]
    assert {s.dtype for s in state if s.dim() > 0} == {torch.float32}
    assert sum(s.numel() for s in state if s.dim() > 0) == 2 * sum(p.numel() for p in trainable.values())

    # saved as the stage saves it, reloaded as generate@<method> loads it (bf16 on this device): the same model
    assert method_plan.save is save_adapter and method_plan.library == "peft"
    method_plan.save(model, trained.tokenizer, run.model_dir)
    shutil.copy2("models/base/pin.json", run.model_dir / "pin.json")
    _, reloaded = load_variant(run.model_dir, run.params.model, torch.bfloat16)
    reloaded_params = dict(reloaded.named_parameters())
    for name, p in trainable.items():
        assert reloaded_params[name].dtype == torch.float32
        torch.testing.assert_close(reloaded_params[name], p, rtol=0, atol=0)
    batch = family.data_collator(family.family(family.unwrap(model).config), trained.tokenizer, model)(
        [
            {k: r[k] for k in ("input_ids", "attention_mask", "labels")}
            for r in Dataset.load_from_disk("data/prepared/train")
        ]
    )
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # (accelerate's bf16 training wraps the trained model's forward to return fp32 outputs)
        torch.testing.assert_close(reloaded(**batch).logits.float(), model(**batch).logits.float(), rtol=0, atol=0)


def test_full_fine_tuning_and_fp32_runs_keep_an_fp32_base(tiny_model_dir, tmp_path, monkeypatch):
    mock_bf16_device(monkeypatch)
    cpu = torch.device("cpu")
    assert training.frozen_base_dtype("auto", cpu) == torch.bfloat16
    assert training.frozen_base_dtype("fp32", cpu) == torch.float32  # fp32 training: unchanged
    assert training.frozen_base_dtype("auto", cpu, quantization="4bit") == torch.float32  # QLoRA loads its own way
    full_run = stage_run(tiny_model_dir, tmp_path / "full", "full", tiny_train_params(precision="auto"), monkeypatch)
    full_plan = methods.plan(full_run.section, full_run.base, full_run.params.seed)
    assert not full_plan.frozen_base  # full fine-tuning trains every weight: fp32 master weights
    full = training.train(full_run, full_plan)
    assert {p.dtype for p in full.trainer.model.parameters()} == {torch.float32}  # fp32 masters
    assert training_metrics(full.trainer)["train_base_dtype"] == "fp32"
    lora_run = stage_run(tiny_model_dir, tmp_path / "lora", "lora", tiny_train_params(precision="fp32"), monkeypatch)
    lora_plan = methods.plan(lora_run.section, lora_run.base, lora_run.params.seed)
    assert lora_plan.frozen_base  # a frozen base, but fp32 training keeps it fp32
    lora = training.train(lora_run, lora_plan)
    assert {p.dtype for p in lora.trainer.model.parameters()} == {torch.float32}
    assert training_metrics(lora.trainer)["train_base_dtype"] == "fp32"


# --------------------------------------------------------------------------- attention implementation


def test_eager_and_sdpa_give_the_same_logits(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    family.ensure_pad_token(tokenizer)
    data = rows(model_dir, 3)  # different lengths: padding is masked in both
    model_family = family.family(family.load_config(str(model_dir)))
    batch = family.data_collator(model_family, tokenizer, None)([dict(r) for r in data])
    logits = {}
    for implementation in ("eager", "sdpa", "auto"):
        model = load_model(str(model_dir), attn_implementation=implementation).eval()
        logits[implementation] = model(**batch).logits
        resolved = family.resolved_attn_implementation(model)
        assert resolved == ("sdpa" if implementation == "auto" else implementation)  # auto: transformers' sdpa
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["auto"], logits["sdpa"], rtol=0, atol=0)


def test_an_attention_implementation_the_model_lacks_is_refused_by_name(tiny_model_dir, monkeypatch):
    from transformers import T5ForConditionalGeneration

    monkeypatch.setattr(T5ForConditionalGeneration, "_supports_flex_attn", False)
    with pytest.raises(family.StageError) as info:
        load_model(str(tiny_model_dir), attn_implementation="flex_attention")
    message = str(info.value)
    assert message.startswith("model.attn_implementation: t5 models cannot load with 'flex_attention' (")
    assert message.endswith("); use auto (transformers' best supported one) or eager")


def test_the_attention_implementation_goes_from_params_to_the_model(tiny_model_dir, tmp_path):
    pin = tmp_path / "pin.json"
    pin.write_text(json.dumps({"name": str(tiny_model_dir), "revision": "main", "resolved_revision": "sha256:x"}))
    params = ModelParams(name=str(tiny_model_dir), revision="main", attn_implementation="eager")
    pinned = modeling.read_pin(pin, params)
    assert pinned.attn_implementation == "eager"
    _, model = modeling.load_base(pinned)
    assert family.resolved_attn_implementation(model) == "eager"


# --------------------------------------------------------------------------- length buckets and compile


def test_batches_pad_to_the_bucket_and_the_loss_is_unchanged(model_dir, tmp_path):
    tokenizer = load_tokenizer(str(model_dir))
    family.ensure_pad_token(tokenizer)
    model_family = family.family(family.load_config(str(model_dir)))
    features = [dict(r) for r in rows(model_dir, 3)]
    torch.manual_seed(0)
    model = load_model(str(model_dir)).eval()
    losses = {}
    for multiple in (1, 64):
        batch = family.data_collator(model_family, tokenizer, model, multiple)(features)
        widths = {k: v.shape[1] for k, v in batch.items()}
        longest = max(len(f["input_ids"]) for f in features)
        if multiple == 64:
            assert all(w % 64 == 0 for w in widths.values()), widths
            assert widths["input_ids"] == 64 * -(-longest // 64)
        else:
            assert widths["input_ids"] == longest
        padded = batch["attention_mask"] == 0
        if model_family == family.CAUSAL:  # the labels share the input's positions: -100 wherever padded
            assert (batch["labels"][padded] == -100).all()
        label_tokens = batch["labels"].ne(-100).sum().item()
        assert label_tokens == sum(sum(1 for t in f["labels"] if t != -100) for f in features)
        with torch.no_grad():
            outputs = model(**batch)
        losses[multiple] = token_mean_loss(outputs, batch["labels"], shift_labels=model_family == family.CAUSAL)
    torch.testing.assert_close(losses[64], losses[1], rtol=1e-5, atol=1e-6)

    # the Trainer's own batches (train.pad_to_multiple_of) are bucketed the same way
    _, _, _, trainer = one_step(model_dir, "lora", tmp_path, pad_to_multiple_of=64)
    shapes = {tuple(b["input_ids"].shape) for b in trainer.get_train_dataloader()}
    assert all(width % 64 == 0 for _, width in shapes)


def c_compiler() -> bool:
    try:
        return subprocess.run(["gcc", "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not c_compiler(), reason="torch.compile's inductor needs a C compiler (gcc) on CPU; none here")
def test_compile_trains_a_step_through_the_trainer(tiny_model_dir, tmp_path):
    # ~2 minutes of inductor on 2 CPU cores. Dropout off: compiled dropout draws its masks from another RNG
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    eager_loss, eager_grads, _, _ = one_step(model_dir, "full", tmp_path, pad_to_multiple_of=64)
    loss, grads, _, trainer = one_step(model_dir, "full", tmp_path, compile=True, pad_to_multiple_of=64)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # really compiled
    assert training_metrics(trainer)["train_compile"] == 1
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_qlora_trains_with_gradient_checkpointing(tmp_path_factory, tmp_path, monkeypatch):
    # QLoRA's checkpointing is the recipe's gradient_checkpointing too (peft's k-bit preparation no longer
    # turns on its own); a 4-bit base 128 wide (bitsandbytes' CPU kernel wants widths in multiples of 64)
    model_dir = make_tiny_model(tmp_path_factory.mktemp("qlora") / "model", "--family", "llama", "--width", "128")
    mock_bf16_device(monkeypatch)
    recipe = tiny_train_params(precision="auto", batch_size=4, gradient_checkpointing=True)
    run = stage_run(model_dir, tmp_path / "work", "lora", recipe, monkeypatch, quantization="4bit")
    lora_plan = methods.plan(run.section, run.base, run.params.seed)  # lora.quantization: 4bit, as the stage plans it
    assert lora_plan.quantization == "4bit" and lora_plan.frozen_base
    trained = training.train(run, lora_plan)
    model = trained.trainer.model
    assert family.is_quantized(family.unwrap(model)) and model.is_activation_checkpointing
    metrics = training_metrics(trained.trainer)
    assert metrics["train_base_dtype"] == "4bit" and metrics["train_gradient_checkpointing"] == 1
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_no_per_step_loss_check_a_non_finite_loss_is_logged_as_it_is(tiny_model_dir, tmp_path):
    # transformers' NaN/inf filter reads every step's loss on the host (a GPU sync per step) and logs
    # the running mean in place of a non-finite one; the pipeline turns it off: the NaN shows
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = rows(tiny_model_dir, 4)
    params = tiny_train_params(batch_size=2)
    args = training_arguments(params, 0, tmp_path, torch.device("cpu"), "full")
    assert args.logging_nan_inf_filter is False
    trainer = build_trainer(load_model(str(tiny_model_dir)), tokenizer, data, data.select(range(2)), args)
    real_loss, calls = trainer.compute_loss_func, []

    def second_step_diverges(outputs, labels, num_items_in_batch=None):
        calls.append(1)
        loss = real_loss(outputs, labels, num_items_in_batch)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.compute_loss_func = second_step_diverges
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses[0])) and torch.isnan(torch.tensor(losses[1]))
