#!/usr/bin/env python
"""Write a randomly initialised model of a real FLAN-T5 shape as a local checkpoint for `model.name`.

For timing runs where the real weights cannot be downloaded (an offline GPU machine has no
network): the architecture and tokenizer come from a config folder such as
../shared/models/flan-t5-base-config (config.json + tokenizer files, no weights), the weights
are random. Like FLAN-T5 checkpoints, and like scripts/make_tiny_model.py, the output head
`lm_head` is a tensor of its own (from_config ties it to the embedding; it is untied here with
fresh values) and config.json says `tie_word_embeddings: false`.

Usage::

    python scripts/make_random_model.py OUT_DIR [--config DIR] [--seed N]

ROUGE of such a model says nothing about FLAN-T5; its speed and memory are those of the real shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

# run as `python scripts/make_random_model.py`: make the repo root importable for stages.modeling
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.modeling import head_is_tied, load_model, save_model, untie_lm_head  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "models" / "flan-t5-base-config"
LM_HEAD_SEED_OFFSET = 1_000_003  # the head gets its own random stream, as in make_tiny_model.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model and tokenizer into")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="folder with config.json and the tokenizer (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    args = parser.parse_args(argv)

    config = AutoConfig.from_pretrained(args.config)
    tokenizer = AutoTokenizer.from_pretrained(args.config)
    torch.manual_seed(args.seed)  # from_config draws its initialisation from torch's global RNG
    model = AutoModelForSeq2SeqLM.from_config(config)
    shared = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(args.seed + LM_HEAD_SEED_OFFSET)
    # std d_model**-0.5 keeps the logits of order one (T5 v1.1 does not rescale the decoder output)
    head = torch.randn(shared.shape, generator=generator, dtype=shared.dtype) * shared.shape[1] ** -0.5
    untie_lm_head(model, head)
    save_model(model, tokenizer, args.out_dir)

    # the checkpoint must load as the pipeline loads it, with the head apart and unchanged
    loaded = load_model(str(args.out_dir))
    if head_is_tied(loaded) or not torch.equal(loaded.get_output_embeddings().weight, head):
        print(f"error: {args.out_dir} does not load with its own output head", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in loaded.parameters())
    print(f"wrote random {args.config.name} ({params / 1e6:.1f}M parameters, seed {args.seed}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
