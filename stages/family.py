"""The model family seam: everything that differs between encoder-decoder and decoder-only models.

The family comes from the model's config (`config.is_encoder_decoder`): "seq2seq" (T5, FLAN-T5,
mT5, BART: AutoModelForSeq2SeqLM) or "causal" (Llama, Qwen, Mistral, Gemma, Phi, GPT-2:
AutoModelForCausalLM). Stages are to ask this module how to load, how to build inputs and
labels and how to generate, and never branch on the family themselves, so that adding a family
touches this file only and a training method never needs to know which family it trains.

API (token ids are plain lists of ints; "text ids" means without special tokens, as
`tokenizer(text, add_special_tokens=False)` gives them):

Identity and loading
    family(config) -> "seq2seq" | "causal"
    auto_model_class(family) -> AutoModelForSeq2SeqLM | AutoModelForCausalLM
    task_type(family) -> peft.TaskType (SEQ_2_SEQ_LM | CAUSAL_LM)
    load_config(name, revision) -> PretrainedConfig
    load_model(name, revision="main", dtype=float32, quantization="none", device=None,
        attn_implementation="auto") -> model
    resolved_attn_implementation(model) -> str: what the loaded model's attention runs (auto resolved)
        safetensors only, never trust_remote_code; quantization "4bit" (NF4, double quantization,
        bf16 compute: the QLoRA recipe) or "8bit" loads through bitsandbytes onto `device`, the
        unquantized parameters in fp32 (as peft's k-bit training preparation leaves them)
    prepare_for_kbit_training(model, gradient_checkpointing=True) -> model (peft's recipe; a
        no-op for an unquantized model)
    is_quantized(model) -> bool
    ensure_pad_token(tokenizer) -> bool (True when pad was set to EOS; see its docstring)

Inputs and labels
    special_tokens(family, tokenizer) -> SpecialTokens(prompt_prefix, prompt_suffix,
        target_prefix, target_suffix): what the family adds around a prompt and a target
    prompt_text_budget(family, tokenizer, max_source_length) -> int: text ids a prompt may have
    target_text_budget(family, tokenizer, max_target_length) -> int: text ids a summary may have
    encode_prompt(family, tokenizer, prompt_text_ids) -> ids a model reads (training and generation)
    training_example(family, prompt_text_ids, summary_text_ids, tokenizer, max_target_length=None)
        -> {"input_ids", "attention_mask", "labels"}
    data_collator(family, tokenizer, model, pad_to_multiple_of=8) -> a Trainer data collator for such rows
    CausalCollator(pad_token_id, pad_to_multiple_of=8): right-pads causal rows, labels with -100

Generation
    generation_special_tokens(model) -> dict: eos/pad for all, decoder_start (+ forced_bos
        when the checkpoint has one, as BART) for seq2seq
    install_generation_config(model, config) -> GenerationConfig: `config` plus those tokens,
        made the model's own so a checkpoint's generation_config.json injects nothing
    generate_continuations(model, tokenizer, batch_prompt_ids, generation_config) -> list of the
        generated ids of each continuation only, up to and including its first EOS (plain models
        and peft adapters alike; a prompt-tuned causal model gets its virtual tokens after the
        left padding, so its batched results too equal one-at-a-time ones)

PEFT targets (peft 0.21's own per-architecture defaults, never a table of ours)
    default_target_modules(config, method) -> list[str] (method "lora" or "ia3")
    default_feedforward_modules(config) -> list[str] (IA3's feed-forward subset)
    fan_in_fan_out(model, target_modules) -> bool (True for GPT-2's Conv1D layers; LoRA and IA3)
    missing_target_modules(model, target_modules) -> names matching no module, matched as peft does

Decoder-only layout: the input is the prompt (with BOS if the tokenizer adds one), then the
summary, then EOS; labels are -100 over the prompt, so the loss covers the summary and its EOS
only (the model learns to stop). Generation pads on the left, so every prompt ends where the
continuation starts, and slices the prompt off. Encoder-decoder layout is the pipeline's
original one: encoder input = prompt, labels = summary + EOS (with BART's <s> in front).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from stages.errors import StageError
from stages.hub import hub_revision, load_error
from stages.quantization import check_cpu_4bit_layers, quantization_config, quantized_device

if TYPE_CHECKING:  # importing it loads transformers' modeling code (~1.7 s), which prepare never runs
    from transformers import PreTrainedModel

Family = Literal["seq2seq", "causal"]
SEQ2SEQ: Family = "seq2seq"
CAUSAL: Family = "causal"
IGNORE_INDEX = -100  # label value PyTorch's cross-entropy (and every HF model's loss) skips
PAD_TO_MULTIPLE_OF = 8  # tensor-core friendly shapes; the collator and generation pad alike


# --------------------------------------------------------------------------- identity and loading


def family(config: PretrainedConfig) -> Family:
    """ "seq2seq" for encoder-decoder models, else "causal" (a decoder-only LM)."""
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def continues_prompt(model_family: Family) -> bool:
    """Whether the summary follows its prompt in one token sequence (decoder-only) rather than
    being a sequence of its own (seq2seq labels): then the two are tokenized at one boundary."""
    return model_family == CAUSAL


def auto_model_class(model_family: Family):
    return AutoModelForSeq2SeqLM if model_family == SEQ2SEQ else AutoModelForCausalLM


def task_type(model_family: Family):
    """The peft TaskType: it picks the PeftModel subclass whose forward/generate fit the family
    (prompt tuning prepends its virtual tokens to the encoder input or to the causal input)."""
    from peft import TaskType  # imported here: only training and adapter loading need peft

    return TaskType.SEQ_2_SEQ_LM if model_family == SEQ2SEQ else TaskType.CAUSAL_LM


def load_config(name: str, revision: str = "main") -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name, revision=hub_revision(name, revision), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise load_error(name, revision, error) from None


def load_model(
    name: str,
    revision: str = "main",
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
    device: torch.device | None = None,
    attn_implementation: str = "auto",
) -> PreTrainedModel:
    """The model of its family from safetensors (never trust_remote_code), optionally quantized.

    `attn_implementation` (model.attn_implementation): auto leaves it to transformers, which picks
    the architecture's best supported one (sdpa for T5, Llama, BART, GPT-2 in transformers 5.24);
    eager, sdpa or flex_attention force one, and a model that lacks it is refused with its name.

    The output head stays untied exactly when the checkpoint stores it apart (FLAN-T5) and tied
    when the checkpoint ties it (T5 v1.0, BART, GPT-2): from_pretrained follows the checkpoint,
    and nothing here calls tie_weights() or resize_token_embeddings().

    A quantized model is placed on `device` (default: this process's GPU, else CPU) while it
    loads: bitsandbytes quantizes as the weights arrive, and 8-bit models cannot be moved after.
    Its unquantized parameters (norms, embeddings, output head) load in fp32 whatever `dtype`
    says: peft's k-bit preparation casts them to fp32 for training anyway, so the base an adapter
    is evaluated on is exactly the one it was trained on (in bf16 they would round differently).
    The quantized layers compute in bf16 (quantization_config).
    """
    config = load_config(name, revision)
    kwargs = dict(
        revision=hub_revision(name, revision), dtype=dtype, use_safetensors=True, trust_remote_code=False, config=config
    )
    bnb = quantization_config(quantization)
    if bnb is not None:
        target = str(device) if device is not None else quantized_device(os.environ, torch.cuda.is_available())
        if quantization == "4bit" and target == "cpu":
            check_cpu_4bit_layers(name, auto_model_class(family(config)), config)
        kwargs.update(quantization_config=bnb, device_map={"": target}, dtype=torch.float32)
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    try:
        return auto_model_class(family(config)).from_pretrained(name, **kwargs)
    except ValueError as error:
        if attn_implementation != "auto" and attn_implementation in str(error):
            raise StageError(
                f"model.attn_implementation: {config.model_type} models cannot load with {attn_implementation!r} "
                f"({str(error).splitlines()[0]}); use auto (transformers' best supported one) or eager"
            ) from None
        raise load_error(name, revision, error) from None
    except (OSError, SafetensorError) as error:  # SafetensorError: a truncated weights file
        raise load_error(name, revision, error) from None


def resolved_attn_implementation(model: PreTrainedModel) -> str:
    """The attention implementation a loaded model (or peft wrapper) runs: what auto resolved to."""
    return unwrap(model).config._attn_implementation


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_kbit_training(model: PreTrainedModel, gradient_checkpointing: bool = True) -> PreTrainedModel:
    """peft's preparation of a quantized base for adapter training (a no-op when not quantized):
    freeze the base, keep its unquantized parameters (norms, embeddings) in fp32 for stable
    updates, make the input embeddings' output require grad so gradients reach the adapters
    through checkpointed layers, and (peft's default, QLoRA's recipe) checkpoint activations."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a tokenizer without a pad token (GPT-2, Llama 3, Qwen's base models) pad = EOS.

    Returns True when it set one. Why EOS and not a new "<pad>" token: a new token needs
    resize_token_embeddings(), which adds an untrained row to the model (changing what is
    compared) and silently re-ties a separate output head. A pad token's id is never seen by
    the model: padded positions have attention_mask 0 and label -100, and generation cuts each
    continuation at its first EOS. The one thing that must not happen is deriving masks or
    labels by comparing ids with the pad id, which would also mask the real EOS the model must
    learn: this module pads from lengths (CausalCollator, pad_batch) and never does that.
    """
    if tokenizer.pad_token_id is not None:
        return False
    if tokenizer.eos_token is None:
        raise StageError("the tokenizer has neither a pad nor an end-of-sequence token; generation could not stop")
    tokenizer.pad_token = tokenizer.eos_token
    return True


# --------------------------------------------------------------------------- inputs and labels


@dataclass(frozen=True)
class SpecialTokens:
    """The ids added around a prompt and around a target summary."""

    prompt_prefix: list[int]
    prompt_suffix: list[int]
    target_prefix: list[int]
    target_suffix: list[int]


def tokenizer_additions(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer itself adds before and after a text (T5: none and </s>; BART: <s>
    and </s>; Llama: BOS and none; GPT-2: none), found by encoding a probe with and without them:
    transformers 5's tokenizers-backed classes have no build_inputs_with_special_tokens."""
    probe = "Summary"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise StageError(f"the tokenizer encodes {probe!r} differently with special tokens: {full} vs {plain}")


def special_tokens(model_family: Family, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """seq2seq: prompt and target both get what the tokenizer adds (as the pipeline always did),
    and the target ends with EOS even if the tokenizer adds none.
    causal: the prompt gets the tokenizer's prefix (BOS, the way the tokenizer adds it) but no
    suffix: an EOS there (a T5 tokenizer appends one) would tell the model the text ended before
    the summary; the summary is followed by exactly one EOS, the model's signal to stop."""
    prefix, suffix = tokenizer_additions(tokenizer)
    eos = [tokenizer.eos_token_id]
    if model_family == SEQ2SEQ:
        target_suffix = suffix if suffix[-1:] == eos else suffix + eos
        return SpecialTokens(prefix, suffix, prefix, target_suffix)
    return SpecialTokens(prefix, [], [], eos)


def prompt_text_budget(model_family: Family, tokenizer: PreTrainedTokenizerBase, max_source_length: int) -> int:
    """Text ids a prompt may have so that, with its special tokens, it fits max_source_length."""
    tokens = special_tokens(model_family, tokenizer)
    return max_source_length - len(tokens.prompt_prefix) - len(tokens.prompt_suffix)


def target_text_budget(model_family: Family, tokenizer: PreTrainedTokenizerBase, max_target_length: int) -> int:
    """Text ids a summary may have so that, with its special tokens (EOS), it fits max_target_length."""
    tokens = special_tokens(model_family, tokenizer)
    return max_target_length - len(tokens.target_prefix) - len(tokens.target_suffix)


def encode_prompt(model_family: Family, tokenizer: PreTrainedTokenizerBase, prompt_text_ids: list[int]) -> list[int]:
    """The ids the model reads for a prompt, in training and in generation alike."""
    tokens = special_tokens(model_family, tokenizer)
    return tokens.prompt_prefix + list(prompt_text_ids) + tokens.prompt_suffix


def training_example(
    model_family: Family,
    prompt_text_ids: list[int],
    summary_text_ids: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_target_length: int | None = None,
) -> dict[str, list[int]]:
    """One training row from a prompt and its summary, both as text ids (no special tokens).

    The prompt must already fit (prepare cuts the dialogue, keeping the template's tail); the
    summary is cut here to max_target_length with its EOS kept, so the model always learns to
    stop. seq2seq: input = prompt, labels = summary + EOS. causal: input = prompt, summary, EOS;
    labels -100 over the prompt, so only the summary and its EOS carry loss.
    """
    tokens = special_tokens(model_family, tokenizer)  # once per row: it encodes a probe text
    summary = list(summary_text_ids)
    if max_target_length is not None:
        summary = summary[: max_target_length - len(tokens.target_prefix) - len(tokens.target_suffix)]
    prompt = tokens.prompt_prefix + list(prompt_text_ids) + tokens.prompt_suffix
    target = tokens.target_prefix + summary + tokens.target_suffix
    if model_family == SEQ2SEQ:
        return {"input_ids": prompt, "attention_mask": [1] * len(prompt), "labels": target}
    input_ids = prompt + target
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt) + target,
    }


