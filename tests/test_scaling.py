"""Past one GPU and one card's memory: the sharding and optimizer params, the Trainer arguments they
become (under a mocked CUDA device, since CPU runs never shard), and the refusal of FSDP without CUDA,
where accelerate would run DDP without a word."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from stages.errors import StageError
from stages.method_params import OPTIMIZERS
from stages.recipe import trainer_settings
from tests.conftest import REPO, problems, run_bare_stage, tiny_train_params

# --- params -------------------------------------------------------------------------------------------


def test_every_optimizer_choice_is_a_trainer_optim_name():
    assert set(typing.get_args(OPTIMIZERS)) <= {o.value for o in OptimizerNames}


def test_sharding_problems_name_the_key_and_the_fix(raw):
    raw["train"].update(sharding="fsdp", processes=1)
    assert problems(raw).splitlines()[1:] == [
        "  - train.sharding: fsdp shards the model over processes, and train.processes is 1; set processes to the "
        "GPU count (>= 2), or sharding: none"
    ]
    raw["train"].update(processes=4, optimizer="adamw_8bit")
    assert "  - train.optimizer: adamw_8bit does not run under sharding: fsdp (bitsandbytes' 8-bit optimizers do " in (
        problems(raw)
    )


def test_fsdp_is_for_full_fine_tuning_only(raw):
    raw["full"].update(sharding="fsdp", processes=4)
    raw["lora"].update(sharding="fsdp", processes=4)
    assert problems(raw).splitlines()[1:] == [
        "  - lora.sharding: fsdp is for full fine-tuning; lora (lora) trains on a frozen base, which DDP replicates "
        "on every GPU (processes > 1, sharding: none); set sharding: fsdp in the full method's section, not in train"
    ]


def test_an_unknown_optimizer_lists_the_choices(raw):
    raw["train"]["optimizer"] = "sgd"
    assert problems(raw).splitlines()[1:] == [
        "  - train.optimizer: expected one of 'adamw_torch_fused', 'adamw_torch', 'adamw_8bit', 'paged_adamw_8bit', "
        "'adafactor', got 'sgd'"
    ]


# --- the Trainer's arguments --------------------------------------------------------------------------


@pytest.fixture()
def cuda_device():
    """A CUDA device as the recipe sees one (an H100: bf16, compute capability 9.0), on a CPU machine."""
    with (
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)),
    ):
        yield torch.device("cuda")


def parsed(settings: dict) -> TrainingArguments:
    """What the Trainer makes of the settings (built on this CPU: only the device fields differ)."""
    return TrainingArguments(**{**settings, "use_cpu": True, "bf16": False, "tf32": None})


def test_fsdp_becomes_the_trainer_s_fsdp2_with_its_own_activation_checkpointing(cuda_device, tmp_path):
    recipe = tiny_train_params(sharding="fsdp", processes=8, gradient_checkpointing=True, precision="auto")
    settings = trainer_settings(recipe, 0, tmp_path, cuda_device, "full")
    assert settings["fsdp"] is True and settings["bf16"] is True and settings["use_cpu"] is False
    # FSDP's activation checkpointing, never the training argument too: the Trainer refuses both at once
    assert settings["activation_checkpointing"] is False
    assert parsed(settings).fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints resume sharded
        "activation_checkpointing": True,
        "reshard_after_forward": True,
    }


def test_without_sharding_activation_checkpointing_is_the_training_argument(cuda_device, tmp_path):
    settings = trainer_settings(tiny_train_params(gradient_checkpointing=True), 0, tmp_path, cuda_device, "lora")
    assert "fsdp" not in settings
    assert settings["activation_checkpointing"] is True
    assert settings["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert parsed(settings).fsdp_plugin_args is None


@pytest.mark.parametrize("optimizer", typing.get_args(OPTIMIZERS))
def test_the_optimizer_param_is_the_trainer_s_optim(cuda_device, tmp_path, optimizer):
    settings = trainer_settings(tiny_train_params(optimizer=optimizer), 0, tmp_path, cuda_device, "full")
    assert parsed(settings).optim == optimizer


# --- never a silent DDP run ---------------------------------------------------------------------------

REFUSAL = (
    "full.sharding: fsdp needs CUDA GPUs and none is visible; on CPU accelerate would silently run DDP (a whole "
    "model per process) instead; set full.sharding=none (-S full.sharding=none) to train with DDP on CPU, or run on "
    "a machine with CUDA GPUs"
)


def test_fsdp_on_cpu_is_refused_naming_cuda(tmp_path):
    recipe = tiny_train_params(sharding="fsdp", processes=2)
    with pytest.raises(StageError) as refused:
        trainer_settings(recipe, 0, tmp_path, torch.device("cpu"), "full")
    assert str(refused.value) == REFUSAL


def test_the_stage_refuses_fsdp_without_cuda_before_torchrun_starts(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["full"].update(sharding="fsdp", processes=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_bare_stage(tmp_path, "stages.launch", "full", "42")  # this machine has no GPU
    assert result.returncode == 2
    assert result.stderr == f"error: {REFUSAL}\n"  # one line, no traceback
    assert result.stdout == ""


# --- the collective save of a sharded model -----------------------------------------------------------


def test_a_two_rank_fsdp2_model_saves_whole_and_generate_loads_it(tiny_model_dir, tmp_path):
    """Raw FSDP2 on CPU with gloo (what the Trainer runs under `sharding: fsdp` on GPUs): parameters
    shard as DTensors, one AdamW step matches one process, and the project's collective save writes one
    model that generate@'s loader reads as it reads any full fine-tuning."""
    import subprocess
    import sys

    from stages.generate import generate_summaries, load_variant
    from stages.modeling import load_model, load_tokenizer
    from stages.params import GenerateParams, ModelParams
    from tests import fsdp_worker

    out = tmp_path / "full" / "seed42"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.fsdp_worker", str(tiny_model_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    held = json.loads((out / "shards.json").read_text())
    reference = load_model(str(tiny_model_dir))
    total = sum(p.numel() for p in reference.parameters())
    assert [h["sharded"] for h in held] == [True, True]
    assert sum(h["local_numel"] for h in held) == total  # each rank held a part, together the whole
    assert all(0 < h["local_numel"] < total for h in held)
    assert [h["got_whole"] for h in held] == [True, False]  # gathered onto rank 0 only
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # one model, not shards

    tokenizer = load_tokenizer(str(tiny_model_dir))
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    fsdp_worker.one_step(reference, tokenizer)  # the same step in one process
    _, saved = load_variant(out, ModelParams(name=str(tiny_model_dir), revision="main"), torch.float32)
    saved_state, reference_state = saved.state_dict(), reference.state_dict()
    assert saved_state.keys() == reference_state.keys()
    assert not saved.get_output_embeddings().weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    step = fsdp_worker.LEARNING_RATE
    for name, tensor in reference_state.items():
        # AdamW's first step is lr x g / (|g| + eps): every weight moves by ~lr whatever |g| is, so a
        # gradient near eps (1e-8), where two processes' float summation orders differ, can move by
        # anything up to 2 x lr. Nearly every weight must agree within 1% of one step (seen: every
        # weight but one within 5e-8, that one at 3.6e-6 on one CPU and past 1e-5 on another); a handful
        # of those near-eps weights may differ, never by more than two steps
        difference = (saved_state[name] - tensor).abs()
        assert difference.max() <= 2 * step * 1.01, (name, difference.max())
        assert (difference > step / 100).float().mean() <= 1e-3, (name, int((difference > step / 100).sum()))
    # the premise: the step moved the weights (AdamW's first step moves every weight with a gradient by ~lr)
    assert (saved_state["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > fsdp_worker.LEARNING_RATE / 2
    decoding = GenerateParams(batch_size=2, precision="fp32", num_beams=1, max_new_tokens=8, min_new_tokens=0,
                              length_penalty=1.0, no_repeat_ngram_size=0, repetition_penalty=1.0, early_stopping=True)  # fmt: skip
    prompts = [tokenizer("Summarize: Person1: Hello, table for two?")["input_ids"]]
    assert generate_summaries(saved.eval(), tokenizer, prompts, decoding) == generate_summaries(
        reference.eval(), tokenizer, prompts, decoding
    )


# --- a grid across GPUs: each stage its own GPU -------------------------------------------------------

CLAIMANT = """
import os
from stages.gpus import gpu_environment
env = gpu_environment({k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}, 1, 2)  # 2 GPUs (mocked)
print("claimed", env["CUDA_VISIBLE_DEVICES"], flush=True)
os.execve("/bin/sleep", ["sleep", "120"], env)  # as launch execs the training: the lock must survive it
"""


def start_stage(lock_dir: Path):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", CLAIMANT],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "GPU_LOCK_DIR": str(lock_dir), "PATH": "/usr/bin:/bin"},
    )


def test_concurrent_stages_claim_different_gpus_and_a_killed_one_frees_its_own(tmp_path):
    locks = tmp_path / "locks"
    first, second, third = start_stage(locks), None, None
    try:
        assert first.stdout.readline() == "claimed 0\n"
        second = start_stage(locks)
        assert second.stdout.readline() == "claimed 1\n"  # GPU 0 is held by the first stage
        third = start_stage(locks)  # a third job of `dvc queue start --jobs 3` on 2 GPUs waits
        assert third.stdout.readline().startswith("waiting for 1 free GPU(s) of 2: other stages hold them")
        first.kill()  # SIGKILL: no cleanup runs; the kernel closes its descriptors
        first.wait()
        assert third.stdout.readline() == "claimed 0\n"
    finally:
        for stage in (first, second, third):
            if stage is not None:
                stage.kill()
                stage.wait()
                stage.stdout.close()


def test_gpus_already_given_are_honoured_and_none_are_claimed(tmp_path):
    from stages.gpus import gpu_environment

    given = {"CUDA_VISIBLE_DEVICES": "5,6", "GPU_LOCK_DIR": str(tmp_path)}
    assert gpu_environment(given, 2, 2) == given
    assert gpu_environment({"GPU_LOCK_DIR": str(tmp_path)}, 1, 0) == {"GPU_LOCK_DIR": str(tmp_path)}  # no GPU
    assert not list(tmp_path.iterdir())


# --- several nodes -----------------------------------------------------------------------------------


def test_a_multi_node_run_is_one_torchrun_node_with_its_rank_and_rendezvous():
    from stages import launch

    argv = launch.command("full", 42, 8, 2, {"SLURM_NODEID": "1", "MASTER_ADDR": "gpu-node-0"})
    assert argv[1:] == [
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-node-0:29500",
        "--rdzv_id=train-full-42",
        "-m",
        "stages.train",
        "full",
        "42",
    ]
    assert launch.command("full", 42, 8, 1, {})[1:3] == ["--standalone", "--nproc_per_node=8"]
    with pytest.raises(StageError) as refused:
        launch.command("full", 42, 8, 2, {"MASTER_ADDR": "gpu-node-0"})
    assert str(refused.value) == (
        "full.nodes > 1 needs this node's rank and the rendezvous host: set NODE_RANK (or run under SLURM, which "
        "sets SLURM_NODEID) and MASTER_ADDR (and MASTER_PORT, default 29500) on every node (docs/scaling-out.md)"
    )
