"""The pipeline's stages. Importing the package (every `python -m stages.<name>` does, first) quiets
log output that is known and harmless, so what a user reads in `dvc repro`'s log is the stages' own
lines and real warnings. Only what is listed here is silenced, each for a stated reason. In a stage
process whose params quantize nothing, it also keeps bitsandbytes unimported (see below).
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml

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


def is_stage_process(orig_argv: list[str]) -> bool:
    """True when this process runs a stage as a program (`python -m stages.<name>`: how dvc.yaml,
    stages.launch and torchrun start them), not a test or notebook that imports a stage module."""
    return any(flag == "-m" and module.startswith("stages.") for flag, module in zip(orig_argv, orig_argv[1:]))


def quantizes(params_file: Path) -> bool:
    """Whether any section of `params_file` sets `quantization` to other than none (QLoRA).
    An unreadable file counts as quantizing: the stage then imports as usual and reports the file."""
    try:
        sections = yaml.safe_load(params_file.read_text())
    except (OSError, yaml.YAMLError):
        return True
    if not isinstance(sections, dict):
        return True
    return any(
        isinstance(section, dict) and section.get("quantization", "none") != "none" for section in sections.values()
    )


# peft imports bitsandbytes whenever it is installed, and bitsandbytes 0.50 wraps its CPU kernels in
# torch.compile at import, which loads TorchDynamo and Inductor: ~3.5 s of a 2-core machine in each
# of the 7 stages that import peft (the Trainer imports it too), a quarter of the smoke run. Where
# no params section quantizes, no stage loads a quantized model, so bitsandbytes is marked absent
# (None in sys.modules: `import` raises ImportError, and peft's, transformers' and accelerate's
# find_spec checks answer "not installed"). stages.quantization.quantization_config says so if a
# quantized load is asked for anyway. Tests and notebooks that import a stage are left as they are.
if is_stage_process(sys.orig_argv) and not quantizes(Path("params.yaml")):
    sys.modules.setdefault("bitsandbytes", None)