def pad_batch(
    rows: list[list[int]], value: int, side: str = "right", multiple: int = PAD_TO_MULTIPLE_OF
) -> torch.Tensor:
    """Rows padded with `value` on `side` to the longest (rounded up to `multiple`), as a tensor."""
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    padded = [
        (list(r) + [value] * (width - len(r))) if side == "right" else ([value] * (width - len(r)) + list(r))
        for r in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


@dataclass(frozen=True)
class CausalCollator:
    """Batches causal training rows: right padding (every row starts at position 0, so no
    position ids are needed), attention_mask 0 and labels -100 on padding. Masks come from the
    row lengths, never from comparing ids with pad_token_id (pad may equal EOS)."""

    pad_token_id: int
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        multiple = self.pad_to_multiple_of
        return {
            "input_ids": pad_batch([f["input_ids"] for f in features], self.pad_token_id, "right", multiple),
            "attention_mask": pad_batch([[1] * len(f["input_ids"]) for f in features], 0, "right", multiple),
            "labels": pad_batch([f["labels"] for f in features], IGNORE_INDEX, "right", multiple),
        }


def data_collator(
    model_family: Family,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
):
    """The Trainer's collator: seq2seq as the pipeline always did (DataCollatorForSeq2Seq builds
    the decoder inputs from the labels), causal with CausalCollator. Inputs and labels are padded
    up to a multiple of `pad_to_multiple_of` (train.pad_to_multiple_of: 64 gives torch.compile
    few shapes), labels with -100 there, so padding never changes the loss."""
    if model_family == SEQ2SEQ:
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of
        )
    if tokenizer.pad_token_id is None:
        raise StageError("the tokenizer has no pad token; call ensure_pad_token(tokenizer) first")
    return CausalCollator(tokenizer.pad_token_id, pad_to_multiple_of)


