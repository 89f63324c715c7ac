"""scripts/pr_comment.py (the PR-review comment) in throwaway git+DVC repos, and the workflow that runs it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pr_comment.py"
WORKFLOW = REPO / ".github" / "workflows" / "pr-review.yml"

# A miniature of the real layout: one evaluate stage per variant writes deterministic ROUGE (with its
# interval, score +- 1) from params.yaml, plus noisy timing and cost files and a DVC-cached output.
DVC_YAML = """\
stages:
  evaluate:
    foreach: ${variants}
    do:
      cmd: python evaluate.py ${item}
      deps:
        - evaluate.py
      params:
        - lora
        - scores
      outs:
        - predictions/${item}.txt
      metrics:
        - metrics/evaluate/${item}.json:
            cache: false
        - metrics/timing/evaluate_${item}.json:
            cache: false
        - metrics/cost/${item}.json:
            cache: false
"""
EVALUATE_PY = """\
import json, os, sys, time
import yaml

variant = sys.argv[1]
score = yaml.safe_load(open("params.yaml"))["scores"][variant]
for folder in ("predictions", "metrics/evaluate", "metrics/timing", "metrics/cost"):
    os.makedirs(folder, exist_ok=True)
open(f"predictions/{variant}.txt", "w").write("a summary\\n")
evaluate = {"rouge1": 40.0, "rougeL": score, "rougeL_ci_low": score - 1, "rougeL_ci_high": score + 1}
json.dump(evaluate, open(f"metrics/evaluate/{variant}.json", "w"))
json.dump({"runtime_s": time.time()}, open(f"metrics/timing/evaluate_{variant}.json", "w"))
json.dump({"peak_memory_mb": time.perf_counter()}, open(f"metrics/cost/{variant}.json", "w"))
"""
REPORT = "# Report\n\nLoRA r=16 beats r=32 by 1.5 ROUGE-L.\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dvc beside python
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        DVC_NO_ANALYTICS="1",
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def _run(cwd: Path, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _write_params(repo: Path, r: int, scores: dict[str, float]) -> None:
    params = {"variants": list(scores), "lora": {"r": r, "alpha": 32}, "scores": scores}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _repro_and_commit(repo: Path, r: int, scores: dict[str, float], report: str | None = None) -> None:
    _write_params(repo, r, scores)
    if report is not None:
        (repo / "metrics" / "report.md").write_text(report)
    _run(repo, "dvc", "repro", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", f"r={r}")


def _make_repo(repo: Path, with_exp: bool) -> Path:
    """main: lora.r 32, ROUGE-L full 33.0 and lora 30.0. exp (checked out if with_exp): lora.r 16;
    full 33.3 (old value inside its new interval), lora 31.5 (outside), a new variant ia3, a report."""
    repo.mkdir()
    _run(repo, "git", "init", "-q", "-b", "main")
    _run(repo, "dvc", "init", "-q")
    _run(repo, "dvc", "config", "core.analytics", "false")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "evaluate.py").write_text(EVALUATE_PY)
    _repro_and_commit(repo, r=32, scores={"full": 33.0, "lora": 30.0})
    if with_exp:
        _run(repo, "git", "checkout", "-q", "-b", "exp")
        _repro_and_commit(repo, r=16, scores={"full": 33.3, "lora": 31.5, "ia3": 28.0}, report=REPORT)
    return repo


def _comment(repo: Path, base: str = "main") -> str:
    return _run(repo, sys.executable, str(SCRIPT), base)


def _rows(markdown: str) -> list[list[str]]:
    """Cells of every markdown table row, padding stripped."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]


def _between(text: str, start: str, end: str | None = None) -> str:
    after = text.split(start, 1)[1]
    return after.split(end, 1)[0] if end else after


DETERMINISTIC = "<details><summary>All deterministic metric changes (vs main)</summary>"
NOISY = "<details><summary>Timing and cost changes (noisy: they differ on every run)</summary>"
REPORT_FOLD = "<details><summary>Report (metrics/report.md)</summary>"


@pytest.fixture(scope="module")
def exp_comment(tmp_path_factory) -> str:
    return _comment(_make_repo(tmp_path_factory.mktemp("pr") / "repo", with_exp=True))


def test_comment_leads_with_rouge_by_variant_and_ci_verdict(exp_comment):
    assert exp_comment.startswith("## ROUGE-L by variant (vs main)\n")
    compact = _between(exp_comment, "## ROUGE-L by variant (vs main)\n", "## Params")
    assert _rows(compact)[0] == ["variant", "ROUGE-L old", "ROUGE-L new", "change", "outside 95% CI?"]
    assert _rows(compact)[2:] == [
        ["full", "33.00", "33.30", "+0.30", "no"],  # 33.0 lies in the new [32.3, 34.3]
        ["ia3", "-", "28.00", "-", "-"],  # new variant: nothing to compare
        ["lora", "30.00", "31.50", "+1.50", "yes"],  # 30.0 lies below the new [30.5, 32.5]
    ]
    assert "the old ROUGE-L lies outside the new run's 95% bootstrap interval" in compact
    assert "Stale" not in exp_comment  # every commit ran dvc repro


def test_noisy_metrics_only_in_their_folded_section(exp_comment):
    before_noisy, noisy = exp_comment.split(NOISY, 1)
    noisy = noisy.split(REPORT_FOLD, 1)[0]
    for name in ("metrics/timing", "metrics/cost", "runtime_s", "peak_memory_mb"):
        assert name not in before_noisy
    paths = {row[0] for row in _rows(noisy)[2:]}
    assert paths == {
        "metrics/cost/full.json",
        "metrics/cost/ia3.json",
        "metrics/cost/lora.json",
        "metrics/timing/evaluate_full.json",
        "metrics/timing/evaluate_ia3.json",
        "metrics/timing/evaluate_lora.json",
    }
    assert noisy.rstrip().endswith("</details>")


