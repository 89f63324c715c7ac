"""PEFT methods on the tiny model, in process: LoRA and its variants (DoRA, rsLoRA, PiSSA, OLoRA,
all-linear), (IA)3 and prompt tuning each train with a falling loss, save adapter-only weights,
and reload onto a fresh, untouched base with the same logits and summaries as the trained
model in memory. Each is built and saved through its method type's Plan (stages/methods/), as the
train stage builds and saves it. Their params are checked before any weights load, and the train
stage runs ia3 and prompt end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from stages import methods, train, training
from stages.errors import StageError
from stages.generate import generate_summaries, load_adapter
from stages.ledger import count_parameters
from stages.methods import ia3, lora, prompt
from stages.modeling import load_model, load_tokenizer, meta_model, save_adapter
from stages.params import ModelParams, load_params, parse_params
from stages.recipe import build_trainer, training_arguments
from tests.conftest import REPO, dialogsum_rows, problems, tiny_train_params, write_jsonl

COMMITTED = load_params(REPO / "params.yaml")
TRAIN = tiny_train_params(epochs=4, learning_rate=1.0e-2, batch_size=4, eval_batch_size=4)
LORA = dataclasses.replace(
    COMMITTED.method("lora").config, r=4, alpha=8
)  # the committed LoRA params, at the tiny model's scale
IA3 = COMMITTED.method("ia3").config
PROMPT = COMMITTED.method("prompt").config
# case -> (its params section, the section's arguments, a learning rate that moves the loss within 8
# steps); the committed arguments of each method, LoRA's at a rank that fits the tiny model
METHODS = {
    "lora": ("lora", LORA, 3.0e-2),
    "dora": ("lora", dataclasses.replace(LORA, use_dora=True), 3.0e-2),
    "rslora": ("lora", dataclasses.replace(LORA, use_rslora=True), 3.0e-2),
    "gaussian": ("lora", dataclasses.replace(LORA, init="gaussian"), 3.0e-2),
    "pissa": ("lora", dataclasses.replace(LORA, init="pissa"), 3.0e-2),
    "olora": ("lora", dataclasses.replace(LORA, init="olora"), 3.0e-2),
    "all-linear": ("lora", dataclasses.replace(LORA, target_modules="all-linear"), 3.0e-2),
    "ia3": ("ia3", IA3, 5.0e-2),
    "prompt": ("prompt", PROMPT, 1.0),  # peft's prompt-tuning example rate
}


def generate_params():
    return dataclasses.replace(COMMITTED.generate, num_beams=2, max_new_tokens=8, precision="fp32")


def dataset(tokenizer, rows: int) -> Dataset:
    sources = tokenizer(
        [f"#Person1#: I need table {i} for dinner. #Person2#: Sure, at {i % 3 + 6}." for i in range(rows)]
    )
    labels = tokenizer([f"Person1 books table {i}." for i in range(rows)])["input_ids"]
    return Dataset.from_dict(
        {"input_ids": sources["input_ids"], "attention_mask": sources["attention_mask"], "labels": labels}
    )


def plan_for(method: str, model_dir: Path) -> methods.Plan:
    """The case's Plan as the train stage makes it: the committed section with the case's arguments,
    on the tiny model (checked on its meta model)."""
    section_name, params, _ = METHODS[method]
    section = dataclasses.replace(COMMITTED.method(section_name), config=params)
    return methods.plan(section, ModelParams(name=str(model_dir), revision="main"), seed=0)


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tiny_model_dir, tmp_path_factory):
    """(method, trained model in memory, its training log, saved adapter folder, tokenizer, its Plan).

    The model is the Plan's build on fresh base weights and is saved by the Plan's save, as the
    train stage does (PiSSA/OLoRA: converted against the adapter as initialized)."""
    method = request.param
    section_name, _, learning_rate = METHODS[method]
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    plan = plan_for(method, tiny_model_dir)
    model = plan.build(load_model(str(tiny_model_dir)))
    data = dataset(tokenizer, 8)
    out = tmp_path_factory.mktemp(method)
    args = training_arguments(
        dataclasses.replace(TRAIN, learning_rate=learning_rate),
        seed=0,
        output_dir=out / "checkpoints",
        device=torch.device("cpu"),
        section=section_name,
    )
    trainer = build_trainer(model, tokenizer, data, data.select(range(4)), args)
    trainer.train()
    plan.save(trainer.model, tokenizer, out / "adapter")
    return method, trainer.model.eval(), trainer.state.log_history, out / "adapter", tokenizer, plan


def test_the_plan_saves_an_adapter_converted_exactly_for_base_rewriting_inits(trained):
    """What the stage's old save_initial_adapter decided (None unless PiSSA/OLoRA) is the Plan's now:
    its save converts against the initial adapter only for PiSSA/OLoRA, whose base also stays fp32."""
    method, _, _, _, _, plan = trained
    assert plan.library == "peft" and plan.quantization == "none"
    if method in ("pissa", "olora"):
        assert plan.save.func is lora.save_converted and plan.frozen_base is False
    else:
        assert plan.save is save_adapter and plan.frozen_base is True


def test_loss_falls(trained):
    method, _, history, _, _, _ = trained
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 8  # 8 rows / 4 per step x 4 epochs, one log per step
    assert losses[-1] < losses[0] and sum(losses[-2:]) < 0.95 * sum(losses[:2]), (
        f"{method}: loss did not fall: {losses}"
    )


def test_only_the_adapter_is_saved(trained, tiny_model_dir):
    method, _, _, adapter_dir, _, _ = trained
    assert not (adapter_dir / "model.safetensors").exists()
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()
    adapter = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert adapter < (tiny_model_dir / "model.safetensors").stat().st_size / 5, f"{method}: {adapter} bytes"


def logits(model, tokenizer) -> torch.Tensor:
    # a padded batch: the short row's padding must be masked the same way in both models
    batch = tokenizer.pad(
        {
            "input_ids": tokenizer(
                ["#Person1#: Hello there.", "#Person1#: I need table 3 for dinner tonight. #Person2#: Sure."]
            )["input_ids"]
        },
        return_tensors="pt",
    )
    labels = tokenizer(["Person1 books table 3.", "Person1 books table 3."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(**batch, labels=labels).logits


def test_the_saved_adapter_on_a_fresh_base_is_the_trained_model(trained, tiny_model_dir):
    """For PiSSA and OLoRA the trained model's base weights were rewritten; the saved adapter is
    converted so it applies to the untouched base. Same logits, same (batched, padded) summaries."""
    method, model, _, adapter_dir, tokenizer, _ = trained
    reloaded = load_adapter(load_model(str(tiny_model_dir)), adapter_dir)
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(model, tokenizer), rtol=1e-4, atol=1e-5)
    texts = [
        "#Person1#: Hello.",
        "#Person1#: I need table 3 for dinner. #Person2#: Sure, at 7.",
        "#Person1#: See you at the station tomorrow morning at nine, then. #Person2#: Fine.",
    ]
    input_ids = tokenizer(texts)["input_ids"]
    params = dataclasses.replace(generate_params(), batch_size=2)  # batches of unequal lengths: padded
    expected = generate_summaries(model, tokenizer, input_ids, params).summaries
    assert generate_summaries(reloaded, tokenizer, input_ids, params).summaries == expected
    if method == "prompt":  # peft prepends the prompt to the input and ones to its attention mask in generate()
        one_by_one = [
            generate_summaries(reloaded, tokenizer, [ids], dataclasses.replace(params, batch_size=1)).summaries[0]
            for ids in input_ids
        ]
        assert one_by_one == expected  # padding in a batch does not change a summary


def test_trainable_counts_are_honest(trained, tiny_model_dir):
    method, model, _, _, _, _ = trained
    config = json.loads((tiny_model_dir / "config.json").read_text())
    counts = count_parameters(model)
    if method == "prompt":  # encoder prompt only: no unused decoder rows
        assert counts["trainable_params"] == PROMPT.num_virtual_tokens * config["d_model"]
    elif method == "ia3":  # one scale per output of k and v, one per input of wo
        base = load_model(str(tiny_model_dir))
        expected = sum(
            m.out_features if name.rsplit(".", 1)[-1] in ("k", "v") else m.in_features
            for name, m in base.named_modules()
            if name.rsplit(".", 1)[-1] in ("k", "v", "wo")
        )
        assert counts["trainable_params"] == expected
    else:
        assert 0 < counts["trainable_params"] < counts["total_params"] / 5


@pytest.mark.parametrize(
    ("init", "use_rslora", "use_dora"), [("pissa", True, False), ("olora", True, False), ("pissa", False, True)]
)
def test_pissa_and_olora_adapters_are_saved_converted(tiny_model_dir, tmp_path, init, use_rslora, use_dora):
    """PiSSA/OLoRA rewrite the base weights; the adapter is saved as a plain LoRA of rank 2r that
    applies to the untouched base (with rsLoRA's alpha / sqrt(r) too). DoRA's magnitudes do not
    survive that conversion, which is why params refuse DoRA with these inits."""
    params = dataclasses.replace(LORA, init=init, use_rslora=use_rslora, use_dora=use_dora)
    torch.manual_seed(0)
    base = ModelParams(name=str(tiny_model_dir), revision="main")
    config = lora.lora_config(params, meta_model(base))
    model = lora.build_model(load_model(str(tiny_model_dir)), config)
    attention = model.base_model.model.encoder.block[0].layer[0].SelfAttention
    assert not torch.equal(
        attention.q.base_layer.weight, load_model(str(tiny_model_dir)).encoder.block[0].layer[0].SelfAttention.q.weight
    )
    initial = lora.initial_adapter(base, config)  # from fresh base weights, as the converted save does
    assert json.loads((initial / "adapter_config.json").read_text())["r"] == LORA.r
    with torch.no_grad():  # stands in for training: move every trainable weight
        for weight in (p for p in model.parameters() if p.requires_grad):
            weight.add_(0.05 * torch.randn_like(weight))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    lora.save_converted(model, tokenizer, tmp_path / "adapter", base, config)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (2 * LORA.r, True)
    reloaded = load_adapter(load_model(str(tiny_model_dir)), tmp_path / "adapter")
    difference = (logits(reloaded, tokenizer) - logits(model.eval(), tokenizer)).abs().max().item()
    assert difference > 0.1 if use_dora else difference < 1e-4


# params, checked before any weights load


def test_committed_defaults(tiny_model_dir):
    committed_lora = COMMITTED.method("lora").config
    assert (committed_lora.r, committed_lora.alpha, committed_lora.target_modules) == (32, 32, "auto")
    assert (committed_lora.init, committed_lora.use_dora, committed_lora.use_rslora) == ("default", False, False)
    assert committed_lora.quantization == "none"
    assert (IA3.target_modules, IA3.feedforward_modules) == ("auto", "auto")
    assert [COMMITTED.method(m).type for m in ("lora", "ia3", "prompt")] == ["lora", "ia3", "prompt_tuning"]
    # auto on a T5: peft's T5 defaults, the LoRA paper's [q, v] and the (IA)3 paper's keys, values, feed-forward
    base = ModelParams(name=str(tiny_model_dir), revision="main")
    t5 = meta_model(base)
    assert sorted(lora.lora_config(committed_lora, t5).target_modules) == ["q", "v"]
    ia3_config = ia3.ia3_config(IA3, t5)
    assert (sorted(ia3_config.target_modules), sorted(ia3_config.feedforward_modules)) == (["k", "v", "wo"], ["wo"])
    # and what the plans record they resolved to (metrics/train/<method>.json, the model card)
    assert methods.plan(COMMITTED.method("lora"), base, seed=0).resolved == {
        "target_modules": ["q", "v"],
        "fan_in_fan_out": False,
    }
    assert methods.plan(COMMITTED.method("ia3"), base, seed=0).resolved == {
        "target_modules": ["k", "v", "wo"],
        "feedforward_modules": ["wo"],
        "fan_in_fan_out": False,
    }
    assert (PROMPT.num_virtual_tokens, PROMPT.init) == (20, "text")
    assert COMMITTED.recipe("ia3").learning_rate == pytest.approx(8.0e-3)
    assert COMMITTED.recipe("prompt").learning_rate == pytest.approx(0.3)


def test_lora_variants_are_read_from_params(raw):
    raw["lora"].update(target_modules="all-linear", use_dora=True, use_rslora=True, init="gaussian")
    read = parse_params(copy.deepcopy(raw)).method("lora").config
    assert (read.target_modules, read.use_dora, read.use_rslora, read.init) == ("all-linear", True, True, "gaussian")


def test_bad_lora_variants_are_all_reported(raw):
    raw["lora"].update(init="pisa", use_dora="yes", target_modules="q")
    message = problems(raw)
    assert "lora.init: expected one of 'default', 'gaussian', 'pissa', 'olora', got 'pisa'" in message
    assert "lora.use_dora: expected true or false, got 'yes'" in message
    raw["lora"].update(init="pissa", use_dora=False, target_modules="q")
    assert "lora.target_modules: expected a list of strings or one of 'all-linear', 'auto', got 'q'" in problems(raw)
    raw["lora"].update(target_modules=[])
    assert "lora.target_modules: must name at least one module, e.g. [q, v], or be auto or all-linear" in problems(raw)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_with_a_base_rewriting_init_is_refused(raw, init):
    raw["lora"].update(use_dora=True, init=init)
    assert (
        f"lora.use_dora: DoRA cannot be combined with init '{init}' (its adapter is saved converted to "
        "plain LoRA, which drops DoRA's magnitudes); use init default or gaussian"
    ) in problems(raw)


def test_bad_ia3_and_prompt_params_are_all_reported(raw):
    raw["ia3"].update(target_modules=["k", "v"], feedforward_modules=["wo", "wi"])
    raw["prompt"].update(num_virtual_tokens=0, init="txt")
    message = problems(raw)
    assert message.startswith("2 problem(s) in params.yaml:")  # a mistyped prompt.init hides its other checks
    assert (
        "ia3.feedforward_modules: wo, wi not in target_modules; a feed-forward module must also be a target"
    ) in message
    assert "prompt.init: expected one of 'text', 'sample_vocab', 'random', got 'txt'" in message
    raw["prompt"].update(num_virtual_tokens=0, init="text", init_text=" ")
    message = problems(raw)
    assert "prompt.num_virtual_tokens: must be >= 1, got 0" in message
    assert "prompt.init_text: must not be empty with init text" in message


def test_targets_the_model_lacks_name_the_linear_layers(tiny_model_dir):
    layers = meta_model(ModelParams(name=str(tiny_model_dir), revision="main"))  # meta device: no weights
    with pytest.raises(StageError) as info:
        ia3.ia3_config(dataclasses.replace(IA3, target_modules=["k", "v", "wi"]), layers)
    assert str(info.value) == (
        "ia3.target_modules: wi not found in the model; linear layers available: k, lm_head, o, q, v, wi_0, wi_1, wo"
    )
    with pytest.raises(StageError) as info:
        lora.lora_config(dataclasses.replace(LORA, target_modules=["q", "query"]), layers)
    assert str(info.value).startswith("lora.target_modules: query not found in the model; linear layers available")
    assert (
        lora.lora_config(dataclasses.replace(LORA, target_modules="all-linear"), layers).target_modules == "all-linear"
    )
    # a method's section names its own key (a second LoRA section, lora_qk, is not `lora`)
    with pytest.raises(StageError) as info:
        lora.lora_config(dataclasses.replace(LORA, target_modules=["q", "query"]), layers, "lora_qk")
    assert str(info.value).startswith("lora_qk.target_modules: query not found in the model")
    with pytest.raises(StageError) as info:
        ia3.ia3_config(dataclasses.replace(IA3, target_modules=["k", "v", "wi"]), layers, "ia3_kv")
    assert str(info.value).startswith("ia3_kv.target_modules: wi not found in the model")


# the stages, end to end


def run_stage(module: str, *args: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory where the data and prepare stages have run on small local data."""
    root = tmp_path_factory.mktemp("stages")
    for split in ("train", "validation", "test"):
        write_jsonl(root / "source" / f"{split}.jsonl", dialogsum_rows(split, 6))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params["data"]["source"] = str(root / "source")
    for section in ("ia3", "prompt"):  # each method's own section: its recipe only
        params[section].update(epochs=1, batch_size=2, gradient_accumulation_steps=1, eval_batch_size=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("data", "base", "prepare"):  # base pins the model that prepare and training load
        run_stage(f"stages.{stage}", cwd=root)
    return root


@pytest.mark.parametrize("method", ["ia3", "prompt"])
def test_stage_runs_end_to_end(workdir, method):
    run_stage("stages.train", method, "42", cwd=workdir)
    adapter = workdir / "models" / method / "seed42"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ia3": "IA3", "prompt": "PROMPT_TUNING"}[method]
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    # the pin of the base it was trained on rides along, and how that base loads: generate@<method>
    # reads nothing outside models/<method>
    assert (adapter / "pin.json").read_text() == (workdir / "models" / "base" / "pin.json").read_text()
    assert json.loads((adapter / "quantization.json").read_text()) == {"quantization": "none"}
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card
    card_params = yaml.safe_load(card.split("## Params\n\n```yaml\n", 1)[1].split("```", 1)[0])
    assert card_params[method]["type"] == {"ia3": "ia3", "prompt": "prompt_tuning"}[method]
    assert card_params["train"]["epochs"] == 1 and card_params["train"]["batch_size"] == 2  # the resolved recipe
    metrics = json.loads((workdir / "metrics" / "train" / method / "seed42.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["trainable_params"] > 0
    assert metrics["method_type"] == card_params[method]["type"]
    if method == "ia3":  # what auto resolved to on the T5, recorded beside the metrics and in the card
        resolved = {"target_modules": "k,v,wo", "feedforward_modules": "wo", "fan_in_fan_out": 0}
        assert {k: metrics[f"resolved_{k}"] for k in resolved} == resolved
        assert card_params["ia3_resolved"] == {
            "target_modules": ["k", "v", "wo"],
            "feedforward_modules": ["wo"],
            "fan_in_fan_out": False,
        }
    assert (workdir / "metrics" / "timing" / "train" / method / "seed42.json").is_file()
    assert (workdir / "dvclive" / method / "seed42" / "plots" / "metrics" / "loss.tsv").is_file()
    assert (workdir / "checkpoints" / method / "seed42").is_dir()  # where the run checkpointed, emptied once finished
    assert not list((workdir / "checkpoints" / method / "seed42").glob("checkpoint-*"))
    assert card_params["seed"] == 42 and card_params["validation_seed"] == 42  # training seed, subset seed
    assert not list(workdir.glob(f"*/train_{method}"))  # no output under the old per-stage names


@pytest.mark.parametrize(
    ("method", "targets", "expected"),
    [
        (
            "ia3",
            ["k", "v", "wo", "wi"],
            "ia3.target_modules: wi not found in the model; linear layers available: k, lm_head, o, q, v, wi_0, wi_1, wo",
        ),
        (
            "lora",
            ["q", "query"],
            "lora.target_modules: query not found in the model; linear layers available: k, lm_head, o, q, v, wi_0, wi_1, wo",
        ),
    ],
)
def test_stage_stops_on_an_unknown_target_before_loading_weights(
    tiny_model_dir, tmp_path, monkeypatch, method, targets, expected
):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params[method]["target_modules"] = targets
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pin = {"name": str(tiny_model_dir), "revision": "main", "resolved_revision": "sha256:0"}  # the base stage's output
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "pin.json").write_text(json.dumps(pin))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(training, "load_model", lambda *args: pytest.fail("loaded the weights before checking"))
    with pytest.raises(StageError) as info:
        train.main(method, 42)
    assert str(info.value) == expected


def test_prompt_text_init_repeats_the_text_without_special_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    params = dataclasses.replace(PROMPT, num_virtual_tokens=20, init="text", init_text="Summarize this:")
    ids = prompt.init_token_ids(params, tokenizer, seed=0)
    text = tokenizer("Summarize this:", add_special_tokens=False)["input_ids"]
    assert ids == (text * 20)[:20] and tokenizer.eos_token_id not in ids  # peft's own init repeats </s> too
    base = load_model(str(tiny_model_dir))
    model = prompt.build_model(base, prompt.prompt_config(params), ids)
    rows = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(rows, base.get_input_embeddings().weight[ids].float())


def test_prompt_sample_vocab_init_draws_real_common_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    params = dataclasses.replace(PROMPT, num_virtual_tokens=50, init="sample_vocab")
    ids = prompt.init_token_ids(params, tokenizer, seed=0)
    assert len(ids) == 50 and len(set(ids)) > 10
    assert not set(ids) & set(tokenizer.all_special_ids)  # no pad, </s> or <unk> rows
    # never the embedding's rows past the vocabulary (FLAN-T5: 32,128 rows for 32,100 tokens)
    assert max(ids) < len(tokenizer) <= load_model(str(tiny_model_dir)).get_input_embeddings().num_embeddings
    assert ids == prompt.init_token_ids(params, tokenizer, seed=0)  # seeded
    assert ids != prompt.init_token_ids(params, tokenizer, seed=1)
