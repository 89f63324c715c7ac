"""The training recipe in process: the batch per step survives an out-of-memory retry, whole-run
figures and curves survive an interruption, one process never drives several GPUs."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from stages import launch, training
from stages.curves import attach_curves
from stages.errors import StageError
from stages.ledger import RunLedger, training_costs, training_metrics, whole_run_loss
from stages.method_params import TrainParams
from stages.methods.plan import Plan
from stages.modeling import load_model, load_tokenizer, save_model
from stages.oom import halved
from stages.params import ModelParams, Params, load_params
from stages.recipe import build_trainer, check_one_device_per_process, token_mean_loss, training_arguments, use_tf32
from tests.conftest import REPO, tiny_train_params

TRAIN = tiny_train_params(eval_batch_size=4, lr_scheduler="linear", save_steps=2)


def dataset(tokenizer, rows: int) -> Dataset:
    sources = tokenizer([f"#Person1#: I need table {i} for dinner. #Person2#: Sure." for i in range(rows)])
    labels = tokenizer([f"Person1 books table {i}." for i in range(rows)])["input_ids"]
    return Dataset.from_dict(
        {"input_ids": sources["input_ids"], "attention_mask": sources["attention_mask"], "labels": labels}
    )


def make_trainer(model_dir: Path, output_dir: Path, params: TrainParams, rows: int = 16):
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    data = dataset(tokenizer, rows)
    args = training_arguments(params, seed=0, output_dir=output_dir, device=torch.device("cpu"), section="full")
    return build_trainer(model, tokenizer, data, data.select(range(4)), args)


class SmallGpu:
    """Stands in for a GPU that fits `limit` dialogues per forward pass: from the `after`-th forward
    pass on (so some steps have trained and been logged first), a bigger batch raises CUDA OOM.
    Also turns dropout off, so runs with different batch splits can be compared exactly."""

    def __init__(self, limit: int, after: int):
        self.limit, self.after, self.calls, self.batches = limit, after, 0, []

    def build(self, model):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "dropout", None), float):  # T5 attention's functional dropout
                module.dropout = 0.0
        forward = model.forward

        @functools.wraps(forward)  # the Trainer reads forward's signature to pick dataset columns
        def small_gpu_forward(*args, **kwargs):
            if not model.training:  # validation: loss and generation, batches of up to 4 here
                return forward(*args, **kwargs)
            self.calls += 1
            rows = kwargs["input_ids"].shape[0]
            if rows > self.limit and self.calls >= self.after:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            self.batches.append(rows)
            return forward(*args, **kwargs)

        model.forward = small_gpu_forward
        return model

    @property
    def plan(self) -> Plan:
        """Full fine-tuning's plan with this GPU's build: the base itself trains, saved whole."""
        return full_plan(self.build)


def full_plan(build) -> Plan:
    return Plan(build=build, save=save_model, library="transformers", frozen_base=False)


def with_recipe(params: Params, method: str, new_recipe: TrainParams) -> Params:
    """`params` with method `method`'s resolved recipe replaced by `new_recipe`."""
    section = dataclasses.replace(params.sections[method], recipe=new_recipe)
    return dataclasses.replace(params, sections={**params.sections, method: section})


def skeleton_run(tiny_model_dir: Path, workdir: Path, recipe: TrainParams, monkeypatch) -> training.Run:
    """A workdir laid out as the training stages expect (models/base/pin.json, data/prepared/{train,
    validation}) on 32 rows whose summaries differ in length, and a Run of train@full there."""
    workdir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workdir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    sources = tokenizer([f"#Person1#: I need table {i} for dinner. #Person2#: Sure." for i in range(32)])
    labels = tokenizer([f"Person1 books table {i}." + " Then they eat." * (i % 4) for i in range(32)])["input_ids"]
    rows = Dataset.from_dict({**sources, "labels": labels})
    rows.save_to_disk("data/prepared/train")
    validation = rows.select(range(4)).add_column("id", [f"v{i}" for i in range(4)])
    validation.add_column("summary", [f"Person1 books table {i}." for i in range(4)]).save_to_disk(
        "data/prepared/validation"
    )
    pin = {"name": str(tiny_model_dir), "revision": "main", "resolved_revision": "sha256:test"}
    Path("models/base").mkdir(parents=True)
    Path("models/base/pin.json").write_text(json.dumps(pin))
    params = with_recipe(
        dataclasses.replace(
            load_params(REPO / "params.yaml"), model=ModelParams(name=str(tiny_model_dir), revision="main")
        ),
        "full",
        recipe,
    )
    run = training.start_run("full", 42, params)
    assert run.recipe == recipe  # the run trains with the recipe given
    return run


def read_curve(tsv: Path) -> dict[int, float]:
    header, *rows = tsv.read_text().splitlines()
    step, value = header.split("\t").index("step"), header.split("\t").index("loss")
    return {int(r.split("\t")[step]): float(r.split("\t")[value]) for r in rows}


