"""Tests for benchmarks/speed.py's MFU inputs: counted training FLOPs and the per-card bf16 peak."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config, T5ForConditionalGeneration

from benchmarks.speed import CPU_ATTENTION_FLOPS, peak_bf16, step_flops
from scripts.make_tiny_model import TINY_ARCH
from stages.modeling import untie_lm_head

# DialogSum-like lengths: a prompted dialogue is about 4x its summary
SOURCE, TARGET, BATCH = 256, 64, 2


def tiny_config() -> T5Config:
    """FLAN-T5's family (T5 v1.1 gated-gelu) at make_tiny_model.py's size, FLAN vocabulary, no dropout."""
    return T5Config(vocab_size=32128, decoder_start_token_id=0, **{**TINY_ARCH, "dropout_rate": 0.0})


def flan_t5_base_config() -> T5Config:
    """google/flan-t5-base's geometry (its config.json), without touching the Hub."""
    return T5Config(
        vocab_size=32128,
        d_model=768,
        d_ff=2048,
        d_kv=64,
        num_heads=12,
        num_layers=12,
        num_decoder_layers=12,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )


def build(config: T5Config) -> T5ForConditionalGeneration:
    """The model with FLAN-T5's separate output head (T5's constructor ties it to the embedding), so the
    parameter count the old formula multiplied is FLAN-T5's."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).train()
    untie_lm_head(model, torch.empty_like(model.shared.weight))
    return model


def analytic_forward_flops(c: T5Config, batch: int, source: int, target: int) -> dict[str, int]:
    """Forward matmul FLOPs per stack, derived by hand (2 FLOPs per multiply-add).

    encoder layer: q, k, v, o (4 d x inner) and the gated FFN (wi_0, wi_1, wo: 3 d x d_ff) on every source
      token, plus QK^T and attention x V (source x source x inner each).
    decoder layer: the same on every target token (self-attention over target x target), plus
      cross-attention: q and o on target tokens, k and v on the *source* tokens (encoder output),
      and target x source scores and weighted sum.
    head: d x vocab on every target token. Embeddings, norms and position biases do no matmuls.
    """
    d, inner, ff = c.d_model, c.num_heads * c.d_kv, c.d_ff
    layer = 4 * d * inner + 3 * d * ff  # matmul parameters of one encoder layer (= decoder's self part)
    encoder = 2 * source * layer + 2 * 2 * source * source * inner
    decoder = (
        2 * target * layer
        + 2 * 2 * target * target * inner
        + 2 * target * 2 * d * inner
        + 2 * source * 2 * d * inner
        + 2 * 2 * target * source * inner
    )
    return {
        "encoder": batch * c.num_layers * encoder,
        "decoder": batch * c.num_decoder_layers * decoder,
        "lm_head": batch * 2 * target * d * c.vocab_size,
    }


def old_formula(model: torch.nn.Module, batch: int, source: int, target: int) -> int:
    """What speed.py used to count: 6 x all parameters x (source + target tokens)."""
    return 6 * sum(p.numel() for p in model.parameters()) * batch * (source + target)


def tiny_model() -> T5ForConditionalGeneration:
    return build(tiny_config())


def batch_of(source: int, target: int, device: str = "cpu", mask: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 32000, (BATCH, source), generator=generator)
    labels = torch.randint(2, 32000, (BATCH, target), generator=generator)
    batch = {"input_ids": ids, "labels": labels}
    if mask:
        batch["attention_mask"] = torch.ones_like(ids)
    return {k: v.to(device) for k, v in batch.items()}


# --- counted FLOPs vs the hand-derived per-stack count ----------------------------------------


def test_forward_flops_match_the_per_stack_count() -> None:
    model, config = tiny_model(), tiny_config()
    expected = analytic_forward_flops(config, BATCH, SOURCE, TARGET)
    assert step_flops(model, batch_of(SOURCE, TARGET), backward=False) == pytest.approx(
        sum(expected.values()), rel=0.02
    )
    # per stack, from the counter's module breakdown (forward only: it attributes backward less reliably)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        model(**batch_of(SOURCE, TARGET))
    by_module = counter.get_flop_counts()
    for stack, flops in expected.items():
        assert sum(by_module[f"T5ForConditionalGeneration.{stack}"].values()) == pytest.approx(flops, rel=0.02)


def test_training_step_counts_backward_as_twice_the_forward() -> None:
    model = tiny_model()
    forward = step_flops(model, batch_of(SOURCE, TARGET), backward=False)
    assert step_flops(model, batch_of(SOURCE, TARGET)) == pytest.approx(3 * forward, rel=0.02)
    assert all(p.grad is None for p in model.parameters())  # counting leaves the model as it found it


def test_padding_positions_are_counted_like_tokens() -> None:
    # the padded batch is what the GPU computes: masking half the source changes no matmul shape
    model = tiny_model()
    padded = batch_of(SOURCE, TARGET)
    padded["attention_mask"][:, SOURCE // 2 :] = 0
    assert step_flops(model, padded) == step_flops(model, batch_of(SOURCE, TARGET))


def test_encoder_flops_grow_with_source_only() -> None:
    # Doubling the source adds encoder work and cross-attention k/v and scores, never decoder-only work.
    model, config = tiny_model(), tiny_config()
    grown = step_flops(model, batch_of(2 * SOURCE, TARGET), backward=False) - step_flops(
        model, batch_of(SOURCE, TARGET), backward=False
    )
    expected = {
        k: analytic_forward_flops(config, BATCH, 2 * SOURCE, TARGET)[k]
        - analytic_forward_flops(config, BATCH, SOURCE, TARGET)[k]
        for k in ("encoder", "decoder", "lm_head")
    }
    assert expected["lm_head"] == 0
    assert grown == pytest.approx(sum(expected.values()), rel=0.02)


# --- how far the old 6 x params x tokens formula was off ---------------------------------------


def test_old_formula_overstates_tiny_model_by_the_derived_factor() -> None:
    model, config = tiny_model(), tiny_config()
    counted = step_flops(model, batch_of(SOURCE, TARGET))
    derived = 3 * sum(analytic_forward_flops(config, BATCH, SOURCE, TARGET).values())
    old = old_formula(model, BATCH, SOURCE, TARGET)
    # At width 32 the two 32128 x 32 embedding matrices are most of the parameters; the input one does
    # no matmul at all and the head only sees target tokens, so the old count is several times too high.
    assert old / counted == pytest.approx(old / derived, rel=0.03)
    assert old / counted > 3


def test_old_formula_overstates_flan_t5_base_about_2_3x() -> None:
    # flan-t5-base, per example at source 256 / target 64 (d = inner = 768, d_ff = 2048, 12 + 12 layers):
    #   encoder 12 x (2*256*7.08M + 4*256^2*768)                    = 45.9 GFLOP
    #   decoder 12 x (2*64*7.08M + 4*64^2*768 + 2*64*1.18M          = 20.7 GFLOP
    #                 + 2*256*1.18M + 4*64*256*768)
    #   head 2*64*768*32128                                          =  3.2 GFLOP
    #   forward 69.7 GFLOP, training step x3 = 209 GFLOP
    #   old: 6 x 247.6M params x 320 tokens                          = 475 GFLOP -> 2.27x too high
    # Counted on the meta device: the real architecture's shapes, no memory or time spent.
    with torch.device("meta"):
        model = build(flan_t5_base_config())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(247.6e6, rel=0.001)  # flan-t5-base's
    batch = batch_of(SOURCE, TARGET, device="meta", mask=False)  # masks on meta need .item(); shapes suffice
    counted = step_flops(model, batch)
    assert counted == pytest.approx(
        3 * sum(analytic_forward_flops(flan_t5_base_config(), BATCH, SOURCE, TARGET).values()), rel=0.02
    )
    assert counted / BATCH == pytest.approx(209e9, rel=0.01)
    assert old_formula(model, BATCH, SOURCE, TARGET) / counted == pytest.approx(2.27, rel=0.02)


# --- peak per card ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "card", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", "H100 NVL", 835e12),
        ("NVIDIA H200", "H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
        ("NVIDIA A100 80GB PCIe", "A100", 312e12),
        ("NVIDIA L4", "L4", 121e12),
        ("NVIDIA A10", "A10", 125e12),
    ],
)
def test_peak_by_device_name(name: str, card: str, peak: float) -> None:
    assert peak_bf16(name) == (card, peak)


@pytest.mark.parametrize(
    "name", ["NVIDIA A10G", "NVIDIA L40S", "NVIDIA GH200 480GB", "Tesla T4", "NVIDIA GeForce RTX 4090"]
)
def test_unknown_cards_get_no_peak(name: str) -> None:
    # near-misses by substring ("A10" in "A10G", "L4" in "L40S") have other peaks: no MFU beats a wrong one
    assert peak_bf16(name) is None
