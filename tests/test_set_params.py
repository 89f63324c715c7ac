"""scripts/set_params.py: `dvc exp run -S` syntax applied to params.yaml in place, comments kept, checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def set_params(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the script in tmp_path, on a copy of the committed params.yaml."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "set_params.py"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_values_are_set_with_exp_run_syntax_and_comments_stay(tmp_path):
    result = set_params(
        tmp_path, "data.limit=30", "lora.learning_rate=5.0e-4", "train.epochs=1", "variants=[full,lora]"
    )
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params["data"]["limit"] == 30 and params["variants"] == ["full", "lora"]
    assert params["lora"]["learning_rate"] == 5.0e-4 and params["train"]["epochs"] == 1
    assert "# max rows kept per split for smoke runs" in text  # the file's comments survive
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    changed = ("data", "lora", "train", "variants")
    assert {k: v for k, v in params.items() if k not in changed} == {
        k: v for k, v in committed.items() if k not in changed
    }
    # within a changed section, only the key set moved
    assert {k: v for k, v in params["lora"].items() if k != "learning_rate"} == {
        k: v for k, v in committed["lora"].items() if k != "learning_rate"
    }
    assert {k: v for k, v in params["train"].items() if k != "epochs"} == {
        k: v for k, v in committed["train"].items() if k != "epochs"
    }


def test_a_bad_value_is_refused_and_the_file_left_as_it_was(tmp_path):
    result = set_params(tmp_path, "lora.r=0")
    assert result.returncode == 2
    assert result.stderr == "error: 1 problem(s) in params.yaml:\n  - lora.r: must be >= 1, got 0\n"
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
