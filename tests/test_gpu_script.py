"""benchmarks/gpu.sh cannot rot: its dry run runs the whole script on this CPU with tiny sizes (every
measurement part of benchmarks/gpu_parts.py, trainer_overhead.py, the summary), and a part that overruns
its cap is cut without losing what the earlier parts wrote to $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from stages.modeling import use_bf16
from tests.conftest import REPO, require_shared

MEASUREMENTS = ("attention", "stages", "train", "memory", "overhead", "decoder")


def test_the_gpu_script_runs_dry_on_cpu_and_a_cut_part_loses_nothing(tmp_path):
    require_shared()
    out, work = tmp_path / "out", tmp_path / "work"
    parts = "attention:120 stages:200 train:200 memory:200 overhead:200 decoder:200 pytest:1"  # pytest is cut at 1 s
    env = {
        **os.environ,
        "OUT": str(out),
        "GPU_SH_WORK": str(work),
        "GPU_SH_PARTS": parts,
        "GPU_SH_BUDGET_S": "1500",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    steps = {line.split("\t")[0]: line.split("\t")[1] for line in (work / "steps.tsv").read_text().splitlines()}
    assert {name: steps[name] for name in MEASUREMENTS} == dict.fromkeys(MEASUREMENTS, "0"), steps
    assert steps["pytest"] == "124"  # cut by its cap (timeout's exit code)

    results = json.loads((out / "results.json").read_text())["parts"]  # written after the cut part too
    assert all("finished" in results[name] for name in MEASUREMENTS), {k: list(v) for k, v in results.items()}
    bf16 = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    assert results["memory"]["lora_gc0"]["base_dtype"] == bf16  # a PEFT method's frozen base follows precision
    assert results["memory"]["full_gc1"]["gradient_checkpointing"] is True
    assert results["train"]["eager_pad64"]["pad_to_multiple_of"] == 64
    assert results["train"]["eager_pad8"]["gflops_per_step"] > 0
    assert results["attention"]["sdpa_choice"]["trainable bias (full fine-tuning)"]
    assert results["decoder"]["qlora_4bit"]["base_dtype"] == "4bit"
    assert results["decoder"]["lora_bf16_base"]["trainable_params"] > 0
    assert results["stages"]["projection_default_repro"]["total_min"] > 0
    assert results["stages"]["generate_test_set"]["num_beams"] == 4  # the generate stage's params
    assert results["overhead"]["trainer_over_plain_loop"] > 0
    summary = (out / "summary.md").read_text()
    assert "| Trainer path >= 0.9x a plain loop's samples/s | not measured |" not in summary
    assert "| full fine-tuning >= 30% MFU (best of compile off/on) | not measured | not measured |" in summary  # CPU
