#!/usr/bin/env python
"""What fits before a GPU hour is spent: each method's expected peak training memory, from the config.

    python scripts/what_fits.py                       # params.yaml's model and methods, the visible GPU
    python scripts/what_fits.py --gpu-gib 80          # a named card size instead
    python scripts/what_fits.py --model meta-llama/Llama-3.1-8B --source-tokens 1024 --target-tokens 256

For every method of `methods`: its trainable params (the method built by peft on a meta model: shapes,
no weights), and the bytes of what training holds at its peak (docs/scaling-out.md has the arithmetic):

- weights: full fine-tuning keeps fp32 master weights (4 B/param) and, under bf16 autocast, a bf16 copy
  of each weight for the step (2 B/param); a PEFT method's frozen base is bf16 under bf16 training
  (2 B/param), fp32 otherwise, and a 4-bit base 0.5 B per quantized weight;
- gradients: 4 B per trainable param;
- optimizer state per trainable param: AdamW 8 B (two fp32 moments), 8-bit AdamW 2 B, Adafactor its
  factored second moment (4 B x (rows + columns) per matrix);
- activations per sample, for each transformer block at the recipe's longest batch (the prepare
  lengths: a length-grouped batch pads to its longest row): every linear layer's input, the attention
  scores with their fp32 softmax and dropout mask, the norms' fp32 inputs, the feed-forward's inner
  activations; then the logits with their fp32 copy and gradient. With gradient checkpointing only each
  block's input stays, plus one block recomputed at a time.
- sharding: fsdp divides weights, gradients and optimizer state by the processes and adds the largest
  block gathered whole.

It estimates allocated tensors (what torch.cuda.max_memory_allocated reports, as the cost tables do);
the CUDA context adds ~0.5 GiB on top. Checked against measured peaks in tests/test_what_fits.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # stages/ from the repo root

from stages import family, methods  # noqa: E402
from stages.method_params import EIGHT_BIT_OPTIMIZERS, MethodParams  # noqa: E402
from stages.modeling import head_is_tied, meta_model, untie_lm_head  # noqa: E402
from stages.params import ModelParams, Params, load_params  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes activations depend on, read from the model's config."""

    hidden: int
    heads: int
    ffn: int
    gated: bool  # two up-projections (T5 v1.1's gated-GELU, Llama's SwiGLU)
    encoder_layers: int  # 0 for a decoder-only model
    decoder_layers: int
    vocab: int


def shape(model: torch.nn.Module) -> Shape:
    config = model.config
    hidden = config.hidden_size
    ffn = next(
        (
            getattr(config, k)
            for k in ("d_ff", "intermediate_size", "encoder_ffn_dim", "n_inner")
            if getattr(config, k, None)
        ),
        4 * hidden,
    )
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    seq2seq = family.family(config) == family.SEQ2SEQ
    decoder = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    return Shape(
        hidden=hidden,
        heads=config.num_attention_heads,
        ffn=ffn,
        gated=bool({"wi_0", "gate_proj"} & names),
        encoder_layers=config.num_hidden_layers if seq2seq else 0,
        decoder_layers=(decoder or config.num_hidden_layers) if seq2seq else config.num_hidden_layers,
        vocab=config.vocab_size,
    )


def attention_bytes(s: int, s_kv: int, h: int, a: int, e: int) -> int:
    # inputs of q/k/v and o (and their outputs kept for the score and value products): 6 x s x h at e
    # bytes; the fp32 norm input before it; scores at e, their fp32 softmax and a 1-byte dropout mask
    return s * h * (6 * e + 4) + a * s * s_kv * (e + 4 + 1)


def mlp_bytes(s: int, h: int, f: int, gated: bool, e: int) -> int:
    # the block input (e) and its fp32 norm input; each up-projection's output, the activation's output
    # (the down-projection's input) and its 1-byte dropout mask
    return s * h * (e + 4) + s * f * ((2 if gated else 1) * e + e + 1)


def activation_bytes(sh: Shape, source: int, target: int, e: int, checkpointing: bool) -> int:
    """One sample's activations at the peak (the end of the forward)."""
    h, a, f = sh.hidden, sh.heads, sh.ffn
    if sh.encoder_layers:  # seq2seq: the encoder over the source, the decoder over the target
        encoder = attention_bytes(source, source, h, a, e) + mlp_bytes(source, h, f, sh.gated, e)
        decoder = (
            attention_bytes(target, target, h, a, e)
            + attention_bytes(target, source, h, a, e)  # cross-attention onto the encoder's output
            + mlp_bytes(target, h, f, sh.gated, e)
        )
        blocks = [(encoder, source)] * sh.encoder_layers + [(decoder, target)] * sh.decoder_layers
        logits_len = target
    else:  # decoder-only: prompt and summary in one sequence
        s = source + target
        block = attention_bytes(s, s, h, a, e) + mlp_bytes(s, h, f, sh.gated, e)
        blocks, logits_len = [(block, s)] * sh.decoder_layers, s
    logits = logits_len * sh.vocab * (e + 4 + 4)  # the logits, their fp32 copy (the loss) and its gradient
    if checkpointing:  # each block's input kept, one block's activations recomputed at a time
        return sum(s * h * e for _, s in blocks) + max(b for b, _ in blocks) + logits
    return sum(b for b, _ in blocks) + logits


