"""Stage `train_full`: fine-tune every weight of the base model.

Sibling of train_lora.py: `diff stages/train_full.py stages/train_lora.py` shows the LoRA part;
the skeleton (load, train with out-of-memory retries, resume, save, metrics) is stages/training.py.
"""

from __future__ import annotations

from dataclasses import asdict

from transformers import PreTrainedModel

from stages.errors import run_stage
from stages.modeling import save_seq2seq
from stages.params import load_params
from stages.training import finish_run, start_run, train


def build_model(base: PreTrainedModel) -> PreTrainedModel:
    return base  # every weight trains


def main() -> None:
    params = load_params()
    run = start_run("full", params)
    trained = train(run, build_model)
    finish_run(run, trained, save_seq2seq, {"train_full": asdict(params.train_full)})


if __name__ == "__main__":
    run_stage(main)
