"""Print the markdown pull-request comment: the working tree's results against BASE_REF.

In reading order: ROUGE-L per variant (old -> new, and whether the change is more than noise: a
paired test where both sides' per-dialogue scores are at hand, else whether the old value leaves the
new run's 95% interval, labelled as interval overlap, not a test), a warning when the committed
metrics are stale (dvc.lock does not match params.yaml and the code), the report's plots on both
sides, the params diff; then, folded: every deterministic metric change, the noisy timing and cost
changes, and metrics/report.md. Metrics and the report's images are committed to git (cache: false),
so this needs only git and dvc (no remote, no pipeline run) and Python's standard library; the
paired test also needs the project's own dependencies (stages/rouge.py) and the DVC-cached scores,
which CI does not have.
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

EVALUATE = "metrics/evaluate"  # <run>.json (lora/seed42.json, base.json): rougeL, rougeL_ci_low, rougeL_ci_high (x100)
SCORES = "data/scores"  # <run>.jsonl: per-dialogue ROUGE (0-1) by id, DVC-cached (not in git)
# The report's images (committed), with the titles the comment gives them
PLOTS = {
    "metrics/plots/rouge_by_variant.png": "ROUGE-L by variant",
    "metrics/plots/frontier.png": "Quality against cost",
}
RESAMPLES = 10_000  # sign flips per paired test: p-values down to 1e-4
SEED = 0  # the paired tests' resampling seed, so a comment is the same each time it is built
SIGNIFICANCE = 0.05  # family-wise error rate over the variants tested together (Holm)
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


def read_scores(variant: str, rev: str | None) -> dict[str, float] | None:
    """Per-dialogue ROUGE-L by dialogue id at `rev` (None: the working tree), or None where they are
    not at hand: they are DVC-cached, so another revision's come from the DVC cache (or remote)."""
    path = f"{SCORES}/{variant}.jsonl"
    if rev is None:
        text = Path(path).read_text() if Path(path).is_file() else None
    else:
        import dvc.api  # only here: the rest of the script needs dvc's command line only
        from dvc.exceptions import DvcException

        try:
            text = dvc.api.read(path, repo=".", rev=rev)
        except (DvcException, FileNotFoundError):
            text = None
    if text is None:
        return None
    return {row["id"]: row["rougeL"] for row in map(json.loads, text.splitlines()) if row}


def paired_tests(base: str, variants: list[str]) -> dict[str, dict]:
    """variant -> paired test of new vs old per-dialogue ROUGE-L (x100), for each variant whose scores
    are at hand on both sides for the same dialogues; p-values Holm-adjusted over those variants."""
    pairs = {}
    for variant in variants:
        old, new = read_scores(variant, base), read_scores(variant, None)
        if old is not None and new is not None and old.keys() == new.keys():
            pairs[variant] = ([new[i] for i in sorted(new)], [old[i] for i in sorted(new)])
    if not pairs:
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/ beside scripts/
    from stages.rouge import holm_adjust, paired_test

    tests = {v: paired_test(new, old, RESAMPLES, SEED) for v, (new, old) in pairs.items()}
    for variant, p_holm in zip(tests, holm_adjust([t["p_value"] for t in tests.values()])):
        tests[variant]["p_holm"] = p_holm
    return tests


def noise_verdict(was: float, low: float | None, high: float | None, test: dict | None) -> str:
    """Whether old -> new is more than noise: by the paired test where there is one, else by whether
    the old value leaves the new 95% interval, which is not a test and says so."""
    if test is not None:
        return (
            f"{'yes' if test['p_holm'] < SIGNIFICANCE else 'no'} (paired test, Holm-adjusted p = {test['p_holm']:.4f})"
        )
    if low is None or high is None:
        return "-"
    return f"{'no' if low <= was <= high else 'yes'} (interval overlap, not a test)"


def run_of(path: str) -> str:
    """metrics/evaluate/lora/seed42.json -> lora/seed42 (stages/runs.py's run name)."""
    return Path(path).relative_to(EVALUATE).with_suffix("").as_posix()


