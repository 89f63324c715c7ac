"""scripts/pr_comment.sh (the PR-review comment) in a throwaway git+DVC repo, and the workflow that runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pr_comment.sh"
WORKFLOW = REPO / ".github" / "workflows" / "pr-review.yml"

DVC_YAML = """\
stages:
  evaluate:
    cmd: "true"
    params:
      - lora
    metrics:
      - metrics/evaluate/lora.json:
          cache: false
"""
REPORT = "# Report\n\nLoRA r=16 beats r=32 by 1.5 ROUGE-L.\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dvc beside python
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
               DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1")
    return env


def _run(cwd: Path, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _commit(repo: Path, r: int, rouge_l: float, report: str | None = None) -> None:
    (repo / "params.yaml").write_text(f"lora:\n  r: {r}\n  alpha: 32\n")
    (repo / "metrics" / "evaluate").mkdir(parents=True, exist_ok=True)
    (repo / "metrics" / "evaluate" / "lora.json").write_text(json.dumps({"rougeL": rouge_l, "rouge1": 40.0}))
    if report is not None:
        (repo / "metrics" / "report.md").write_text(report)
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", f"r={r}")


def _make_repo(repo: Path, with_exp: bool) -> Path:
    """main: lora.r 32, rougeL 30.0; exp (checked out if with_exp): lora.r 16, rougeL 31.5, a report."""
    repo.mkdir()
    _run(repo, "git", "init", "-q", "-b", "main")
    _run(repo, "dvc", "init", "-q")
    _run(repo, "dvc", "config", "core.analytics", "false")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _commit(repo, r=32, rouge_l=30.0)
    if with_exp:
        _run(repo, "git", "checkout", "-q", "-b", "exp")
        _commit(repo, r=16, rouge_l=31.5, report=REPORT)
    return repo


def _rows(markdown: str) -> list[list[str]]:
    """Cells of every markdown table row, padding stripped."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|")]


def test_comment_shows_changed_metric_param_and_report(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=True)
    out = _run(repo, "bash", str(SCRIPT), "main")

    metrics = out.split("## Metrics (vs main)\n", 1)[1].split("## Params (vs main)\n", 1)[0]
    params = out.split("## Params (vs main)\n", 1)[1].split("## Report\n", 1)[0]
    report = out.split("## Report\n", 1)[1]

    # dvc metrics diff --md: header, separator, then only changed metrics (rouge1 is unchanged)
    assert _rows(metrics)[0] == ["Path", "Metric", "main", "workspace", "Change"]
    assert _rows(metrics)[2:] == [["metrics/evaluate/lora.json", "rougeL", "30.0", "31.5", "1.5"]]
    assert "rouge1" not in out
    assert _rows(params)[0] == ["Path", "Param", "main", "workspace"]
    assert _rows(params)[2:] == [["params.yaml", "lora.r", "32", "16"]]
    assert REPORT in report
    assert "No metric changes." not in out and "No param changes." not in out


def test_comment_against_itself_says_no_changes(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    out = _run(repo, "bash", str(SCRIPT), "main")
    assert "## Metrics (vs main)\n\nNo metric changes.\n" in out
    assert "## Params (vs main)\n\nNo param changes.\n" in out
    assert "## Report\n\nNo report" in out
    assert "|" not in out  # no empty header-only tables


def test_unknown_base_ref_fails(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    result = subprocess.run(["bash", str(SCRIPT), "origin/nope"], cwd=repo, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "origin/nope" in result.stderr


def test_workflow_runs_the_script_on_pull_requests():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "pull_request" in triggers
    assert workflow["permissions"] == {}  # granted per job, not workflow-wide
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "pull-requests": "write"}
    steps = job["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    assert checkout["with"]["persist-credentials"] is False
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "pip install dvc==3.67.1" in runs
    build = next(s for s in steps if "scripts/pr_comment.sh" in s.get("run", ""))
    assert build["env"]["BASE_REF"] == "${{ github.base_ref }}"  # via env: no template injection
    assert 'bash scripts/pr_comment.sh "origin/$BASE_REF" > comment.md' in build["run"]
    assert 'cat comment.md >> "$GITHUB_STEP_SUMMARY"' in build["run"]
    assert "${{" not in runs  # no expression is expanded into a script
    assert "gh pr comment" in runs