def test_out_of_memory_restarts_clean_at_half_the_batch(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # 32 rows at 8 per optimizer step = 4 steps; the "GPU" fits 2 rows and fails from the 3rd
    # forward pass: the 8 x 1 attempt trains 2 steps first, then 8 -> 4 -> 2 per device
    recipe = dataclasses.replace(TRAIN, batch_size=8, auto_find_batch_size=True, save_steps=1)
    gpu = SmallGpu(limit=2, after=3)
    run = skeleton_run(tiny_model_dir, tmp_path / "retried", recipe, monkeypatch)
    retried = training.train(run, gpu.plan)
    metrics = training_metrics(retried.trainer)
    assert retried.oom_retries == 2  # 8 x 1 and 4 x 2 ran out of memory; halving, not 0.9x steps
    assert (metrics["per_device_batch_size"], metrics["gradient_accumulation_steps"]) == (2, 4)
    assert metrics["batch_per_step"] == 8 and metrics["train_steps"] == 4  # as without the error
    assert "restarting train@full-42 clean with per-device batch 4 x 2 accumulation" in capsys.readouterr().out
    retried_curve = read_curve(run.curves_dir / "plots" / "metrics" / "loss.tsv")
    assert list(retried_curve) == [1, 2, 3, 4]  # the failed attempts' rows are gone: no duplicate steps
    retried_weights = {k: v.clone() for k, v in retried.trainer.model.state_dict().items()}

    # the same recipe at 2 x 4 from the start, and at 8 x 1 on a GPU that fits it: the retried run
    # is the clean 2 x 4 run, and its loss (a token mean over the step's 8 rows) equals 8 x 1's
    clean = training.train(
        skeleton_run(
            tiny_model_dir,
            tmp_path / "clean",
            dataclasses.replace(recipe, batch_size=2, gradient_accumulation_steps=4),
            monkeypatch,
        ),
        SmallGpu(limit=8, after=0).plan,
    )
    for name, value in clean.trainer.model.state_dict().items():
        torch.testing.assert_close(retried_weights[name], value)
    unsplit_run = skeleton_run(tiny_model_dir, tmp_path / "unsplit", recipe, monkeypatch)
    training.train(unsplit_run, SmallGpu(limit=8, after=0).plan)
    unsplit_curve = read_curve(unsplit_run.curves_dir / "plots" / "metrics" / "loss.tsv")
    assert retried_curve == pytest.approx(unsplit_curve, rel=1e-4)


def test_model_loading_is_not_train_time(tiny_model_dir, tmp_path, monkeypatch):
    # a slow load (a Hub download) before training must not count as training
    real_load = training.load_model

    def slow_load(*args, **kwargs):
        time.sleep(3.0)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(training, "load_model", slow_load)
    run = skeleton_run(tiny_model_dir, tmp_path, dataclasses.replace(TRAIN, epochs=0.25), monkeypatch)
    started = time.perf_counter()
    trained = training.train(run, SmallGpu(limit=8, after=0).plan)
    wall_s = time.perf_counter() - started
    # the whole call took the 3 s load plus the training; the train time is the training alone
    assert training_costs(trained.trainer)["train_runtime_s"] <= wall_s - 3.0 + 0.01


def test_peak_memory_is_the_successful_attempts(monkeypatch):
    # on CUDA each attempt starts with the peak counter reset (a mocked card: no GPU here)
    peaks = {"now": 30 * 2**30}  # the failed attempt reached 30 GiB
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peaks.update(now=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["now"])
    ledger = RunLedger(torch.device("cuda", 0))
    ledger.on_train_begin(None, type("State", (), {"stateful_callbacks": {}})(), None)
    peaks["now"] = 12 * 2**30  # this attempt's own peak
    assert ledger.peak_memory_mb() == 12 * 1024


def test_out_of_memory_with_auto_find_batch_size_off_ends_in_one_line_with_the_levers(
    tiny_model_dir, tmp_path, monkeypatch
):
    recipe = dataclasses.replace(TRAIN, batch_size=8, auto_find_batch_size=False)
    run = skeleton_run(tiny_model_dir, tmp_path, recipe, monkeypatch)
    with pytest.raises(StageError) as failed:
        training.train(run, SmallGpu(limit=2, after=0).plan)
    assert str(failed.value) == (
        "train@full-42 ran out of CUDA memory at per-device batch 8 x 1 accumulation with auto_find_batch_size off; "
        "memory levers: -S full.gradient_checkpointing=true, -S full.optimizer=adamw_8bit (or adafactor), "
        "-S full.sharding=fsdp with full.processes=<GPUs> (docs/scaling-out.md); compare the others without it: "
        "dvc exp run -S 'variants=[lora,ia3,prompt]' report"
    )
    assert isinstance(failed.value.__cause__, torch.cuda.OutOfMemoryError)


def test_out_of_memory_under_several_processes_is_not_retried(tiny_model_dir, tmp_path, monkeypatch):
    """A rank that retried alone would rebuild its model while the others wait in the step's all-reduce
    for ever: it ends instead (torchrun then stops the others), on the first error."""
    recipe = dataclasses.replace(TRAIN, batch_size=8, processes=2)  # auto_find_batch_size on
    run = skeleton_run(tiny_model_dir, tmp_path, recipe, monkeypatch)
    small = SmallGpu(limit=2, after=0)
    with pytest.raises(StageError, match=r"^train@full-42 ran out of CUDA memory at per-device batch 8 x 1 "
                       r"accumulation under 2 processes, where one cannot retry alone \(the others would wait in a "
                       r"collective\); memory levers: "):  # fmt: skip
        training.train(run, small.plan)
    assert small.batches == []  # no second attempt at 4 x 2


def test_halving_keeps_the_samples_per_step():
    assert halved((32, 1)) == (16, 2)
    assert halved((16, 2)) == (8, 4)
    assert halved((6, 1)) == (3, 2)
    assert halved((3, 2)) == (1, 6)  # an odd batch: one sample at a time, 6 per step still


def test_token_mean_loss_equals_the_unsplit_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 11)
    labels = torch.randint(0, 11, (4, 5))
    labels[0, 2:] = -100  # rows of different lengths: a mean of micro-batch means would differ
    labels[3, 1:] = -100
    whole = token_mean_loss({"logits": logits}, labels)
    tokens = labels.ne(-100).sum()
    halves = sum(
        token_mean_loss({"logits": logits[i : i + 2]}, labels[i : i + 2], num_items_in_batch=tokens) for i in (0, 2)
    )
    torch.testing.assert_close(halves, whole)
    means = sum(token_mean_loss({"logits": logits[i : i + 2]}, labels[i : i + 2]) for i in (0, 2)) / 2
    assert not torch.isclose(means, whole)  # the premise: averaging two means is not the token mean
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(whole, expected)


