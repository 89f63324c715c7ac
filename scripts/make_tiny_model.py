#!/usr/bin/env python
"""Write a tiny, randomly initialised model of a tested family (T5, BART, Llama, GPT-2) plus a tokenizer.

The pipeline's tests and smoke runs need a seq2seq checkpoint that loads
offline with the Auto classes and runs in seconds on a CPU. Real FLAN-T5
cannot be downloaded here, so this script builds a stand-in that keeps the
properties of FLAN-T5 (T5 v1.1) that the pipeline code could trip over:

* ``feed_forward_proj="gated-gelu"`` (T5 v1.1 feed-forward blocks);
* an output head ``lm_head`` that is a separate tensor from the shared
  input embedding, saved under its own key, with ``tie_word_embeddings``
  false in ``config.json`` (so the decoder output is not rescaled);
* ``pad=0``, ``eos=1``, ``unk=2``, ``decoder_start_token_id=0``;
* a model vocabulary padded up to a multiple of 128 (FLAN-T5: 32128 rows
  for 32100 tokens), so code that confuses the two is exercised.

``--tied`` builds a T5 v1.0-style model instead (ReLU feed-forward, output head tied to
the shared embedding, ``tie_word_embeddings`` true), so code that handles FLAN-T5's separate
head is also tested on a tied one.

``--family`` picks another architecture, each built from its config class with the published
model's layout scaled down to the same tiny size (see FAMILIES):

* ``bart``: BartConfig as facebook/bart-base (learned positions, GELU, tied head), with the
  ``decoder_start_token_id`` (</s>) and ``forced_bos_token_id`` (<s>) that BART generation needs;
* ``llama``: LlamaConfig as Llama 3 (SwiGLU, RMSNorm, RoPE, grouped-query attention with fewer
  key/value heads than query heads, untied head), a decoder-only model;
* ``gpt2``: GPT2Config as gpt2 (Conv1D layers, learned positions, tied head), decoder-only.

Tokenizers: ``--tokenizer DIR`` copies an existing one (e.g. the real FLAN-T5 tokenizer) for
any family. Otherwise one is trained on a built-in, generated English dialogue corpus: for
``t5`` a SentencePiece Unigram one with T5's layout (appends </s>, pad 0); for the others a
byte-level BPE one trained with `tokenizers`, with the special tokens of the real model:

* ``gpt2``: only ``<|endoftext|>`` (bos = eos = unk), adds nothing, and has NO pad token;
* ``llama``: ``<|begin_of_text|>`` / ``<|end_of_text|>``, adds BOS only, no pad token (Llama 3);
* ``bart``: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, wraps every text in <s> ... </s>.

Usage::

    python scripts/make_tiny_model.py OUT_DIR [--family t5|bart|llama|gpt2] [--tied]
        [--tokenizer DIR] [--seed N] [--width N]

The output is a pure function of the arguments: two runs with the same seed write
bit-identical weights and tokenizer.
"""

from __future__ import annotations

import argparse
import io
import string
import sys
from pathlib import Path

import sentencepiece
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    T5Config,
    T5Tokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the shared dialogue corpus
from dialogue_corpus import dialogue_corpus  # noqa: E402  (its seed, not --seed: --seed varies the weights only)

# run as `python scripts/make_tiny_model.py`: make the repo root importable for stages.modeling
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.modeling import save_model, untie_lm_head  # noqa: E402

# Architecture of the stand-in: FLAN-T5's shape, shrunk to a few hundred
# kilobytes so that building, saving and generating take well under a second.
TINY_ARCH = dict(
    d_model=32,
    d_ff=64,
    d_kv=16,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=2,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
)

FAMILIES = ("t5", "bart", "llama", "gpt2")

# The special tokens of each byte-level BPE family's real tokenizer, and what it adds around a
# text (tokenizer_config.json of facebook/bart-base, meta-llama/Meta-Llama-3-8B and gpt2):
# GPT-2 and Llama 3 have no pad token, Llama adds BOS only, BART wraps a text in <s> ... </s>.
# `first` special tokens take ids 0.. (BART: <s> 0, <pad> 1, </s> 2, <unk> 3); `last` ones
# follow the learned vocabulary (GPT-2's <|endoftext|> is its last id, Llama 3's specials too).
BYTE_LEVEL_TOKENIZERS = {
    "bart": dict(
        first=["<s>", "<pad>", "</s>", "<unk>"],
        last=["<mask>"],
        special=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>"),
        add_bos_token=True,
        add_eos_token=True,
        model_max_length=1024,
    ),
    "llama": dict(
        first=[],
        last=["<|begin_of_text|>", "<|end_of_text|>"],
        special=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=8192,
    ),
    "gpt2": dict(
        first=[],
        last=["<|endoftext|>"],
        special=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=1024,
    ),
}

# T5's special-token layout; the pipeline relies on these ids.
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

