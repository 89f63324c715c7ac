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
# interval, score +- 1) from params.yaml, per-dialogue scores (DVC-cached, as data/scores/ is: the
# same spread around the score on every revision, so a changed score is the same gain on every
# dialogue), plus noisy timing and cost files and a DVC-cached output.
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
        - data/scores/${item}.jsonl
      metrics:
        - metrics/evaluate/${item}.json:
            cache: false
        - metrics/timing/evaluate_${item}.json:
            cache: false
        - metrics/cost/${item}.json:
            cache: false
"""
EVALUATE_PY = """\
import json, os, random, sys, time
import yaml

variant = sys.argv[1]
score = yaml.safe_load(open("params.yaml"))["scores"][variant]
for folder in ("predictions", "metrics/evaluate", "metrics/timing", "metrics/cost", "data/scores"):
    os.makedirs(folder, exist_ok=True)
open(f"predictions/{variant}.txt", "w").write("a summary\\n")
spread = [random.Random(i).uniform(-0.25, 0.25) for i in range(200)]
spread = [x - sum(spread) / len(spread) for x in spread]  # mean 0: the dialogues average to `score`
with open(f"data/scores/{variant}.jsonl", "w") as f:
    for i, x in enumerate(spread):
        f.write(json.dumps({"id": f"d{i}", "rougeL": score / 100 + x}) + "\\n")
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


def _run(cwd: Path, *cmd: str, **env: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env() | env, capture_output=True, text=True, timeout=120)
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


def _comment(repo: Path, base: str = "main", **env: str) -> str:
    return _run(repo, sys.executable, str(SCRIPT), base, **env)


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


def test_comment_leads_with_rouge_by_variant_and_a_paired_test(exp_comment):
    """Both sides' per-dialogue scores are in the local DVC cache: the verdict is a paired test."""
    assert exp_comment.startswith("## ROUGE-L by variant (vs main)\n")
    compact = _between(exp_comment, "## ROUGE-L by variant (vs main)\n", "## Plots")
    assert _rows(compact)[0] == ["run", "ROUGE-L old", "ROUGE-L new", "change", "beyond noise?"]
    # p floors at 1 / (10000 + 1) for a gain on every dialogue; Holm over the 2 variants tested doubles it
    assert _rows(compact)[2:] == [
        # a gain on each of 200 dialogues, though 33.0 lies inside the new interval [32.3, 34.3]
        ["full", "33.00", "33.30", "+0.30", "yes (paired test, Holm-adjusted p = 0.0002)"],
        ["ia3", "-", "28.00", "-", "-"],  # new variant: nothing to compare
        ["lora", "30.00", "31.50", "+1.50", "yes (paired test, Holm-adjusted p = 0.0002)"],
    ]
    assert "**paired test** where both sides' per-dialogue scores" in compact
    assert "Otherwise **interval overlap (not a test)**" in compact
    assert "Stale" not in exp_comment  # every commit ran dvc repro


def test_without_per_dialogue_scores_the_verdict_is_labelled_interval_overlap(tmp_path):
    """CI checks out git only: no DVC cache, no data/scores, so no paired test, and the column says so."""
    repo = _make_repo(tmp_path / "repo", with_exp=True)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "scores")
    compact = _between(_comment(repo), "## ROUGE-L by variant (vs main)\n", "## Plots")
    assert _rows(compact)[2:] == [
        ["full", "33.00", "33.30", "+0.30", "no (interval overlap, not a test)"],  # 33.0 in [32.3, 34.3]
        ["ia3", "-", "28.00", "-", "-"],
        ["lora", "30.00", "31.50", "+1.50", "yes (interval overlap, not a test)"],  # 30.0 below [30.5, 32.5]
    ]


def _png(colour: bytes) -> bytes:
    """Stand-in image bytes: the comment links committed files, it never reads them."""
    return b"\x89PNG\r\n\x1a\n" + colour


def test_plots_of_both_sides_are_shown_from_github(tmp_path):
    repo = _make_repo(tmp_path / "repo", with_exp=False)
    plots = repo / "metrics" / "plots"
    plots.mkdir(parents=True)
    (plots / "rouge_by_variant.png").write_bytes(_png(b"rouge"))
    (plots / "frontier.png").write_bytes(_png(b"frontier, main"))
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "report images")
    main_sha = _run(repo, "git", "rev-parse", "HEAD").strip()
    _run(repo, "git", "checkout", "-q", "-b", "exp")
    (plots / "frontier.png").write_bytes(_png(b"frontier, exp"))
    (repo / "metrics" / "report.md").write_text("# Report\n\n![the frontier](plots/frontier.png)\n")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "a new frontier")
    head_sha = _run(repo, "git", "rev-parse", "HEAD").strip()

    out = _comment(repo, GITHUB_SERVER_URL="https://github.com", GITHUB_REPOSITORY="o/r")
    plots_section = _between(out, "## Plots (main and this PR)\n", "## Params")
    url = "https://github.com/o/r/blob/{}/metrics/plots/{}.png?raw=true"
    assert _rows(plots_section)[0] == ["plot", "main", "this PR"]
    assert _rows(plots_section)[2:] == [
        [
            "ROUGE-L by variant",
            "unchanged",
            f"![ROUGE-L by variant (this PR)]({url.format(head_sha, 'rouge_by_variant')})",
        ],
        [
            "Quality against cost",
            f"![Quality against cost (main)]({url.format(main_sha, 'frontier')})",
            f"![Quality against cost (this PR)]({url.format(head_sha, 'frontier')})",
        ],
    ]
    assert "`dvc plots diff main --open`" in plots_section
    # the folded report's own image links point at the PR's committed files too
    assert f"![the frontier]({url.format(head_sha, 'frontier')})" in _between(out, REPORT_FOLD)

    # outside GitHub Actions there is no URL to show: the file and its commit
    local = _between(_comment(repo), "## Plots (main and this PR)\n", "## Params")
    assert f"`metrics/plots/frontier.png` at `{main_sha[:12]}`" in local


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
    assert _rows(_between(out, "## ROUGE-L by variant (vs main)\n", "## Plots"))[2:] == [
        ["full", "33.00", "33.00", "+0.00", "no (paired test, Holm-adjusted p = 1.0000)"],
        ["lora", "30.00", "30.00", "+0.00", "no (paired test, Holm-adjusted p = 1.0000)"],
    ]
    assert "## Params (vs main)\n\nNo param changes.\n" in out
    assert f"{DETERMINISTIC}\n\nNo metric changes.\n\n</details>" in out
    assert f"{NOISY}\n\nNo timing or cost changes.\n\n</details>" in out
    assert "No report (metrics/report.md not found" in out
    assert "Stale" not in out
    assert len(_rows(out)) == 8  # the compact table and the plots table: no empty header-only tables
    plots = _between(out, "## Plots (main and this PR)\n", "## Params")
    assert [
        "Quality against cost",
        "(no `metrics/plots/frontier.png` on main)",
        "(no `metrics/plots/frontier.png` on this PR)",
    ] in _rows(plots)


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