def test_tf32_only_alongside_bf16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100/H200
    cuda = torch.device("cuda", 0)
    assert use_tf32(bf16=True, device=cuda) is True
    assert use_tf32(bf16=False, device=cuda) is False  # precision fp32 means fp32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no TF32
    assert use_tf32(bf16=False, device=cuda) is None
    assert use_tf32(bf16=True, device=torch.device("cpu")) is None


class StopAfter(TrainerCallback):
    """Stands in for a kill: training ends after `step`, past the last checkpoint; sleeps at step 1
    so the interrupted part takes a measurable time."""

    def __init__(self, step: int, sleep_s: float):
        self.step, self.sleep_s = step, sleep_s

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            time.sleep(self.sleep_s)
        if state.global_step >= self.step:
            control.should_training_stop = True


def read_steps(tsv: Path) -> list[int]:
    header, *rows = tsv.read_text().splitlines()
    column = header.split("\t").index("step")
    return [int(row.split("\t")[column]) for row in rows]


def test_interrupted_run_reports_whole_run_figures_and_continuous_curves(tiny_model_dir, tmp_path):
    # 16 rows, 2 per step: 8 optimizer steps; checkpoints every 2; "killed" after step 5
    uninterrupted = make_trainer(tiny_model_dir, tmp_path / "once", TRAIN)
    uninterrupted.train()
    expected_loss = training_metrics(uninterrupted)["train_loss_mean"]

    first = make_trainer(tiny_model_dir, tmp_path / "ckpt", TRAIN)
    attach_curves(first, tmp_path / "curves", resume=None)
    first.add_callback(StopAfter(step=5, sleep_s=1.5))
    first.train()
    resumed = make_trainer(tiny_model_dir, tmp_path / "ckpt", TRAIN)
    checkpoint = str(tmp_path / "ckpt" / "checkpoint-4")
    attach_curves(resumed, tmp_path / "curves", resume=checkpoint)
    resumed.train(resume_from_checkpoint=checkpoint)

    metrics, costs = training_metrics(resumed), training_costs(resumed)
    assert metrics["train_steps"] == 8
    # the Trainer's own figure covers steps 5-8 only; the whole run's mean covers 1-8
    assert metrics["train_loss_mean"] == pytest.approx(expected_loss, rel=1e-5)
    resumed_part_s = [e for e in resumed.state.log_history if "train_runtime" in e][-1]["train_runtime"]
    # the whole run's wall time includes the interrupted part (its 1.5 s sleep came before checkpoint-4);
    # the Trainer's own figure is the resumed part alone (both rounded to 0.01 s)
    assert costs["train_runtime_s"] >= resumed_part_s + 1.5 - 0.01
    # one row per optimizer step, continuous across the resume; step 5 (lost to the kill) once
    assert read_steps(tmp_path / "curves" / "plots" / "metrics" / "loss.tsv") == list(range(1, 9))
    assert read_steps(tmp_path / "curves" / "plots" / "metrics" / "learning_rate.tsv") == list(range(1, 9))