def rouge_table(base: str) -> str:
    """One row per run (a method under one seed, or a baseline) with a metrics/evaluate/<run>.json on
    either side."""
    old_paths = run("git", "ls-tree", "-r", "--name-only", base, f"{EVALUATE}/").split()
    old = {run_of(p): json.loads(run("git", "show", f"{base}:{p}")) for p in old_paths if p.endswith(".json")}
    new = {run_of(str(p)): json.loads(p.read_text()) for p in Path(EVALUATE).rglob("*.json")}
    if not old and not new:
        return f"No ROUGE metrics ({EVALUATE}/*.json) on either side."
    tests = paired_tests(base, sorted(old.keys() & new.keys()))
    lines = ["| run | ROUGE-L old | ROUGE-L new | change | beyond noise? |", "|---|---:|---:|---:|---|"]
    for variant in sorted(old.keys() | new.keys()):
        was, now = old.get(variant, {}).get("rougeL"), new.get(variant, {}).get("rougeL")
        low, high = new.get(variant, {}).get("rougeL_ci_low"), new.get(variant, {}).get("rougeL_ci_high")
        change = verdict = "-"
        if was is not None and now is not None:
            change = f"{now - was:+.2f}"
            verdict = noise_verdict(was, low, high, tests.get(variant))
        lines.append(f"| {variant} | {number(was)} | {number(now)} | {change} | {verdict} |")
    lines += [
        "",
        f"*Beyond noise*: **paired test** where both sides' per-dialogue scores (`{SCORES}/<run>.jsonl`, "
        "DVC-cached) are at hand: a sign-flip test on the per-dialogue ROUGE-L differences, Holm-adjusted over "
        f"the variants tested, significant below {SIGNIFICANCE}. Otherwise **interval overlap (not a test)**: "
        "whether the old ROUGE-L lies outside the new run's 95% bootstrap interval (`rougeL_ci_low`..`rougeL_ci_high` "
        "in `metrics/evaluate/<run>.json`); a gain on every dialogue can sit inside that interval.",
    ]
    return "\n".join(lines)


def image_url(path: str, sha: str) -> str | None:
    """Where GitHub serves a committed file as an image (None outside GitHub Actions)."""
    server, repository = os.environ.get("GITHUB_SERVER_URL"), os.environ.get("GITHUB_REPOSITORY")
    return f"{server}/{repository}/blob/{sha}/{path}?raw=true" if server and repository else None


def blob(rev: str, path: str) -> str | None:
    """The git object id of `path` at `rev`, or None where it is not there."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}:{path}"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else None


def image_cell(path: str, title: str, rev: str, sha: str | None) -> str:
    if sha is None:
        return f"(no `{path}` on {rev})"
    url = image_url(path, sha)
    return f"![{title} ({rev})]({url})" if url else f"`{path}` at `{sha[:12]}`"


def plots_section(base: str) -> str:
    """The report's images on both sides: base branch and PR (the committed files, shown from GitHub)."""
    base_sha, head_sha = run("git", "rev-parse", f"{base}^{{commit}}").strip(), run("git", "rev-parse", "HEAD").strip()
    rows = ["| plot | " + base + " | this PR |", "|---|---|---|"]
    for path, title in PLOTS.items():
        old, new = blob(base, path), blob("HEAD", path)
        if old is not None and old == new:
            rows.append(f"| {title} | unchanged | {image_cell(path, title, 'this PR', head_sha)} |")
            continue
        old_cell = image_cell(path, title, base, base_sha if old else None)
        rows.append(f"| {title} | {old_cell} | {image_cell(path, title, 'this PR', head_sha if new else None)} |")
    return "\n".join(
        rows
        + [
            "",
            f"Rendered by the report stage from the templates `dvc plots show` uses. Overlay both sides, training "
            f"curves included: `dvc plots diff {base} --open`.",
        ]
    )


def absolute_images(markdown: str, folder: str, sha: str) -> str:
    """The report's relative image links (plots/x.png) as GitHub URLs, so they show in a comment."""

    def link(match: re.Match) -> str:
        url = image_url(os.path.normpath(f"{folder}/{match.group(2)}"), sha)
        return f"![{match.group(1)}]({url})" if url else match.group(0)

    return re.sub(r"!\[([^\]]*)\]\((?!https?://)([^)\s]+)\)", link, markdown)


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
        f"## Plots ({base} and this PR)",
        plots_section(base),
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
            absolute_images(report.read_text().strip(), str(report.parent), run("git", "rev-parse", "HEAD").strip())
            if report.is_file()
            else "No report (metrics/report.md not found in the working tree).",
        ),
    ]
    print("\n\n".join(sections))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1]:
        sys.exit(f"usage: {sys.argv[0]} BASE_REF")
    main(sys.argv[1])
