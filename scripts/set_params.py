"""Set params.yaml values in place, with `dvc exp run -S`'s syntax and code, then check the file.

    python scripts/set_params.py model.name=/tmp/tiny-t5 data.limit=30 'variants=[full,lora]'
    dvc repro

For a first run in a fresh clone (the offline smoke run): `dvc exp run -S` would first check out
every output the (absent) dvc.lock records and print "No file hash info found ... It won't be
created" once per output. Editing params.yaml and running `dvc repro` reaches the same pipeline
without that. The edit goes through DVC's own override code (dvc.utils.hydra, which `-S` uses), so
comments and layout stay; the result is checked with stages/params.py, and a file with problems is
put back as it was. `git checkout params.yaml` undoes the edit.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/ from any working directory

from dvc.utils.hydra import apply_overrides  # noqa: E402

from stages.errors import run_stage  # noqa: E402
from stages.params import PARAMS_FILE, load_params  # noqa: E402


def main(overrides: list[str], path: Path = PARAMS_FILE) -> None:
    original = path.read_text()
    apply_overrides(path, overrides)
    try:
        load_params(path)
    except Exception:
        path.write_text(original)  # never leave a params.yaml that no stage accepts
        raise
    print(f"{path}: set {', '.join(overrides)}")


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1:]))
