"""Training stages as DVC runs them: kill and resume, no stale resumes, determinism, fail-fast params."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_project, dialogsum_rows, write_jsonl

NOISY = {
    "train_runtime_s",
    "train_samples_per_second",
    "peak_rss_mb",
    "train_device",
    "train_oom_retries",
    "train_oom_lost_s",
    "validation_runtime_s",
    "run_runtime_s",
    "save_runtime_s",
}


def env() -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def set_params(repo: Path, updates: dict[str, dict]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in updates.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@contextlib.contextmanager
def params_changed(repo: Path, updates: dict[str, dict]):
    """params.yaml with `updates` for the block, then exactly as before (a key the update added is gone again)."""
    before = (repo / "params.yaml").read_text()
    set_params(repo, updates)
    try:
        yield
    finally:
        (repo / "params.yaml").write_text(before)


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"], repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir) -> Path:
    """A git + DVC copy of the project on the tiny model and 30 local rows, prepared and committed."""
    root = tmp_path_factory.mktemp("training")
    for split in ("train", "validation", "test"):
        write_jsonl(root / "source" / f"{split}.jsonl", dialogsum_rows(split, 30 if split == "train" else 4))
    repo = root / "repo"
    copy_project(repo)
    slow = {
        "epochs": 2,
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "dataloader_workers": 0,
        "logging_steps": 10,
        "save_steps": 2,
    }  # 30 rows x 2 epochs = 60 steps, a checkpoint every 2
    set_params(
        repo,
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"source": str(root / "source")},
            "train": slow,  # the shared recipe: full's and lora's alike
            "validate": {"dialogues": 2, "max_new_tokens": 8},  # 30 validations a run: keep each one short
        },
    )
    run(["git", "init", "-q"], repo)
    run(["dvc", "repro", "prepare"], repo)  # and base, which pins the model
    git_commit(repo, "prepared")
    return repo


def start_and_kill_after_first_checkpoint(repo: Path, method: str) -> None:
    # --force: the stage may be up to date from an earlier test
    stage = f"train@{method}-42"
    process = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", stage],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list((repo / "checkpoints" / method / "seed42").glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None, f"{stage} ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint from {stage} within 300 s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # like a power cut: no cleanup handlers run
    process.wait()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_killed_training_resumes_from_its_last_checkpoint(repo, method):
    start_and_kill_after_first_checkpoint(repo, method)
    # --no-run-cache: had these params finished before, DVC's run cache would hand that run back
    result = run(["dvc", "repro", "--no-run-cache", f"train@{method}-42"], repo)
    assert f"resuming from checkpoints/{method}/seed42/checkpoint-" in result.stdout
    metrics = json.loads((repo / "metrics" / "train" / method / "seed42.json").read_text())
    assert metrics["train_steps"] == 60  # the resumed run finishes the whole schedule
    assert not list((repo / "checkpoints" / method / "seed42").glob("checkpoint-*"))  # finished: nothing to resume
    assert "Running stage" not in run(["dvc", "repro", f"train@{method}-42"], repo).stdout


def test_checkpoint_from_other_params_is_discarded_and_the_run_cache_hands_back_a_finished_run(repo):
    run(["dvc", "repro", "train@full-42"], repo)  # the committed params, finished (a no-op after the resume test)
    start_and_kill_after_first_checkpoint(repo, "full")
    with params_changed(repo, {"full": {"learning_rate": 2.0e-4}}):  # full's own recipe difference
        result = run(["dvc", "repro", "train@full-42"], repo)
        assert "discarding checkpoints in checkpoints/full/seed42: made with other params or data" in result.stdout
        assert "resuming" not in result.stdout
    # back to params that finished before: no training, the run comes back from DVC's run cache
    # (checkpoints are no output of the stage, so its run cache holds it)
    back = run(["dvc", "repro", "train@full-42"], repo)
    assert "Stage 'train@full-42' is cached - skipping run, checking out outputs" in back.stdout
    assert "Running stage" not in back.stdout
    assert run(["dvc", "status", "train@full-42"], repo).stdout.strip() == "Data and pipelines are up to date."


def test_training_from_scratch_is_bit_identical(repo):
    outputs = []
    for _ in range(2):
        run([sys.executable, "-m", "stages.train", "full", "42"], repo)
        outputs.append(
            (
                (repo / "metrics" / "train" / "full" / "seed42.json").read_bytes(),
                (repo / "models" / "full" / "seed42" / "README.md").read_bytes(),  # the card: nothing noisy in it
                (repo / "models" / "full" / "seed42" / "model.safetensors").read_bytes(),
            )
        )
    assert outputs[0] == outputs[1]
    costs = json.loads((repo / "metrics" / "timing" / "train" / "full" / "seed42.json").read_text())
    assert set(costs) == NOISY  # noisy figures are kept apart, under keys that say what they are


def test_bad_lora_target_from_dvc_exp_run_fails_fast_with_the_names(repo):
    git_commit(repo, "baseline")  # dvc exp run needs a committed baseline
    result = run(["dvc", "exp", "run", "-S", "lora.target_modules=[q,qv]", "train@lora-42"], repo, check=False)
    run(["git", "checkout", "--", "params.yaml"], repo)  # a failed experiment leaves its -S values behind
    assert result.returncode != 0
    assert (
        "error: lora.target_modules: qv not found in the model; linear layers available: k, lm_head, o, q, v, "
        "wi_0, wi_1, wo"
    ) in result.stderr + result.stdout


def test_bad_param_from_dvc_exp_run_lists_every_problem(repo):
    git_commit(repo, "baseline")
    # DVC refuses to override a key that does not exist; "+" appends it, as a user would after that hint
    result = run(["dvc", "exp", "run", "-S", "lora.r=0", "-S", "+lora.rank=8", "train@lora-42"], repo, check=False)
    run(["git", "checkout", "--", "params.yaml"], repo)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "error: 2 problem(s) in params.yaml:" in output
    assert (
        "lora.rank: unknown key for method type lora; valid keys are alpha, auto_find_batch_size, batch_size, bias, "
        "compile, dataloader_workers, dropout, epochs, eval_batch_size, gradient_accumulation_steps, "
        "gradient_checkpointing, group_by_length, init, learning_rate, logging_steps, lr_scheduler, max_grad_norm, "
        "nodes, optimizer, pad_to_multiple_of, patience, precision, processes, quantization, r, save_steps, select_by, "
        "sharding, target_modules, type, use_dora, use_rslora, warmup_ratio, weight_decay" in output
    )
    assert "lora.r: must be >= 1, got 0" in output


def test_incomplete_checkpoint_from_a_kill_during_save_is_skipped(tmp_path, capsys):
    from stages.checkpoints import complete_checkpoints, discard_unusable_checkpoints

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # killed before trainer_state.json was written
    (tmp_path / "fingerprint.txt").write_text("abc")
    discard_unusable_checkpoints(tmp_path, "abc")
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert f"removing incomplete checkpoint {tmp_path}/checkpoint-6" in capsys.readouterr().out
    discard_unusable_checkpoints(tmp_path, "other params")
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / "fingerprint.txt").read_text() == "other params"


def test_two_process_ddp_training_on_cpu(repo):
    # LoRA's own section asks for 2 processes: only its recipe changes (full keeps train.processes: 1)
    with params_changed(repo, {"lora": {"processes": 2, "epochs": 1, "save_steps": 1000}}):
        run(["dvc", "repro", "train@lora-42"], repo)  # torchrun --nproc_per_node=2, gloo on CPU
        metrics = json.loads((repo / "metrics" / "train" / "lora" / "seed42.json").read_text())
        assert metrics["processes"] == 2
        assert metrics["train_steps"] == 15  # 30 rows / (1 per process x 2 processes)
        assert (repo / "models" / "lora" / "seed42" / "adapter_model.safetensors").is_file()


def training_processes(repo: Path) -> list[int]:
    """PIDs of stage processes running in `repo` (read from /proc: Linux)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if b"\0stages.train\0" in (proc / "cmdline").read_bytes() and (proc / "cwd").resolve() == repo.resolve():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_killing_dvc_also_stops_torchrun_workers(repo):
    # torchrun puts its workers in their own session: a SIGKILL to DVC's group does not reach them,
    # so they watch their launcher and exit when it is gone
    # minutes of work left at the kill
    with params_changed(repo, {"lora": {"processes": 2, "epochs": 40}}):
        try:
            start_and_kill_after_first_checkpoint(repo, "lora")
            deadline = time.monotonic() + 60  # a hang guard: the watch polls every second
            while training_processes(repo):
                assert time.monotonic() < deadline, f"orphaned workers still running: {training_processes(repo)}"
                time.sleep(0.5)
        finally:
            for pid in training_processes(repo):  # never leave a runaway trainer behind a failed test
                os.kill(pid, signal.SIGKILL)
