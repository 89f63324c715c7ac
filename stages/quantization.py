"""Quantized bases (QLoRA's 4-bit, 8-bit) through bitsandbytes: its settings, where a quantized base
loads, what its CPU kernels cannot run, and parameter counts at their real element count."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch

from stages.errors import StageError

QUANTIZATIONS = ("none", "4bit", "8bit")
# bitsandbytes' CPU 4-bit kernel (on AVX512-BF16 CPUs, for generation) repacks each weight in blocks of
# 64 inputs (its quantization block) and 32 outputs (functional._convert_weight_packed_for_cpu)
CPU_4BIT_INPUT_BLOCK, CPU_4BIT_OUTPUT_BLOCK = 64, 32


def quantization_config(quantization: str):
    """bitsandbytes settings for `quantization`, None for "none".

    4bit is QLoRA's recipe (Dettmers et al. 2023): NF4 weights, double quantization of the
    scales, bf16 compute. bitsandbytes 0.50 runs it on CPU too (load, backward, generate).
    """
    if quantization not in QUANTIZATIONS:
        raise StageError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    if quantization == "none":
        return None
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        raise StageError(
            f"a {quantization} load needs bitsandbytes, which this stage keeps unimported because no "
            "params.yaml section sets quantization (stages/__init__.py); set it where the variant "
            "was trained (e.g. lora.quantization: 4bit) and rerun with dvc repro"
        )
    from transformers import BitsAndBytesConfig  # imported here: only quantized loads need bitsandbytes

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def quantized_device(environ: Mapping[str, str], cuda: bool) -> str:
    """Where a quantized base loads (bitsandbytes quantizes as weights arrive, and 8-bit models cannot
    move after): under torchrun each process's own GPU (LOCAL_RANK), so DDP does not find every rank's
    model on GPU 0; one process: its first visible GPU; no GPU: the CPU."""
    return f"cuda:{int(environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"


def cpu_packs_4bit() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for its CPU kernel here (AVX512-BF16 CPUs do, at the
    first forward in eval mode without gradients: validation and test generation)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def narrow_layers(model: torch.nn.Module) -> list[str]:
    """The layers bitsandbytes would quantize (every linear one but the output head) whose shape its
    CPU 4-bit packing cannot take, as `name (inputs -> outputs)`, one per distinct layer name."""
    head = model.get_output_embeddings()
    narrow = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            short = name.rsplit(".", 1)[-1]
            fits = module.in_features % CPU_4BIT_INPUT_BLOCK == 0 and module.out_features % CPU_4BIT_OUTPUT_BLOCK == 0
            if not fits and short not in narrow:
                narrow[short] = f"{short} ({module.in_features} -> {module.out_features})"
    return list(narrow.values())


def check_cpu_4bit_layers(name: str, model_class, config) -> None:
    """Refuse a 4-bit load on a CPU whose bitsandbytes kernel would fail at the first generation with a
    raw reshape error from its weight packing (after the whole training), naming the layers."""
    if not cpu_packs_4bit():
        return
    with torch.device("meta"):
        narrow = narrow_layers(model_class.from_config(config))
    if narrow:
        raise StageError(
            f"4-bit quantization of {name} on this CPU: bitsandbytes' CPU kernel (AVX512-BF16) needs every "
            f"quantized layer's inputs to be a multiple of {CPU_4BIT_INPUT_BLOCK} and its outputs of "
            f"{CPU_4BIT_OUTPUT_BLOCK}, and {', '.join(narrow)} are not; use quantization: none, a wider "
            "model, or a GPU"
        )


def stored_numel(parameter: torch.Tensor) -> int:
    """A parameter's weight count: bitsandbytes stores a 4-bit weight as packed bytes, two weights per
    byte of its storage dtype (peft's get_nb_trainable_parameters counts them the same way)."""
    if type(parameter).__name__ == "Params4bit":
        return parameter.numel() * 2 * parameter.element_size()
    return parameter.numel()
