"""The pipeline's stages. Importing the package (every `python -m stages.<name>` does, first) quiets
log output that is known and harmless, so what a user reads in `dvc repro`'s log is the stages' own
lines and real warnings. Only what is listed here is silenced, each for a stated reason.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import warnings

if not sys.stderr.isatty():
    # Hub downloads, weight loading and shard writing draw tqdm bars; in a log file (dvc repro's
    # output, CI) each redraw is a line of noise. transformers and huggingface_hub both honour this
    # variable; the stages' own progress (stages/progress.py) prints periodic lines instead.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# bitsandbytes (QLoRA) tries, on import on an AVX512-BF16 CPU, to fetch an optional faster CPU
# kernel from the Hub and warns when it cannot (offline, or without the `kernels` package); it then
# uses its own kernel, with the same results. Errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`; keeps every other."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# FLAN-T5 keeps its output head apart from the embedding while its config says
# tie_word_embeddings: true; transformers notices both tensors in the checkpoint, keeps them apart
# (what this project wants: stages/modeling.py) and says so on every load. Tying is checked by tests.
logging.getLogger("transformers.modeling_utils").addFilter(
    _DropMessage("The tied weights mapping and config for this model specifies to tie")
)


class _DropTiedEmbeddingAliases(logging.Filter):
    """Drops the Trainer's "missing keys" warning when every missing key is a seq2seq model's
    encoder/decoder `embed_tokens.weight`: T5, mT5 and BART tie both to `shared.weight` (one
    tensor), safetensors stores it once, and loading `shared.weight` restores all three; any other
    missing key still warns. (tests/test_validation.py checks the aliases after the best-checkpoint reload.)"""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith(self.PREFIX):
            return True
        try:
            keys = ast.literal_eval(message[len(self.PREFIX) :].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        aliases = [k.endswith(("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")) for k in keys]
        return not (keys and all(aliases))


# load_best_model_at_end reloads the chosen checkpoint; for a seq2seq model transformers lists the
# tied embedding aliases as missing although they were restored through `shared.weight`
logging.getLogger("transformers.trainer").addFilter(_DropTiedEmbeddingAliases())

# peft 0.21 asks transformers 5.24 for `is_gradient_checkpointing`, which transformers renamed;
# the answer is the same, and the warning is peft's to fix (a newer peft), not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