# --------------------------------------------------------------------------- generation


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def generation_special_tokens(model: PreTrainedModel) -> dict[str, int | list[int]]:
    """The special tokens generate() needs, from the model's generation config and config.

    All families: eos_token_id (an int or a list, as Llama 3 Instruct's) and pad_token_id (the
    model's, else its first EOS: a model without a pad token still has to pad finished beams).
    seq2seq: decoder_start_token_id, and forced_bos_token_id when the checkpoint sets one:
    BART's decoder starts with </s> and was trained to emit <s> first, so dropping it (as a
    generation config built from params alone would) shifts every summary by a token. A forced
    token other than the model's BOS is not kept: it is a decoding choice, not the architecture's.
    Decoding choices the checkpoint may also ship (forced_eos_token_id, min_length,
    no_repeat_ngram_size) are not special tokens and are left out: params decide those.
    """
    inner = unwrap(model)
    config, loaded = inner.config, inner.generation_config

    def pick(name: str):
        value = getattr(loaded, name, None)
        return value if value is not None else getattr(config, name, None)

    eos = pick("eos_token_id")
    if eos is None:
        raise StageError("the model defines no eos_token_id; generation could not stop")
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = pick("pad_token_id")
    tokens: dict[str, int | list[int]] = {"eos_token_id": eos, "pad_token_id": first_eos if pad is None else pad}
    if family(config) == SEQ2SEQ:
        tokens["decoder_start_token_id"] = pick("decoder_start_token_id")
        # only a forced BOS (BART's <s>) belongs to the architecture; any other forced first
        # token is a decoding choice a checkpoint must not inject (params decide those)
        forced_bos = pick("forced_bos_token_id")
        if forced_bos is not None and forced_bos == pick("bos_token_id"):
            tokens["forced_bos_token_id"] = forced_bos
    return tokens