# Upper bound on the self-trained tokenizer's size. The built-in corpus only
# supports about 470 pieces (whole common words plus characters), which is
# plenty for tests and keeps the embedding matrix tiny.
TOKENIZER_VOCAB_SIZE = 800

# FLAN-T5 pads its embedding matrix to a multiple of 128 (32100 -> 32128).
VOCAB_PAD_MULTIPLE = 128

# Offset between the seed of the weight initialisation and that of the
# separate output head, so the head is not drawn from the same random
# stream as (and so is no rescaled copy of) the shared embedding.
LM_HEAD_SEED_OFFSET = 1_000_003


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.family == "t5":
        tokenizer = train_tokenizer()
    else:
        tokenizer = train_byte_level_tokenizer(args.family)
    if args.family == "t5":
        model = build_model(
            vocab_size=padded_vocab_size(len(tokenizer)), seed=args.seed, width=args.width, tied=args.tied
        )
        if not args.tied:
            untie_lm_head(model, random_head(model, seed=args.seed))
    else:
        model = build_family_model(args.family, tokenizer, seed=args.seed, width=args.width)
    # safetensors; a config whose head is apart says tie_word_embeddings: false
    save_model(model, tokenizer, out_dir)

    kind = (
        "T5 v1.0 (tied)" if args.tied else {"t5": "T5", "bart": "BART", "llama": "Llama", "gpt2": "GPT-2"}[args.family]
    )
    print(
        f"wrote tiny {kind} (vocab_size={model.config.vocab_size}, "
        f"len(tokenizer)={len(tokenizer)}, seed={args.seed}) to {out_dir}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the model and tokenizer into")
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="copy the tokenizer from this directory (e.g. ../shared/models/flan-t5-small-config) "
        "instead of training a small one",
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="t5",
        help="architecture: t5 (FLAN-T5 / T5 v1.1), bart, llama (decoder-only) or gpt2 (decoder-only) "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--tied",
        action="store_true",
        help="t5 only: a T5 v1.0-style model (ReLU feed-forward, output head tied to the embedding)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    parser.add_argument(
        "--width",
        type=int,
        default=TINY_ARCH["d_model"],
        help="d_model (multiple of 16; d_ff = 2 x width, one head per 16): a wider model has the "
        "capacity to memorize a few real summaries (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.tied and args.family != "t5":
        parser.error(f"--tied builds a T5 v1.0-style model; --family {args.family} has its own head layout")
    if args.width % TINY_ARCH["d_kv"]:
        parser.error(f"--width must be a multiple of {TINY_ARCH['d_kv']} (one attention head per {TINY_ARCH['d_kv']})")
    return args


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(tokenizer_dir: str):
    # AutoTokenizer reads tokenizer.json from the directory. Building
    # T5Tokenizer(vocab_file=...spiece.model) instead silently yields a
    # 4-token vocabulary in transformers 5.x.
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def train_tokenizer() -> T5Tokenizer:
    """Train a small SentencePiece Unigram tokenizer and wrap it as T5Tokenizer.

    SentencePiece is the trainer FLAN-T5's own vocabulary came from, and with
    one thread it is deterministic (the `tokenizers` Unigram trainer is not:
    it orders and scores some pieces by hash-map iteration). Only the learned
    (piece, score) list is taken over; T5Tokenizer supplies T5's
    pre-tokenizer, decoder and "append </s>" post-processor, so the result
    behaves like FLAN-T5's tokenizer.
    """
    model_proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(dialogue_corpus()),
        model_writer=model_proto,
        model_type="unigram",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        # The small corpus may not support the full target size; take what it yields.
        hard_vocab_limit=False,
        # T5's layout: <pad>=0, </s>=1, <unk>=2 and no <s>.
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece=PAD,
        eos_piece=EOS,
        unk_piece=UNK,
        # Every printable ASCII character gets a piece, so any English
        # text round-trips without <unk>.
        required_chars="".join(sorted(set(string.printable.strip()))),
        character_coverage=1.0,
        num_threads=1,  # determinism
        minloglevel=2,  # keep training logs off stderr
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]

    # extra_ids=0: the pipeline never uses T5's span-corruption sentinels.
    # model_max_length=512 matches FLAN-T5's tokenizer_config.json.
    # (Building from the (piece, score) list, not vocab_file=: see load_tokenizer.)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def train_byte_level_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's, Llama 3's and BART's kind) trained with `tokenizers`,
    with the family's special tokens and what its real tokenizer adds around a text.

    Byte-level: every byte has a token, so any text round-trips with no unknown token. The BPE
    trainer is deterministic (merges are ranked by count, ties broken by the pair itself), so the
    tokenizer depends on the built-in corpus alone. transformers builds the post-processor that
    adds BOS and/or EOS from add_bos_token / add_eos_token, as for the real Llama tokenizer.
    """
    spec = BYTE_LEVEL_TOKENIZERS[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(spec["last"]),
        special_tokens=spec["first"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(dialogue_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(spec["last"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        add_bos_token=spec["add_bos_token"],
        add_eos_token=spec["add_eos_token"],
        model_max_length=spec["model_max_length"],
        **spec["special"],
    )


# --------------------------------------------------------------------------- model


def padded_vocab_size(n_tokens: int) -> int:
    return -(-n_tokens // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def build_model(vocab_size: int, seed: int, width: int = TINY_ARCH["d_model"], tied: bool = False):
    """A tiny T5: FLAN-T5's layout (T5 v1.1, gated-GELU, head apart: untied by the caller) or,
    with `tied`, T5 v1.0's (ReLU feed-forward, head tied to the shared embedding, whose decoder
    output is rescaled by d_model**-0.5 before the head)."""
    torch.manual_seed(seed)  # weight init draws from torch's global RNG
    arch = {**TINY_ARCH, "d_model": width, "d_ff": 2 * width, "num_heads": width // TINY_ARCH["d_kv"]}
    if tied:
        arch["feed_forward_proj"] = "relu"
    config = T5Config(
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        # False is ignored by T5Config in transformers 5.x (it forces True and keeps the
        # False only as scale_decoder_outputs); an untied head is untied explicitly by main().
        tie_word_embeddings=tied,
        **arch,
    )
    return AutoModelForSeq2SeqLM.from_config(config)


def build_family_model(family: str, tokenizer, seed: int, width: int = TINY_ARCH["d_model"]):
    """A tiny BART, Llama or GPT-2 from its config class: the published layout (see the comments),
    `width` wide with one attention head per 16 dimensions, 2 layers (per stack), the
    vocabulary exactly the tokenizer's (as bart-base, Llama 3 and gpt2 have), and the special-token
    ids the tokenizer has."""
    torch.manual_seed(seed)  # weight init draws from torch's global RNG
    heads = width // TINY_ARCH["d_kv"]
    tokens = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,  # None for GPT-2 and Llama 3: they have no pad token
    )
    if family == "bart":
        # facebook/bart-base: d_model 768, 6+6 layers, 12 heads, ffn 4 x d_model, 1024 learned
        # positions, GELU, unscaled embeddings, head tied to the shared embedding. Generation
        # starts the decoder with </s> and forces <s> as the first token.
        config = BartConfig(
            d_model=width,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=4 * width,
            decoder_ffn_dim=4 * width,
            max_position_embeddings=1024,
            activation_function="gelu",
            scale_embedding=False,
            tie_word_embeddings=True,
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_bos_token_id=tokenizer.bos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id,
            **tokens,
        )
        model = AutoModelForSeq2SeqLM.from_config(config)
        # BartConfig in transformers 5.x drops forced_bos_token_id (a generation setting now);
        # bart-base/bart-large-cnn ship it, so the saved generation_config.json carries it
        model.generation_config.forced_bos_token_id = tokenizer.bos_token_id
        return model
    if family == "llama":
        # Llama 3 8B: hidden 4096, MLP 14336 (3.5 x hidden, SwiGLU), 32 query heads sharing 8
        # key/value heads (grouped-query attention, 4 per group), RMSNorm eps 1e-5, RoPE theta
        # 500000, 8192 positions, no biases, head apart from the embedding. Meta rounds the MLP
        # width up to a multiple of 256 (14336 = 56 x 256); here to 64, bitsandbytes' 4-bit block:
        # its CPU kernel needs every quantized layer's input width to be a multiple of it.
        config = LlamaConfig(
            hidden_size=width,
            intermediate_size=-(-7 * width // 2 // 64) * 64,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            head_dim=TINY_ARCH["d_kv"],
            hidden_act="silu",
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            **tokens,
        )
    else:
        # gpt2: n_embd 768, 12 layers, 12 heads, MLP 4 x n_embd (Conv1D layers), 1024 learned
        # positions, gelu_new, head tied to the token embedding.
        config = GPT2Config(
            n_embd=width,
            n_layer=2,
            n_head=heads,
            n_positions=1024,
            activation_function="gelu_new",
            tie_word_embeddings=True,
            **tokens,
        )
    return AutoModelForCausalLM.from_config(config)


def random_head(model, seed: int) -> torch.Tensor:
    """A fresh output head for FLAN-T5's separate lm_head (from_config ties it to the embedding).

    Drawn from its own generator so it is no rescaled copy of the shared embedding; std
    d_model**-0.5 keeps the unscaled logits of order one.
    """
    generator = torch.Generator().manual_seed(seed + LM_HEAD_SEED_OFFSET)
    shared = model.shared.weight
    return torch.randn(shared.shape, generator=generator, dtype=shared.dtype) * shared.shape[1] ** -0.5


if __name__ == "__main__":
    sys.exit(main())