def test_deterministic_diff_params_and_report_are_folded_in_order(exp_comment):
    params = _between(exp_comment, "## Params (vs main)\n", DETERMINISTIC)
    deterministic = _between(exp_comment, DETERMINISTIC, NOISY)
    report = _between(exp_comment, REPORT_FOLD)

    assert _rows(params)[0] == ["Path", "Param", "main", "workspace"]
    assert ["params.yaml", "lora.r", "32", "16"] in _rows(params)
    # dvc metrics diff --md: header, separator, then only changed metrics (rouge1 is the same everywhere)
    assert _rows(deterministic)[0] == ["Path", "Metric", "main", "workspace", "Change"]
    assert ["metrics/evaluate/lora.json", "rougeL", "30.0", "31.5", "1.5"] in _rows(deterministic)
    assert ["metrics/evaluate/ia3.json", "rougeL", "-", "28.0", "-"] in _rows(deterministic)
    assert ["metrics/evaluate/lora.json", "rouge1"] not in [row[:2] for row in _rows(deterministic)]
    assert REPORT.strip() in report
    assert report.rstrip().endswith("</details>")


def test_comment_against_itself_says_no_changes(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    out = _comment(repo)
    assert _rows(_between(out, "## ROUGE-L by variant (vs main)\n", "## Params"))[2:] == [
        ["full", "33.00", "33.00", "+0.00", "no"],
        ["lora", "30.00", "30.00", "+0.00", "no"],
    ]
    assert "## Params (vs main)\n\nNo param changes.\n" in out
    assert f"{DETERMINISTIC}\n\nNo metric changes.\n\n</details>" in out
    assert f"{NOISY}\n\nNo timing or cost changes.\n\n</details>" in out
    assert "No report (metrics/report.md not found" in out
    assert "Stale" not in out
    assert len(_rows(out)) == 4  # only the compact table: no empty header-only tables


def test_stale_warning_when_params_or_code_changed_after_dvc_lock(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    _write_params(repo, r=16, scores={"full": 33.0, "lora": 30.0})  # edited, not reproduced
    out = _comment(repo)
    assert (
        "> **Stale:** the committed metrics do not match params.yaml and the code (dvc.lock is out of date): "
        "evaluate@full (params: lora), evaluate@lora (params: lora). "
        "Run `dvc repro` and commit the metrics."
    ) in out
    assert out.index("> **Stale:**") < out.index("## Params")

    with open(repo / "evaluate.py", "a") as f:
        f.write("# a code change\n")
    assert "evaluate@lora (params: lora; deps: evaluate.py)" in _comment(repo)

    _run(repo, "dvc", "repro", "-q")
    assert "Stale" not in _comment(repo)

    with open(repo / "dvc.yaml", "a") as f:
        f.write("  summary:\n    cmd: python evaluate.py lora\n    deps:\n      - evaluate.py\n")
    out = _comment(repo)
    assert "(dvc.lock is out of date): summary (never run: not in dvc.lock). Run" in out


def test_missing_cached_outputs_are_not_stale(tmp_path):
    """CI checks out git only: DVC-cached outputs are absent, and that alone is no reason to warn."""
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "predictions")
    status = _run(repo, "dvc", "status")
    assert "deleted" in status or "not in cache" in status
    assert "Stale" not in _comment(repo)


def test_readme_exp_show_leads_with_rouge_and_changed_params(tmp_path):
    """The `dvc exp show` line the README gives, on real experiments: ROUGE-L per variant, then changed params."""
    (line,) = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("dvc exp show --")]
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    _run(repo, "dvc", "exp", "run", "-q", "-S", "lora.r=16")
    _run(repo, "dvc", "exp", "run", "-q", "-S", "scores.lora=31.5")
    table = _rows(_run(repo, *shlex.split(line, comments=True), "--md", "--no-pager"))
    assert table[0] == [
        "Experiment",
        "Created",
        "metrics/evaluate/full.json:rougeL",
        "metrics/evaluate/lora.json:rougeL",
        "lora.r",
        "scores.lora",
    ]
    assert [row[0] for row in table[2:4]] == ["workspace", "main"]
    assert [row[2:] for row in table[2:4]] == [["33", "31.5", "16", "31.5"], ["33", "30", "32", "30"]]
    # the experiments; each `dvc exp run` starts from the workspace, so the second keeps lora.r=16
    assert sorted(row[2:] for row in table[4:]) == [["33", "30", "16", "30"], ["33", "31.5", "16", "31.5"]]


def test_unknown_base_ref_fails(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "origin/nope"], cwd=repo, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "origin/nope" in result.stderr
    assert result.stdout == ""


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
    assert "pip install dvc==3.67.1" in runs  # the script needs only dvc and the standard library
    build = next(s for s in steps if "scripts/pr_comment.py" in s.get("run", ""))
    assert build["env"]["BASE_REF"] == "${{ github.base_ref }}"  # via env: no template injection
    assert 'python scripts/pr_comment.py "origin/$BASE_REF" > comment.md' in build["run"]
    assert 'cat comment.md >> "$GITHUB_STEP_SUMMARY"' in build["run"]
    assert "${{" not in runs  # no expression is expanded into a script
    assert "gh pr comment" in runs