def test_whole_run_loss_weights_each_log_by_its_steps():
    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 1.0, "step": 3}]
    assert whole_run_loss(history) == pytest.approx((4.0 * 2 + 1.0) / 3)


def test_a_short_run_still_logs_its_loss(tiny_model_dir, tmp_path):
    # fewer steps than logging_steps: the last step is logged anyway, so loss.tsv always exists
    trainer = make_trainer(tiny_model_dir, tmp_path / "ckpt", dataclasses.replace(TRAIN, logging_steps=50), rows=4)
    attach_curves(trainer, tmp_path / "curves", resume=None)
    trainer.train()
    assert read_steps(tmp_path / "curves" / "plots" / "metrics" / "loss.tsv") == [2]


def test_one_process_refuses_several_gpus():
    with pytest.raises(StageError) as info:
        check_one_device_per_process(2, "full")
    assert str(info.value) == (
        "2 GPUs are visible to one training process; set full.processes=2 (or train.processes for every "
        "method) for data-parallel training (DDP), or run on one GPU with CUDA_VISIBLE_DEVICES=0 "
        "(dvc repro does this for processes: 1)"
    )
    check_one_device_per_process(1, "full")  # one GPU (or none) is fine


def test_launch_pins_a_one_process_run_to_one_gpu(capsys):
    assert launch.one_gpu_env({"PATH": "/bin"}, 1, "lora") == {"PATH": "/bin"}
    assert launch.one_gpu_env({"CUDA_VISIBLE_DEVICES": "3,5"}, 2, "lora") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert launch.one_gpu_env({}, 4, "lora") == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "set train.processes=4 (or lora.processes) to use all of them (DDP)" in capsys.readouterr().out


def test_launch_main_uses_the_device_count(monkeypatch, tmp_path):
    # launch.main with 2 (mocked) GPUs and processes: 1 execs the stage with one GPU visible
    seen = {}
    monkeypatch.setenv("GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 2)
    params = with_recipe(load_params(REPO / "params.yaml"), "full", TRAIN)
    monkeypatch.setattr(launch, "load_params", lambda: params)
    monkeypatch.setattr(launch.os, "execve", lambda path, argv, env: seen.update(argv=argv, env=env))
    launch.main("full", 42)
    assert seen["argv"][-4:] == ["-m", "stages.train", "full", "42"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0"


class FakeDriver:
    """libcuda's two calls launch makes: cuInit(0) and cuDeviceGetCount(&count), CUDA_SUCCESS = 0."""

    def __init__(self, devices: int, init_error: int = 0):
        self.devices, self.init_error = devices, init_error

    def cuInit(self, flags: int) -> int:
        return self.init_error

    def cuDeviceGetCount(self, count) -> int:
        count._obj.value = self.devices
        return 0


def test_launch_counts_gpus_with_the_driver_without_importing_torch(monkeypatch):
    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(launch.ctypes, "CDLL", no_driver)
    assert launch.visible_gpus() == 0  # a CPU machine
    monkeypatch.setattr(launch.ctypes, "CDLL", lambda name: FakeDriver(devices=4))
    assert launch.visible_gpus() == 4
    monkeypatch.setattr(launch.ctypes, "CDLL", lambda name: FakeDriver(devices=4, init_error=100))
    assert launch.visible_gpus() == 0  # CUDA_ERROR_NO_DEVICE
    code = "import sys; from stages import launch; launch.visible_gpus(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_token_mean_loss_of_a_causal_model_is_the_models_own_loss():
    """Causal models predict the next token: the loss shifts labels, as the model's own loss does,
    and split micro-batches with the Trainer's count (labels[..., 1:]) still give the whole mean."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 50, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt carries no loss
    labels[1, 7:], attention_mask[1, 7:] = -100, 0  # right padding
    labels[2, 5:], attention_mask[2, 5:] = -100, 0
    with torch.no_grad():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    whole = token_mean_loss(outputs, labels, shift_labels=True)
    torch.testing.assert_close(whole, outputs.loss)
    assert not torch.isclose(token_mean_loss(outputs, labels), outputs.loss)  # unshifted is wrong
    tokens = labels[..., 1:].ne(-100).sum()
    halves = sum(
        token_mean_loss(
            {"logits": outputs.logits[i : i + 2]}, labels[i : i + 2], num_items_in_batch=tokens, shift_labels=True
        )
        for i in (0, 2)
    )
    torch.testing.assert_close(halves, whole)
