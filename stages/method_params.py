"""The method axis' schema: the training recipe (TrainParams), the method types with a schema of their
own (full, lora, ia3, prompt_tuning), any other peft type by name (PeftArgs), and one method section
resolved (MethodParams). stages/params.py reads the sections; stages/methods/ holds each type's code."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from stages.schema import check

# Schedulers that transformers builds from a name alone (cosine_with_min_lr, warmup_stable_decay and
# reduce_lr_on_plateau need extra arguments this recipe does not pass); a test keeps this list a
# subset of transformers.SchedulerType.
LR_SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]

# The Trainer's optimizer names this recipe accepts: fused AdamW (transformers' default with torch >=
# 2.8), plain AdamW, bitsandbytes' 8-bit AdamW (state in 8 bits: ~2 bytes per param instead of 8) and
# its paged variant (state pages to CPU memory under pressure), and Adafactor (T5's own optimizer:
# factored second moments, a fraction of AdamW's state). A test keeps this a subset of OptimizerNames.
OPTIMIZERS = Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor"]
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


@dataclass(frozen=True)
class TrainParams:
    """One training recipe: the shared `train` section, or a method's resolved recipe (`train` with the
    differences its own section lists, see `MethodParams.recipe`)."""

    epochs: float
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    eval_batch_size: int
    weight_decay: float
    warmup_ratio: float
    lr_scheduler: LR_SCHEDULERS
    max_grad_norm: float
    precision: Literal["auto", "bf16", "fp32"]
    group_by_length: bool
    logging_steps: int
    save_steps: int
    auto_find_batch_size: bool
    dataloader_workers: int
    processes: int
    select_by: Literal["rougeL", "loss", "last"]  # which evaluated checkpoint is saved (stages/validation.py)
    patience: int  # evaluations without improvement before stopping; 0 = never stop early
    # Speed and memory levers. The defaults serve code that builds a recipe directly, and are the
    # recipe without them; params.yaml always sets them.
    gradient_checkpointing: bool = False  # recompute activations in backward instead of keeping them
    compile: bool = False  # torch.compile the model (the Trainer's torch_compile, inductor)
    pad_to_multiple_of: int = 8  # pad each batch's lengths up to a multiple of this (compile: shapes repeat)
    optimizer: OPTIMIZERS = "adamw_torch_fused"  # the Trainer's optim name
    # none: each process holds the whole model (one process, or DDP); fsdp: full fine-tuning's weights,
    # gradients and optimizer state sharded over the processes (torch's fully_shard, stages/sharding.py)
    sharding: Literal["none", "fsdp"] = "none"
    nodes: int = 1  # machines of a multi-node torchrun, each running `processes` (stages/launch.py)

    def problems(self, section: str) -> list[str]:
        return (
            check(self.epochs > 0, f"{section}.epochs: must be > 0, got {self.epochs}")
            + check(self.learning_rate > 0, f"{section}.learning_rate: must be > 0, got {self.learning_rate}")
            + check(self.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {self.batch_size}")
            + check(
                self.gradient_accumulation_steps >= 1,
                f"{section}.gradient_accumulation_steps: must be >= 1, got {self.gradient_accumulation_steps}",
            )
            + check(self.eval_batch_size >= 1, f"{section}.eval_batch_size: must be >= 1, got {self.eval_batch_size}")
            + check(self.weight_decay >= 0, f"{section}.weight_decay: must be >= 0, got {self.weight_decay}")
            + check(0 <= self.warmup_ratio < 1, f"{section}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
            + check(self.max_grad_norm > 0, f"{section}.max_grad_norm: must be > 0, got {self.max_grad_norm}")
            + check(self.logging_steps >= 1, f"{section}.logging_steps: must be >= 1, got {self.logging_steps}")
            + check(self.save_steps >= 1, f"{section}.save_steps: must be >= 1, got {self.save_steps}")
            + check(self.processes >= 1, f"{section}.processes: must be >= 1, got {self.processes}")
            + check(self.nodes >= 1, f"{section}.nodes: must be >= 1, got {self.nodes}")
            + check(
                self.dataloader_workers >= 0,
                f"{section}.dataloader_workers: must be >= 0, got {self.dataloader_workers}",
            )
            + check(self.patience >= 0, f"{section}.patience: must be >= 0 (0 = off), got {self.patience}")
            + check(
                self.pad_to_multiple_of >= 1,
                f"{section}.pad_to_multiple_of: must be >= 1 (1 = pad to the longest row), got {self.pad_to_multiple_of}",
            )
            + check(
                self.sharding != "fsdp" or self.processes >= 2,
                f"{section}.sharding: fsdp shards the model over processes, and {section}.processes is "
                f"{self.processes}; set processes to the GPU count (>= 2), or sharding: none",
            )
            + check(
                self.sharding != "fsdp" or self.optimizer not in EIGHT_BIT_OPTIMIZERS,
                f"{section}.optimizer: {self.optimizer} does not run under sharding: fsdp (bitsandbytes' "
                "8-bit optimizers do not handle FSDP2's sharded parameters); use adamw_torch_fused or adafactor",
            )
            + check(
                self.patience == 0 or self.select_by != "last",
                f"{section}.patience: early stopping needs a validation metric to improve; "
                "set select_by to rougeL or loss, or patience to 0",
            )
        )


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    # all-linear: peft's shorthand for every linear layer but the output head; auto: peft's default
    # for the architecture (stages/family.py default_target_modules)
    target_modules: list[str] | Literal["all-linear", "auto"]
    bias: Literal["none", "all", "lora_only"]
    use_dora: bool
    use_rslora: bool
    init: Literal["default", "gaussian", "pissa", "olora"]
    quantization: Literal["none", "4bit", "8bit"]  # the frozen base's weights (QLoRA: 4bit)

    def problems(self, section: str) -> list[str]:
        targets = self.target_modules
        names_ok = isinstance(targets, list)
        return (
            check(self.r >= 1, f"{section}.r: must be >= 1, got {self.r}")
            + check(self.alpha >= 1, f"{section}.alpha: must be >= 1, got {self.alpha}")
            + check(0 <= self.dropout < 1, f"{section}.dropout: must be in [0, 1), got {self.dropout}")
            + check(
                not names_ok or len(targets) > 0,
                f"{section}.target_modules: must name at least one module, e.g. [q, v], or be auto or all-linear",
            )
            # PiSSA/OLoRA adapters are saved as the plain-LoRA difference to their initial value, which
            # has no place for DoRA's trained magnitudes: the saved adapter would not be the trained one
            + check(
                not (self.use_dora and self.init in ("pissa", "olora")),
                f"{section}.use_dora: DoRA cannot be combined with init {self.init!r} (its adapter is "
                "saved converted to plain LoRA, which drops DoRA's magnitudes); use init default or gaussian",
            )
            # PiSSA/OLoRA decompose the base weights, which a quantized base does not hold in full precision
            + check(
                not (self.quantization != "none" and self.init in ("pissa", "olora")),
                f"{section}.quantization: {self.quantization} cannot be combined with init {self.init!r} (it "
                "rewrites the base weights, which are quantized); use init default or gaussian",
            )
        )


@dataclass(frozen=True)
class Ia3Params:
    target_modules: list[str] | Literal["auto"]  # auto: peft's default for the architecture
    feedforward_modules: list[str] | Literal["auto"]  # auto: peft's feed-forward subset of the targets

    def problems(self, section: str) -> list[str]:
        # with an auto side the subset check waits for the model (stages/methods/ia3.py ia3_config)
        lists = isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list)
        outside = [m for m in self.feedforward_modules if m not in self.target_modules] if lists else []
        return check(
            self.target_modules == "auto" or len(self.target_modules) > 0,
            f"{section}.target_modules: must name at least one module, e.g. [k, v, wo], or be auto",
        ) + check(
            not outside,
            f"{section}.feedforward_modules: {', '.join(outside)} not in "
            "target_modules; a feed-forward module must also be a target",
        )


@dataclass(frozen=True)
class PromptParams:
    num_virtual_tokens: int
    init: Literal["text", "sample_vocab", "random"]
    init_text: str

    def problems(self, section: str) -> list[str]:
        return check(
            self.num_virtual_tokens >= 1, f"{section}.num_virtual_tokens: must be >= 1, got {self.num_virtual_tokens}"
        ) + check(
            self.init != "text" or bool(self.init_text.strip()),
            f"{section}.init_text: must not be empty with init text; write the task, "
            'e.g. "Summarize the following conversation:"',
        )


@dataclass(frozen=True)
class FullParams:
    """Method type `full`: every weight trains; nothing to configure beyond the recipe."""

    def problems(self, section: str) -> list[str]:
        return []


@dataclass(frozen=True)
class PeftArgs:
    """Any other method type: a peft config type by name (`type: loha`), its arguments as peft names
    them. peft itself is imported only by the training stage, which checks them against peft's config
    class before any weights load (stages/methods/peft_any.py)."""

    args: dict

    def problems(self, section: str) -> list[str]:
        return []


# The method types with code and a schema of their own in this project (stages/methods/<module>.py);
# every other `type` is a peft config type by name (PeftArgs). What the report calls each type.
METHOD_TYPES: dict[str, type] = {
    "full": FullParams,
    "lora": LoraParams,
    "ia3": Ia3Params,
    "prompt_tuning": PromptParams,
}
TYPE_LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA",
    "ia3": "IA3",
    "prompt_tuning": "prompt tuning",
    "prefix_tuning": "prefix tuning",
    "p_tuning": "P-tuning",
    "loha": "LoHa",
    "lokr": "LoKr",
    "vera": "VeRA",
    "oft": "OFT",
    "boft": "BOFT",
}  # any other peft type is shown by its name
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(TrainParams))
# What no two methods share, so each method section sets it and the shared `train` section cannot:
# a learning rate and a weight decay are tuned per method (-S full.learning_rate=... needs the key there)
PER_METHOD_KEYS = ("learning_rate", "weight_decay")
METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a stage name (train@<name>), a folder and a params section


@dataclass(frozen=True)
class MethodParams:
    """One method section of params.yaml: its type, its learning rate, weight decay and whatever else its
    recipe changes of the shared `train` section (`overrides`, as written) with the result (`recipe`),
    and its own arguments (`config`)."""

    name: str
    type: str
    overrides: dict
    recipe: TrainParams
    config: Any  # FullParams, LoraParams, Ia3Params, PromptParams or PeftArgs

    @property
    def label(self) -> str:
        return method_label(self.name, self.type)

    def as_written(self) -> dict:
        """The section as params.yaml holds it: its type, its recipe differences, its arguments."""
        config = self.config.args if isinstance(self.config, PeftArgs) else dataclasses.asdict(self.config)
        return {"type": self.type, **self.overrides, **config}


def method_label(name: str, kind: str) -> str:
    """What the report calls a method: its type's name for the type's usual section (lora: LoRA, prompt:
    prompt tuning), else the section's name with its type's (lora_r8 (LoRA))."""
    type_label = TYPE_LABELS.get(kind, kind)
    usual = kind.removesuffix("_tuning")  # prompt_tuning: prompt, prefix_tuning: prefix
    return type_label if name == usual else f"{name} ({type_label})"
