"""Generation and scoring: the lead baseline, batched generation equal to one-at-a-time generation,
generation fully set by params, LoRA scored unmerged, and the generate/evaluate stages on a tiny model."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from stages.generate import generate_summaries, lead_summary
from stages.modeling import use_bf16
from stages.params import GenerateParams, load_params
from stages.splits import read_split
from tests.conftest import FLAN_SMALL, REPO, dialogsum_rows, require_shared, write_jsonl


def generate_params(**overrides) -> GenerateParams:
    """The committed generate params with `overrides` (the defaults are what users run)."""
    return dataclasses.replace(load_params(REPO / "params.yaml").generate, **overrides)


def test_lead_summary_takes_first_turns_without_speaker_tags():
    dialogue = "#Person1#: Hello there.\n#Person2#: Hi! How are you?\n\n#Person1#: Fine."
    assert lead_summary(dialogue, 2) == "Hello there. Hi! How are you?"
    assert lead_summary(dialogue, 10) == "Hello there. Hi! How are you? Fine."


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_sorted_generation_matches_per_example(tiny_model_dir, num_beams):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval()
    texts = [
        "hello",
        "how are you today my friend",
        "see you at the station tomorrow morning at nine",
        "thanks",
        "I would like to book a table for two people please",
    ]
    input_ids = tokenizer(texts)["input_ids"]
    params = generate_params(batch_size=4, precision="fp32", num_beams=num_beams, max_new_tokens=8)
    batched = generate_summaries(model, tokenizer, input_ids, params)
    one_by_one = [
        generate_summaries(model, tokenizer, [ids], dataclasses.replace(params, batch_size=1)) for ids in input_ids
    ]
    assert batched.summaries == [s.summaries[0] for s in one_by_one]  # same summaries, in input order
    assert batched.lengths == [s.lengths[0] for s in one_by_one]  # same generated lengths
    assert all(0 < n <= 8 for n in batched.lengths)


def run_stage_module(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory where the data, base, lead and prepare stages have run on small local data."""
    root = tmp_path_factory.mktemp("evaluate")
    for split in ("train", "validation", "test"):
        write_jsonl(
            root / "source" / f"{split}.jsonl", dialogsum_rows(split, 6, references=3 if split == "test" else 1)
        )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params["data"]["source"] = str(root / "source")
    params["generate"].update(num_beams=2, max_new_tokens=6)
    params["evaluate"].update(bootstrap_resamples=500)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("data", "base", "lead", "prepare"):
        run_stage_module(f"stages.{stage}", cwd=root)
    return root


def generate_and_evaluate(workdir: Path, variant: str) -> None:
    run_stage_module("stages.generate", variant, cwd=workdir)
    run_stage_module("stages.evaluate", variant, cwd=workdir)


@pytest.mark.parametrize("variant", ["base", "lead"])
def test_metrics_and_predictions_are_bit_identical_across_runs(workdir, variant):
    outputs = [
        workdir / "metrics" / "evaluate" / f"{variant}.json",
        workdir / "data" / "predictions" / f"{variant}.jsonl",
        workdir / "data" / "scores" / f"{variant}.jsonl",
        workdir / "metrics" / "generate" / f"{variant}.json",
    ]
    generate_and_evaluate(workdir, variant)
    first = [p.read_bytes() for p in outputs]
    generate_and_evaluate(workdir, variant)
    assert [p.read_bytes() for p in outputs] == first
    metrics = json.loads(first[0])
    assert metrics["dialogues"] == 6 and metrics["references"] == 18  # 18 rows, each dialogue generated once
    assert metrics["rougeL_ci_low"] <= metrics["rougeL"] <= metrics["rougeL_ci_high"]
    assert "generation_runtime_s" not in metrics  # timings live in metrics/timing/, apart from scores
    assert (workdir / "metrics" / "timing" / "generate" / f"{variant}.json").is_file()
    cost = json.loads((workdir / "metrics" / "cost" / f"{variant}.json").read_text())
    assert cost["trainable_params"] == 0 and cost["train_runtime_s"] == 0.0  # nothing trained
    assert cost["generation_dialogues_per_second"] > 0