def optimizer_bytes(trainable: list[torch.Tensor], optimizer: str) -> int:
    if optimizer in EIGHT_BIT_OPTIMIZERS:
        return sum(2 * p.numel() for p in trainable)  # two moments of 1 byte (block scales are ~1%)
    if optimizer == "adafactor":  # transformers' Adafactor: no first moment; a factored second moment
        return sum(4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel() for p in trainable)
    return sum(8 * p.numel() for p in trainable)


def built_on_meta(section: MethodParams, model_params: ModelParams, seed: int) -> torch.nn.Module:
    """The method's model on the meta device: the base, or peft's wrapper with its trainable weights."""
    plan = methods.plan(section, model_params, seed)
    base = meta_model(model_params)
    if head_is_tied(base) and getattr(base.config, "scale_decoder_outputs", True) is False:
        # from_config ties the head; the checkpoint (FLAN-T5) keeps it apart, and so does the loaded model
        untie_lm_head(base, base.get_output_embeddings().weight)
    return plan.build(base)


def estimate(
    section: MethodParams,
    model_params: ModelParams,
    params: Params,
    bf16: bool,
    source: int,
    target: int,
    seed: int = 0,
) -> dict[str, float]:
    """The method's expected peak training memory, in bytes by part, at its recipe's batch."""
    recipe = section.recipe
    model = built_on_meta(section, model_params, seed)
    inner = family.unwrap(model)
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    frozen = [p for p in parameters if not p.requires_grad]
    quantized = getattr(section.config, "quantization", "none")
    if section.type == "full":
        weights = sum(p.numel() for p in parameters) * (4 + (2 if bf16 else 0))
    else:
        frozen_bytes = 2 if bf16 else 4
        if quantized == "4bit":  # linear weights packed 2 per byte; norms and embeddings stay fp32
            linear = {id(m.weight) for m in inner.modules() if isinstance(m, torch.nn.Linear)}
            linear.discard(id(inner.get_output_embeddings().weight))
            weights = sum(p.numel() * (0.5 if id(p) in linear else 4) for p in frozen)
        else:
            weights = sum(p.numel() for p in frozen) * frozen_bytes
        weights += sum(p.numel() for p in trainable) * 4  # adapters train in fp32
    gradients = sum(4 * p.numel() for p in trainable)
    state = optimizer_bytes(trainable, recipe.optimizer)
    sharded = weights + gradients + state
    if recipe.sharding == "fsdp":
        sh = shape(inner)
        block = 12 * sh.hidden * sh.hidden + (3 if sh.gated else 2) * sh.hidden * sh.ffn
        sharded = sharded / recipe.processes + 2 * block * 4  # the largest block gathered, and the next prefetched
    e = 2 if bf16 else 4
    activations = recipe.batch_size * activation_bytes(shape(inner), source, target, e, recipe.gradient_checkpointing)
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "weights": weights,
        "gradients": gradients,
        "optimizer": state,
        "model_states": sharded,  # weights + gradients + optimizer state, per process
        "activations": activations,
        "total": sharded + activations,
    }


def gpu_gib(named: float | None) -> tuple[float | None, str]:
    if named is not None:
        return named, f"a {named:g} GiB card"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return properties.total_memory / GIB, properties.name
    return None, "no GPU visible (name one with --gpu-gib)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hub id or local model directory (default: params.yaml model.name)")
    parser.add_argument("--gpu-gib", type=float, help="the card's memory in GiB (default: the visible GPU's)")
    parser.add_argument("--source-tokens", type=int, help="longest prompt (default: prepare.max_source_length)")
    parser.add_argument("--target-tokens", type=int, help="longest summary (default: prepare.max_target_length)")
    parser.add_argument("--fp32", action="store_true", help="estimate fp32 training (CPU, or precision: fp32)")
    args = parser.parse_args()
    params = load_params()
    model_params = dataclasses.replace(params.model, name=args.model) if args.model else params.model
    source = args.source_tokens or params.prepare.max_source_length
    target = args.target_tokens or params.prepare.max_target_length
    card, card_name = gpu_gib(args.gpu_gib)
    print(f"{model_params.name}, {source} source / {target} target tokens, {'fp32' if args.fp32 else 'bf16'}; "
          f"{card_name}")  # fmt: skip
    print("| method | trainable | batch | weights | grads | optimizer | activations | total GiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in params.methods:
        section = params.method(method)
        est = estimate(section, model_params, params, not args.fp32, source, target, params.seeds[0])
        fits = "-" if card is None else ("yes" if est["total"] / GIB < 0.9 * card else "no")  # 10% for the allocator
        print(f"| {method} | {est['trainable_params']:,} | {section.recipe.batch_size} | {est['weights'] / GIB:.2f} | "
              f"{est['gradients'] / GIB:.2f} | {est['optimizer'] / GIB:.2f} | {est['activations'] / GIB:.2f} | "
              f"{est['total'] / GIB:.2f} | {fits} |")  # fmt: skip


if __name__ == "__main__":
    main()
