"""Print the markdown pull-request comment: the working tree's results against BASE_REF.

In reading order: ROUGE-L per variant (old -> new, and whether the change leaves the new run's 95%
interval), a warning when the committed metrics are stale (dvc.lock does not match params.yaml and
the code), the params diff; then, folded: every deterministic metric change, the noisy timing and
cost changes, and metrics/report.md. Metrics are committed to git (cache: false), so this needs
only git and dvc (no remote, no pipeline run) and Python's standard library.
Used by .github/workflows/pr-review.yml.

Usage: python scripts/pr_comment.py BASE_REF   (e.g. origin/main; locally: main)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EVALUATE = "metrics/evaluate"  # <variant>.json: rougeL, rougeL_ci_low, rougeL_ci_high (x100)
NOISY = ("metrics/timing/", "metrics/cost/")  # wall clock, throughput, memory: differ on every run
# Without a DVC cache (CI) every cached output, and each dep that is one, reads as missing: not stale.
MISSING = ("deleted", "not in cache")


def run(*cmd: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: `{' '.join(cmd)}` failed:\n{result.stderr}")
    return result.stdout


def has_rows(table: str) -> bool:
    """`dvc ... diff --md` prints only the header and separator lines when nothing changed."""
    return sum(line.startswith("|") for line in table.splitlines()) > 2


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def rouge_table(base: str) -> str:
    """One row per variant with a metrics/evaluate/<variant>.json on either side."""
    old_paths = run("git", "ls-tree", "--name-only", base, f"{EVALUATE}/").split()
    old = {Path(p).stem: json.loads(run("git", "show", f"{base}:{p}")) for p in old_paths if p.endswith(".json")}
    new = {p.stem: json.loads(p.read_text()) for p in Path(EVALUATE).glob("*.json")}
    if not old and not new:
        return f"No ROUGE metrics ({EVALUATE}/*.json) on either side."
    lines = ["| variant | ROUGE-L old | ROUGE-L new | change | outside 95% CI? |", "|---|---:|---:|---:|---|"]
    for variant in sorted(old.keys() | new.keys()):
        was, now = old.get(variant, {}).get("rougeL"), new.get(variant, {}).get("rougeL")
        low, high = new.get(variant, {}).get("rougeL_ci_low"), new.get(variant, {}).get("rougeL_ci_high")
        change = outside = "-"
        if was is not None and now is not None:
            change = f"{now - was:+.2f}"
            if low is not None and high is not None:
                outside = "no" if low <= was <= high else "yes"
        lines.append(f"| {variant} | {number(was)} | {number(now)} | {change} | {outside} |")
    lines += [
        "",
        "*Outside 95% CI*: the old ROUGE-L lies outside the new run's 95% bootstrap interval "
        "(`rougeL_ci_low`..`rougeL_ci_high` in `metrics/evaluate/<variant>.json`).",
    ]
    return "\n".join(lines)


def stale_stages() -> list[str]:
    """'stage (params: ...; deps: ...)' for each stage whose command, code or params differ from dvc.lock."""
    lock = Path("dvc.lock").read_text() if Path("dvc.lock").is_file() else ""
    locked = set(re.findall(r"^  (\S+):$", lock, re.MULTILINE))  # stage names: dvc.lock's `stages:` keys
    stale = []
    for stage, entries in json.loads(run("dvc", "status", "--json") or "{}").items():
        if stage not in locked:
            stale.append(f"{stage} (never run: not in dvc.lock)")
            continue
        params, deps, command = [], [], False
        for entry in entries:
            if entry == "changed command":
                command = True
            elif isinstance(entry, dict):  # changed outs are ignored: present or not, they are results
                for path, state in entry.get("changed deps", {}).items():
                    if isinstance(state, dict):  # a params file: {param: state}
                        params += list(state)
                    elif state not in MISSING:
                        deps.append(path)
        what = (
            ([f"params: {', '.join(params)}"] if params else [])
            + ([f"deps: {', '.join(deps)}"] if deps else [])
            + (["command"] if command else [])
        )
        if what:
            stale.append(f"{stage} ({'; '.join(what)})")
    return stale


def metrics_diff(base: str, paths: list[str], empty: str) -> str:
    if not paths:
        return empty
    return run("dvc", "metrics", "diff", "--md", base, "--targets", *paths).strip()


def folded(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def main(base: str) -> None:
    os.chdir(run("git", "rev-parse", "--show-toplevel").strip())
    if (
        subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], capture_output=True
        ).returncode
        != 0
    ):  # a clear message instead of an empty comment
        sys.exit(f"error: unknown git revision '{base}' (CI needs actions/checkout with fetch-depth: 0)")

    changed = sorted(json.loads(run("dvc", "metrics", "diff", "--json", base) or "{}"))
    noisy = [path for path in changed if path.startswith(NOISY)]
    deterministic = [path for path in changed if path not in noisy]
    params = run("dvc", "params", "diff", "--md", base).strip()
    stale = stale_stages()
    report = Path("metrics/report.md")

    sections = [f"## ROUGE-L by variant (vs {base})", rouge_table(base)]
    if stale:
        sections.append(
            "> **Stale:** the committed metrics do not match params.yaml and the code (dvc.lock is "
            f"out of date): {', '.join(stale)}. Run `dvc repro` and commit the metrics."
        )
    sections += [
        f"## Params (vs {base})",
        params if has_rows(params) else "No param changes.",
        folded(
            f"All deterministic metric changes (vs {base})", metrics_diff(base, deterministic, "No metric changes.")
        ),
        folded(
            "Timing and cost changes (noisy: they differ on every run)",
            metrics_diff(base, noisy, "No timing or cost changes."),
        ),
        folded(
            "Report (metrics/report.md)",
            report.read_text().strip()
            if report.is_file()
            else "No report (metrics/report.md not found in the working tree).",
        ),
    ]
    print("\n\n".join(sections))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1]:
        sys.exit(f"usage: {sys.argv[0]} BASE_REF")
    main(sys.argv[1])
