"""Loading and saving models and tokenizers of any tested family, safely and with the output head intact.

Which model class loads a checkpoint (seq2seq or causal) is stages/family.py's decision; this
module wraps it for the stages, and saves what they trained (a whole model or a peft adapter). FLAN-T5 (T5 v1.1) keeps `lm_head` apart from the shared embedding. transformers 5.x keeps
them apart on `from_pretrained` when the checkpoint has both, but its T5Config always *says*
`tie_word_embeddings: true`, and a plain `tie_weights()` / `resize_token_embeddings()` /
`from_config` silently ties them. So: load only with `from_pretrained`, never call those,
and write `tie_word_embeddings: false` into every config we save so no version misreads it.
Weights load from safetensors only and `trust_remote_code` is never enabled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from stages import family
from stages.errors import StageError
from stages.hub import ModelLoadError, hub_revision, load_error
from stages.params import ModelParams

if TYPE_CHECKING:  # importing it loads transformers' modeling code (~1.7 s), which prepare never runs
    from transformers import PreTrainedModel


def load_tokenizer(name: str, revision: str = "main") -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name, revision=hub_revision(name, revision), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise load_error(name, revision, error) from None


def generation_eos_ids(name: str, revision: str, config) -> set[int]:
    """The ids the model stops generating on: its generation_config.json's eos_token_id (a chat
    model lists its end-of-turn token there: Qwen2.5 Instruct [<|im_end|>, <|endoftext|>]), else
    config.json's; one id or a list, as checkpoints ship them."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(name, revision=hub_revision(name, revision)).eos_token_id
    except OSError:  # no generation_config.json: the config's own
        eos = None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def load_model(
    name: str,
    revision: str = "main",
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
    attn_implementation: str = "auto",
) -> PreTrainedModel:
    """The model of its family (stages/family.py) from safetensors, head untied exactly when the
    checkpoint stores it apart; `quantization` 4bit/8bit loads the frozen base through bitsandbytes;
    `attn_implementation` (model.attn_implementation) auto leaves the choice to transformers."""
    return family.load_model(
        name, revision, dtype=dtype, quantization=quantization, attn_implementation=attn_implementation
    )


def load_base(
    params: ModelParams, dtype: torch.dtype = torch.float32, quantization: str = "none"
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    model = load_model(params.name, params.revision, dtype, quantization, params.attn_implementation)
    return load_tokenizer(params.name, params.revision), model


def meta_model(params: ModelParams) -> PreTrainedModel:
    """The model of its family built from its config alone on the meta device: shapes and names,
    no weights downloaded or allocated, so checks against it fail in a second instead of after a load."""
    config = family.load_config(params.name, params.revision)
    with torch.device("meta"):
        return family.auto_model_class(family.family(config)).from_config(config)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the model's linear layers (LoRA targets; GPT-2's Conv1D layers count as linear)."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
        }
    )


def check_target_modules(section: str, targets: list[str], model: torch.nn.Module) -> None:
    """Refuse target modules that match no module of `model` (a meta model will do), matched as
    peft matches them, naming the linear layers it has (a name that matches nothing would
    otherwise fail inside peft, after the weights have loaded)."""
    unknown = family.missing_target_modules(model, targets)
    if unknown:
        raise StageError(
            f"{section}.target_modules: {', '.join(unknown)} not found in the model; "
            f"linear layers available: {', '.join(linear_layer_names(model))}"
        )


def count_parameters_from_config(params: ModelParams) -> int:
    """Parameters of the model as loaded (FLAN-T5 base: 247.6M), from its config alone.

    from_config ties the output head to the embedding; a T5 v1.1 checkpoint keeps it apart,
    which transformers 5.x records as scale_decoder_outputs=False (see make_tiny_model.py).
    """
    model = meta_model(params)
    total = sum(p.numel() for p in model.parameters())
    if head_is_tied(model) and getattr(model.config, "scale_decoder_outputs", True) is False:
        total += model.get_output_embeddings().weight.numel()
    return total


def resolve_revision(name: str, revision: str) -> str:
    """The exact commit a Hub revision (branch, tag or SHA) points to now, or a content hash
    (sha256 over file names and bytes) of a local model directory."""
    if Path(name).is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in Path(name).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(name)).encode() + b"\0" + path.read_bytes())
        return "sha256:" + digest.hexdigest()
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    try:
        sha = HfApi().model_info(name, revision=revision).sha
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError):
        sha = None
    if sha:
        return sha
    try:  # offline: the commit of the cached snapshot (its folder is named after it)
        return Path(snapshot_download(name, revision=revision, local_files_only=True)).name
    except (OSError, ValueError) as error:
        raise load_error(name, revision, error) from None


