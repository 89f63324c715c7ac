"""Method type `prompt_tuning`: freeze the base model and train a soft prompt for it (peft).

Prompt tuning (Lester et al. 2021) prepends `num_virtual_tokens` trainable embeddings to
the model input (the encoder's for seq2seq models); nothing inside the model changes, so it cannot be merged and is evaluated
as an adapter (peft prepends the prompt, and ones to the attention mask, in generate()). Its own
code is the init: the soft prompt starts from the embeddings of a text or of common tokens.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedTokenizerBase

from stages import family
from stages.method_params import MethodParams, PromptParams
from stages.methods.plan import Plan
from stages.modeling import load_tokenizer, save_adapter
from stages.params import ModelParams

COMMON_TOKENS = 5000  # Lester et al. 2021 Sec. 2.1 sample the init from the 5,000 most common tokens


def prompt_config(params: PromptParams, model_family: str = family.SEQ2SEQ) -> PromptTuningConfig:
    """PromptTuningConfig from params for a model of `model_family`: the prompt goes before the
    encoder input (seq2seq) or before the prompt (causal; stages/family.py keeps it right before
    the prompt under left padding too).

    num_transformer_submodules=1: peft's seq2seq default (2) allocates a second block of
    num_virtual_tokens rows for the decoder that prompt tuning never uses, so the trainable
    count (and the saved adapter) would be twice what trains. peft's own text and sample_vocab
    inits are not used (see `init_token_ids`): peft starts from random rows, `build_model`
    overwrites them.
    """
    return PromptTuningConfig(
        task_type=family.task_type(model_family),
        num_virtual_tokens=params.num_virtual_tokens,
        num_transformer_submodules=1,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


def init_token_ids(params: PromptParams, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[int] | None:
    """The vocabulary rows the soft prompt starts from, or None for random rows.

    text: the init text's tokens without special tokens, repeated to fill the virtual tokens
    (peft tokenizes with them, so FLAN-T5's </s> lands in the prompt once per repetition).
    sample_vocab: seeded draws from the most common real tokens, never special tokens and never
    the embedding's padding rows past the vocabulary (FLAN-T5 has 32,128 rows for 32,100 tokens);
    SentencePiece and BPE vocabularies list frequent tokens first.
    """
    count = params.num_virtual_tokens
    if params.init == "text":
        ids = tokenizer(params.init_text, add_special_tokens=False)["input_ids"]
        return (ids * math.ceil(count / len(ids)))[:count]
    if params.init == "sample_vocab":
        special = set(tokenizer.all_special_ids)
        common = [i for i in range(len(tokenizer)) if i not in special][:COMMON_TOKENS]
        draws = torch.randint(len(common), (count,), generator=torch.Generator().manual_seed(seed))
        return [common[j] for j in draws.tolist()]
    return None


def build_model(base, config: PromptTuningConfig, token_ids: list[int] | None):
    model = get_peft_model(base, copy.deepcopy(config))  # a copy: peft writes into the config it gets
    if token_ids is not None:
        rows = base.get_input_embeddings().weight[token_ids].detach().float()
        model.prompt_encoder["default"].embedding.weight.data.copy_(rows)
    return model


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    params: PromptParams = section.config
    config = prompt_config(params, family.family(family.load_config(base.name, base.revision)))
    token_ids = init_token_ids(params, load_tokenizer(base.name, base.revision), seed)
    return Plan(
        build=partial(build_model, config=config, token_ids=token_ids),
        save=save_adapter,
        library="peft",
        frozen_base=True,  # the base in bf16 under bf16 training; the soft prompt stays fp32
    )
