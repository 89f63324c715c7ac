"""A prepared split read without the `datasets` library.

stages/prepare.py saves each split with `datasets` (data/prepared/<split>/: Arrow IPC stream files
listed in state.json). The generate stages need three columns of the test split, and importing
`datasets` (with the pandas it imports) costs ~0.8 s of a 2-core machine in each of their six
processes, so they read the Arrow files with pyarrow, which `datasets` itself is built on.
tests/test_generate.py checks the columns equal `Dataset.load_from_disk`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa


def read_split(split_dir: Path) -> dict[str, list]:
    """Every column of a split saved by `Dataset.save_to_disk`, as lists, in row order."""
    state = json.loads((split_dir / "state.json").read_text())
    columns: dict[str, list] = {}
    for data_file in state["_data_files"]:  # one file per shard, in order
        with pa.OSFile(str(split_dir / data_file["filename"])) as source:
            for name, values in pa.ipc.open_stream(source).read_all().to_pydict().items():
                columns.setdefault(name, []).extend(values)
    return columns