def read_pin(pin_file: Path, params: ModelParams) -> ModelParams:
    """`params` at the commit the baselines stage pinned (models/base/pin.json), so every stage
    loads the same base weights even if the Hub branch moved since."""
    if not pin_file.is_file():
        raise ModelLoadError(f"{pin_file} not found: the base stage pins the model first; run dvc repro base")
    pin = json.loads(pin_file.read_text())
    if (pin["name"], pin["revision"]) != (params.name, params.revision):
        raise ModelLoadError(
            f"{pin_file} pins {pin['name']!r} at {pin['revision']!r} but params.yaml has "
            f"{params.name!r} at {params.revision!r}; run dvc repro base"
        )
    # how to load it (the attention implementation) is params', not the pin's
    return dataclasses.replace(pinned_base(pin), attn_implementation=params.attn_implementation)


def pinned_base(pin: dict) -> ModelParams:
    """The model a pin (models/base/pin.json, or its copy beside an adapter) names, at its resolved
    commit; a local directory has no commits (its content hash is only recorded)."""
    local = Path(pin["name"]).is_dir()
    return ModelParams(name=pin["name"], revision=pin["revision"] if local else pin["resolved_revision"])


def head_is_tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def untie_lm_head(model: PreTrainedModel, head: torch.Tensor) -> None:
    """Give `model` its own output head with values `head` (a no-op for the tie mapping after)."""
    model.get_output_embeddings().weight = torch.nn.Parameter(head.clone())
    # without this, save_pretrained would drop lm_head as a duplicate of the embedding
    model.all_tied_weights_keys.pop("lm_head.weight", None)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """A whole model (full fine-tuning, either family): save_pretrained (safetensors) + tokenizer, with a
    config that cannot be misread as tied. `state_dict`: the whole weights of a sharded model, gathered
    by every rank (stages/sharding.py full_state_dict), which rank 0 writes as one model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    if not head_is_tied(model):
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["tie_word_embeddings"] = False
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(model, tokenizer: PreTrainedTokenizerBase, out_dir: Path, initial_adapter: Path | None = None) -> None:
    """A PEFT method's output: only the adapter weights (kB to MB) and the tokenizer; the base
    model comes from its pin (stages/training.py finish_run writes pin.json beside them).

    `initial_adapter` (LoRA's PiSSA/OLoRA only): peft then saves the trained adapter minus the
    initial one as a plain LoRA adapter of rank 2r ([B | -B0] [A ; A0]) that applies to the
    untouched base model.
    """
    model.save_pretrained(
        out_dir,
        safe_serialization=True,
        path_initial_model_for_weight_conversion=None if initial_adapter is None else str(initial_adapter),
    )
    tokenizer.save_pretrained(out_dir)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively: GPUs of compute capability >= 8.0 (Ampere and
    newer), CPUs with AVX512-BF16 or AMX.

    Not torch.cuda.is_bf16_supported(): in torch 2.13 it is also True on T4/V100 (7.x), which
    emulate bf16 slowly, so `auto` would pick a slower path than fp32 there.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    cpu = torch.cpu  # these probes are private in torch 2.x; treat their absence as "no"
    return any(
        getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def set_determinism(seed: int, strict: bool) -> None:
    """Seed python, numpy and torch; with `strict` (param `deterministic`), also force
    deterministic CUDA kernels (see `deterministic_kernels`)."""
    from transformers import set_seed

    set_seed(seed)
    if strict:
        deterministic_kernels()


def deterministic_kernels() -> None:
    """Deterministic CUDA kernels, at a speed cost.

    Without them, GPU reductions (atomics in backward passes, split-K matmuls) may add up in a
    different order on each run, so GPU losses and summaries can differ in the last bits; CPU
    kernels here are deterministic either way. cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its first
    call, so this runs before any model touches the GPU. (transformers' enable_full_determinism
    also sets CUDA_LAUNCH_BLOCKING=1, which serialises every kernel launch: not needed for this.)
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 when asked, or when `auto` finds hardware that runs it natively; else fp32.

    Measured on a 2-core AVX512-BF16 CPU: bf16 trains and generates flan-t5-small ~1.6x
    faster than fp32. T5 in fp16 overflows to NaN, so fp16 is never an option.
    """
    if precision == "fp32":
        return False
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("precision bf16 needs a GPU with bf16 support (Ampere or newer); use auto or fp32")
    # explicit bf16 on a GPU that only emulates it is allowed (the user asked); auto never picks it
    return precision == "bf16" or native_bf16(device)
