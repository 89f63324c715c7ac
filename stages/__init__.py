"""The pipeline's stages. Importing the package (every `python -m stages.<name>` does, first) quiets
log output that is known and harmless, so what a user reads in `dvc repro`'s log is the stages' own
lines and real warnings. Only what is listed here is silenced, each for a stated reason.
"""

from __future__ import annotations

import logging
import os
import sys

if not sys.stderr.isatty():
    # Hub downloads, weight loading and shard writing draw tqdm bars; in a log file (dvc repro's
    # output, CI) each redraw is a line of noise. transformers and huggingface_hub both honour this
    # variable; the stages' own progress (stages/progress.py) prints periodic lines instead.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# bitsandbytes (QLoRA) tries, on import on an AVX512-BF16 CPU, to fetch an optional faster CPU
# kernel from the Hub and warns when it cannot (offline, or without the `kernels` package); it then
# uses its own kernel, with the same results. Errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