def test_lead_baseline_scores_its_own_text(workdir):
    generate_and_evaluate(workdir, "lead")
    first = json.loads((workdir / "data" / "predictions" / "lead.jsonl").read_text().splitlines()[0])
    assert first["prediction"] == "Hello, I would like to book table 0 for dinner. Sure, for how many people?"
    assert "references" not in first  # generation never reads them: data/prepared/references.jsonl
    references = json.loads((workdir / "data" / "prepared" / "references.jsonl").read_text().splitlines()[0])
    assert references == {
        "id": first["id"],
        "references": [f"Person1 books table 0 for dinner (version {r})." for r in range(3)],
    }
    scores = json.loads((workdir / "data" / "scores" / "lead.jsonl").read_text().splitlines()[0])
    assert scores["id"] == first["id"] and scores["rouge1"] >= scores["rouge1_mean_ref"] > 0


@pytest.mark.parametrize("stage", ["stages.generate", "stages.evaluate"])
def test_unknown_variant_is_refused(workdir, stage):
    result = subprocess.run(
        [sys.executable, "-m", stage, "fulll"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    params = load_params(REPO / "params.yaml")
    named = ", ".join([*params.variants, *params.baselines])
    assert result.stderr == f"error: unknown variant 'fulll'; params.yaml variants and baselines are {named}\n"


class OutOfMemoryAbove:
    """Stands in for a model on a small GPU: generate() raises CUDA OOM for batches above `limit`."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.device, self.batch_sizes = model, limit, model.device, []

    def __getattr__(self, name):  # config, generation_config: the wrapped model's
        return getattr(self.model, name)

    def generate(self, **inputs):
        self.batch_sizes.append(len(inputs["input_ids"]))
        if len(inputs["input_ids"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model.generate(**inputs)


def test_generation_halves_the_batch_on_out_of_memory(tiny_model_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval()
    input_ids = tokenizer(["hello", "how are you", "see you", "thanks", "a table for two"])["input_ids"]
    params = generate_params(batch_size=8, precision="fp32", num_beams=1, max_new_tokens=5)
    flaky = OutOfMemoryAbove(model, limit=2)
    generated = generate_summaries(flaky, tokenizer, input_ids, params)
    assert generated.summaries == generate_summaries(model, tokenizer, input_ids, params).summaries
    assert flaky.batch_sizes == [5, 4, 2, 2, 1]  # 8 -> 4 -> 2, then the remaining dialogue
    assert generated.batch_size == 2  # the batch that ran, recorded in metrics/timing/generate/<run>.json
    assert "CUDA out of memory: retrying with generate.batch_size=2" in capsys.readouterr().err


def test_checkpoint_generation_config_cannot_change_what_is_scored(tiny_model_dir, tmp_path):
    # a checkpoint whose generation_config.json forces a first token, a minimum length and a
    # repetition penalty: generate() would apply them to every setting params leave unset
    shipped = tmp_path / "model"
    shutil.copytree(tiny_model_dir, shipped)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    forced = tokenizer.convert_tokens_to_ids("▁the")
    (shipped / "generation_config.json").write_text(
        json.dumps(
            {
                "decoder_start_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 0,
                "forced_bos_token_id": forced,
                "min_length": 7,
                "repetition_penalty": 5.0,
                "no_repeat_ngram_size": 1,
            }
        )
    )
    input_ids = tokenizer(["hello", "see you at the station tomorrow", "thanks a lot"])["input_ids"]
    params = generate_params(batch_size=2, precision="fp32", num_beams=2, max_new_tokens=8)
    clean = generate_summaries(
        AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval(), tokenizer, input_ids, params
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(shipped).eval()
    assert model.generation_config.forced_bos_token_id == forced  # the premise: the checkpoint ships these
    assert generate_summaries(model, tokenizer, input_ids, params).summaries == clean.summaries


def test_generation_settings_are_recorded_with_the_outputs(workdir):
    run_stage_module("stages.generate", "base", cwd=workdir)
    metrics = json.loads((workdir / "metrics" / "generate" / "base.json").read_text())
    assert {k: v for k, v in metrics.items() if k.startswith("generation_")} == {
        "generation_num_beams": 2,
        "generation_max_new_tokens": 6,
        "generation_min_new_tokens": 0,
        "generation_length_penalty": 1.0,
        "generation_no_repeat_ngram_size": 0,
        "generation_repetition_penalty": 1.0,
        "generation_early_stopping": 1,
        "generation_do_sample": 0,
        # what precision auto resolved to on this machine (bf16 on a CPU with AVX512-BF16 or AMX)
        "generation_precision": "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32",
    }


def test_throughput_counts_generation_only_and_load_time_apart(workdir, monkeypatch):
    """A slow model load (a Hub download, CUDA start-up) must not lower the dialogues per second."""
    from stages import generate

    real_load = generate.load_variant

    def slow_load(*args, **kwargs):
        import time

        time.sleep(3.0)  # a download
        return real_load(*args, **kwargs)

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(generate, "load_variant", slow_load)
    generate.main("base", None)
    timing = json.loads((workdir / "metrics" / "timing" / "generate" / "base.json").read_text())
    assert timing["load_runtime_s"] >= 3.0
    assert timing["generation_runtime_s"] < timing["load_runtime_s"]  # 6 tiny dialogues: well under 3 s
    # throughput from the unrounded generation time; the file rounds that time to 0.01 s (+-0.005)
    # and rounds the throughput to 0.001
    runtime_s, rate = timing["generation_runtime_s"], timing["generation_dialogues_per_second"]
    assert 6 / (runtime_s + 0.005) - 0.0005 <= rate <= 6 / max(runtime_s - 0.005, 1e-9) + 0.0005
    assert timing["generation_batch_size"] == load_params(workdir / "params.yaml").generate.batch_size
    assert timing["device"].startswith("cpu (")


def test_default_generation_can_write_a_reference_with_repeated_speaker_tags():
    # FLAN-T5 splits "#Person1#" into 5 tokens; a summary naming both speakers twice repeats
    # 3-grams, so no_repeat_ngram_size 3 (the old default) made such references unwritable
    require_shared()
    tokenizer = AutoTokenizer.from_pretrained(FLAN_SMALL)
    reference = "#Person1# asks #Person2# for help. #Person2# tells #Person1# the way."
    ids = tokenizer(reference)["input_ids"]

    def ngrams(n: int) -> list[tuple[int, ...]]:
        return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]

    assert len(set(ngrams(3))) < len(ngrams(3)), "premise: the reference repeats a 3-gram"
    n = load_params(REPO / "params.yaml").generate.no_repeat_ngram_size
    assert n == 0 or len(set(ngrams(n))) == len(ngrams(n)), f"no_repeat_ngram_size={n} forbids this reference"


def tiny_lora(tiny_model_dir, out_dir: Path) -> Path:
    """A LoRA adapter on every linear layer with a non-zero update of about 1% of the weights' norm."""
    from peft import LoraConfig, TaskType, get_peft_model

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=4,
        lora_alpha=4,
        target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                base = module.base_layer.weight
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.normal_(), b.normal_()
                b.mul_(0.01 * base.norm() / (b @ a).norm())  # the update is 1% of the base weight's norm
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_lora_is_evaluated_as_trained_not_merged_in_bf16(tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    from stages import generate
    from stages.params import ModelParams

    adapter = tiny_lora(tiny_model_dir, tmp_path / "lora")
    model_params = ModelParams(name=str(tiny_model_dir), revision="main")
    (adapter / "pin.json").write_text(  # the pin train@lora writes beside the adapter
        json.dumps({"name": str(tiny_model_dir), "revision": "main", "resolved_revision": "sha256:test"})
    )
    tokenizer, evaluated = generate.load_variant(adapter, model_params, torch.bfloat16)
    reference = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), str(adapter)
    ).eval()
    batch = tokenizer(["how are you today my friend", "see you at the station"], return_tensors="pt", padding=True)
    labels = tokenizer(["fine thanks", "see you"], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        got = evaluated(**batch, labels=labels).logits.float()
        want = reference(**batch, labels=labels).logits.float()
        base = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()(**batch, labels=labels).logits.float()
    scale = want.abs().max()
    assert (merged - want).abs().max() > 1e-3 * scale  # the premise: a bf16 merge moves the logits
    assert (got - want).abs().max() <= 1e-6 * scale  # the evaluated model is the unmerged adapter


def test_stage_scores_equal_the_evaluate_module_and_the_plain_scorer(workdir):
    # the evaluate stage, a notebook's evaluate.load(...) and stages.rouge give the same numbers
    import evaluate

    from stages.rouge import mean_scores, score_corpus

    generate_and_evaluate(workdir, "base")
    stage = json.loads((workdir / "metrics" / "evaluate" / "base.json").read_text())
    rows = [json.loads(line) for line in (workdir / "data" / "predictions" / "base.jsonl").read_text().splitlines()]
    by_id = {
        r["id"]: r["references"]
        for r in map(json.loads, (workdir / "data" / "prepared" / "references.jsonl").read_text().splitlines())
    }
    predictions, references = [r["prediction"] for r in rows], [by_id[r["id"]] for r in rows]
    plain = mean_scores(score_corpus(predictions, references))
    module = evaluate.load(str(REPO / "stages" / "rouge_multiref"), keep_in_memory=True)
    notebook = module.compute(predictions=predictions, references=references)
    assert notebook == plain
    assert {k: stage[k] for k in plain} == plain


def imported_by_stage(module: str, args: list[str], cwd: Path, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a stage's process had imported when it finished (it must succeed)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', *{args!r}]\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert not stop.code, stop.code\n"
        f"print(sorted(m for m in {names!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("module", "args"), [("stages.lead", []), ("stages.generate", ["lead"]), ("stages.evaluate", ["lead"])]
)
def test_a_stage_without_a_model_runs_without_torch(workdir, module, args):
    """Each stage is its own process and `import torch` alone costs 2 s on 2 cores: the stages that
    need no model (lead, generate@lead, every evaluate@) never import it, nor the Trainer, nor the
    `evaluate` package (its suites import `datasets`: 1.9 s), nor `datasets` (stages/splits.py)."""
    heavy = ("torch", "transformers.trainer", "peft", "evaluate", "datasets")
    assert imported_by_stage(module, args, workdir, heavy) == []


def test_prepare_runs_without_transformers_modeling_code(workdir, tmp_path):
    """prepare only tokenizes: it never imports transformers' modeling code (~1.7 s on 2 cores;
    stages/family.py and stages/modeling.py import PreTrainedModel for annotations only), and what it
    writes is what it wrote before."""
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    shutil.rmtree(work / "data" / "prepared")
    assert imported_by_stage("stages.prepare", [], work, ("transformers.modeling_utils",)) == []
    for written in ("references.jsonl", "test/data-00000-of-00001.arrow", "train/data-00000-of-00001.arrow"):
        assert (work / "data" / "prepared" / written).read_bytes() == (
            workdir / "data" / "prepared" / written
        ).read_bytes()


def test_a_stage_log_holds_its_own_lines_only(workdir):
    """What a user reads in `dvc repro`'s log (stderr is not a terminal there): the stage's progress,
    no tied-weights notice, no FutureWarning, no weight-loading bars (stages/__init__.py)."""
    result = run_stage_module("stages.generate", "base", cwd=workdir)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("generate@base: ") for line in lines), result.stderr


def test_the_test_split_reads_as_datasets_reads_it(workdir, tmp_path):
    """generate@ reads the prepared test split with pyarrow (stages/splits.py: no `datasets` import
    in six processes); its columns equal `Dataset.load_from_disk`'s, for a split saved in one file
    (as prepare saves it) and in several."""
    from datasets import Dataset

    prepared = workdir / "data" / "prepared" / "test"
    test = Dataset.load_from_disk(str(prepared))
    assert read_split(prepared) == test.to_dict() and set(test.column_names) == {"id", "dialogue", "input_ids"}
    test.save_to_disk(str(tmp_path / "sharded"), num_shards=3)
    assert len(list((tmp_path / "sharded").glob("*.arrow"))) == 3
    assert read_split(tmp_path / "sharded") == test.to_dict()