def install_generation_config(
    model: PreTrainedModel, config: GenerationConfig, stop_ids: Sequence[int] = ()
) -> GenerationConfig:
    """A copy of `config` with the model's special tokens, made the model's own generation config.
    `stop_ids` join the EOS ids (a chat template's end-of-turn token: generation stops there too).

    generate() fills every setting its `generation_config` argument leaves unset from the
    model's generation_config.json, so a checkpoint could otherwise inject a min_length or a
    repetition penalty into what gets scored. The special tokens are read before the
    replacement, and the installed config keeps them, so installing twice changes nothing.
    """
    installed = copy.deepcopy(config)
    for name, value in generation_special_tokens(model).items():
        setattr(installed, name, value)
    eos = installed.eos_token_id if isinstance(installed.eos_token_id, list) else [installed.eos_token_id]
    extra = [token for token in stop_ids if token not in eos]
    if extra:
        installed.eos_token_id = eos + extra
    unwrap(model).generation_config = installed
    return installed


def is_prompt_tuned(model: PreTrainedModel) -> bool:
    config = getattr(model, "active_peft_config", None)
    return config is not None and getattr(config.peft_type, "value", config.peft_type) == "PROMPT_TUNING"


def virtual_tokens_after_padding(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings [padding][virtual tokens][prompt] for a prompt-tuned causal model, and
    their attention mask.

    peft's own generate puts the virtual tokens in front of the whole left-padded row, [virtual]
    [padding][prompt], and drops position ids, so the prompt's positions (and its distance to
    the virtual tokens) shift with the padding: batched results differ from one-at-a-time ones
    (GPT-2's absolute positions show it at once). Here each row's virtual tokens sit right
    before its first prompt token, and transformers derives position ids from the attention
    mask, so every row sees virtual tokens at 0..n-1 and its prompt from n on, as in training.
    """
    embeds = model.word_embeddings(input_ids)
    virtual = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
    ones = torch.ones(virtual.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
    rows, masks = [], []
    for i, pads in enumerate((attention_mask == 0).sum(dim=1).tolist()):
        rows.append(torch.cat([embeds[i, :pads], virtual[i], embeds[i, pads:]]))
        masks.append(torch.cat([attention_mask[i, :pads], ones[i], attention_mask[i, pads:]]))
    return torch.stack(rows), torch.stack(masks)


def eos_ids(config: GenerationConfig) -> set[int]:
    eos = config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


@torch.inference_mode()
def generate_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_prompt_ids: list[list[int]],
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """The generated ids of each prompt's continuation only, up to and including its first EOS
    (a continuation without EOS hit max_new_tokens). `synced_gpus`: every rank of a sharded model
    steps until all are done (each step all-gathers the shards, so a rank that stopped early would
    leave the others waiting).

    seq2seq: right-padded encoder inputs; the decoder start token is dropped. causal: left
    padding, so every prompt ends at the same position and the continuation starts right after
    it for every row (transformers derives position ids from the attention mask); the prompt
    is sliced off, so no prompt token can appear in a summary. A prompt-tuned causal model gets
    its virtual tokens between the padding and the prompt (see virtual_tokens_after_padding).
    `tokenizer` is unused by the computation but kept so callers need not know which family
    needs what.
    """
    del tokenizer  # the special tokens come from the model (generation_special_tokens)
    inner = unwrap(model)
    model_family = family(inner.config)
    config = install_generation_config(model, generation_config)
    side = "left" if model_family == CAUSAL else "right"
    input_ids = pad_batch(batch_prompt_ids, config.pad_token_id, side)
    attention_mask = pad_batch([[1] * len(r) for r in batch_prompt_ids], 0, side)
    input_ids, attention_mask = input_ids.to(inner.device), attention_mask.to(inner.device)
    if model_family == CAUSAL and is_prompt_tuned(model):
        embeds, attention_mask = virtual_tokens_after_padding(model, input_ids, attention_mask)
        # given embeddings only, generate() returns the new tokens only: nothing to slice off
        output = inner.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config, synced_gpus=synced_gpus
        )
    else:
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=synced_gpus
        )
        output = output[:, input_ids.shape[1] :] if model_family == CAUSAL else output[:, 1:]
    stops = eos_ids(config)
    continuations = []
    for row in output.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        continuations.append(row[:end])
    return continuations


# --------------------------------------------------------------------------- peft targets


def default_target_modules(config: PretrainedConfig, method: str, section: str | None = None) -> list[str]:
    """peft's default target modules for this architecture (`target_modules: auto`): LoRA's
    [q, v] for T5, [q_proj, v_proj] for Llama and BART, [c_attn] for GPT-2; IA3's keys, values
    and feed-forward output ([k, v, wo] for T5, [k_proj, v_proj, down_proj] for Llama)."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )

    mappings = {
        "lora": TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "ia3": TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    }
    if method not in mappings:
        raise StageError(f"no default target modules for method {method!r}; known: {', '.join(mappings)}")
    targets = mappings[method].get(config.model_type)
    if targets is None:
        raise StageError(
            f"peft has no default {method} target modules for model type {config.model_type!r}; "
            f"set {section or method}.target_modules to a list of layer names"
            + (" or all-linear" if method == "lora" else "")
        )
    return [targets] if isinstance(targets, str) else list(targets)


def default_feedforward_modules(config: PretrainedConfig) -> list[str]:
    """peft's IA3 feed-forward subset of default_target_modules(config, "ia3"): the layers whose
    input (the feed-forward's inner activation) is scaled rather than their output."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    modules = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(config.model_type)
    if modules is None:
        raise StageError(
            f"peft has no default ia3 feed-forward modules for model type {config.model_type!r}; "
            "set ia3.feedforward_modules to a list of layer names"
        )
    return list(modules)


def matches(module_name: str, target: str) -> bool:
    """Whether peft's list matching picks `module_name` for `target` (exact or dotted suffix)."""
    return module_name == target or module_name.endswith("." + target)


def targeted_modules(model: torch.nn.Module, target_modules: list[str]) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if any(matches(name, t) for t in target_modules)]


def missing_target_modules(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """Targets that match no module of `model` (a meta-device model will do), matched as peft
    matches a list: a module's full name or a dotted suffix of it ("mlp.c_proj" for GPT-2)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in target_modules if not any(matches(n, t) for n in names)]


def fan_in_fan_out(model: torch.nn.Module, target_modules: list[str] | str) -> bool:
    """True when the targeted layers store their weight as (in, out): GPT-2's Conv1D. For
    LoraConfig and IA3Config alike: peft would switch it on itself with a warning; set
    explicitly, the adapter config records it."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(target_modules, str):  # all-linear: peft targets the Conv1D layers too
        modules = list(model.modules())
    else:
        modules = [m for _, m in targeted_modules(model, target_modules)]
    return any(isinstance(m, Conv1D) for m in modules)
