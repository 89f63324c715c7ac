"""The training recipe in process: the batch per step survives an out-of-memory retry, whole-run
figures and curves survive an interruption, one process never drives several GPUs."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from stages import launch
from stages.errors import StageError
from stages.modeling import load_model, load_tokenizer
from stages.params import TrainParams, load_params
from stages.training import (
    attach_curves,
    build_trainer,
    check_one_device_per_process,
    training_arguments,
    training_costs,
    training_metrics,
    whole_run_loss,
)
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
    args = training_arguments(params, seed=0, output_dir=output_dir, device=torch.device("cpu"), section="train_full")
    return build_trainer(model, tokenizer, data, data.select(range(4)), args)


def test_out_of_memory_retry_keeps_the_batch_per_optimizer_step(tiny_model_dir, tmp_path, capsys):
    params = dataclasses.replace(
        TRAIN,
        batch_size=4,
        gradient_accumulation_steps=2,
        auto_find_batch_size=True,
        eval_batch_size=2,
        save_steps=1000,
    )
    trainer = make_trainer(tiny_model_dir, tmp_path, params)
    forward = trainer.model.forward

    @functools.wraps(forward)  # the Trainer reads forward's signature to pick dataset columns
    def small_gpu_forward(*args, **kwargs):  # a GPU that fits 2 dialogues per forward pass, not 4
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(*args, **kwargs)

    trainer.model.forward = small_gpu_forward
    trainer.train()
    metrics = training_metrics(trainer)
    assert (metrics["per_device_batch_size"], metrics["gradient_accumulation_steps"]) == (2, 4)
    assert metrics["batch_per_step"] == 8  # 4 x 2 asked for; 2 x 4 after the retry
    assert metrics["train_steps"] == 2  # 16 rows / 8 per step, as without the out-of-memory error
    assert "per-device batch 2: gradient accumulation 2 -> 4, keeping 8 samples" in capsys.readouterr().out


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
        check_one_device_per_process(2, "train_full")
    assert str(info.value) == (
        "2 GPUs are visible to one training process; set train_full.processes=2 for "
        "data-parallel training (DDP), or run on one GPU with CUDA_VISIBLE_DEVICES=0 "
        "(dvc repro does this for processes: 1)"
    )
    check_one_device_per_process(1, "train_full")  # one GPU (or none) is fine


def test_launch_pins_a_one_process_run_to_one_gpu(capsys):
    assert launch.one_gpu_env({"PATH": "/bin"}, 1, "train_lora") == {"PATH": "/bin"}
    assert launch.one_gpu_env({"CUDA_VISIBLE_DEVICES": "3,5"}, 2, "train_lora") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert launch.one_gpu_env({}, 4, "train_lora") == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "set train_lora.processes=4 to use all of them (DDP)" in capsys.readouterr().out


def test_launch_main_uses_the_device_count(monkeypatch, tmp_path):
    # launch.main with 2 (mocked) GPUs and processes: 1 execs the stage with one GPU visible
    seen = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    params = dataclasses.replace(load_params(REPO / "params.yaml"), train_full=TRAIN)
    monkeypatch.setattr(launch, "load_params", lambda: params)
    monkeypatch.setattr(launch.os, "execve", lambda path, argv, env: seen.update(argv=argv, env=env))
    launch.main("train_full")
    assert seen["argv"][-2:] == ["-m", "stages.train_full"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0"
