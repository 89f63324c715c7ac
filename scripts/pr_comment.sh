#!/usr/bin/env bash
# Print a markdown pull-request comment: metric and param changes of the working tree against
# BASE_REF, then metrics/report.md. Metrics are committed to git (cache: false), so this needs
# no DVC remote and runs no pipeline stage. Used by .github/workflows/pr-review.yml.
# Usage: scripts/pr_comment.sh BASE_REF   (e.g. origin/main)
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 BASE_REF" >&2
    exit 2
fi
base="$1"
cd "$(git rev-parse --show-toplevel)"

# Fail early with a clear message instead of an empty comment.
if ! git rev-parse --verify --quiet "${base}^{commit}" >/dev/null; then
    echo "error: unknown git revision '$base' (CI needs actions/checkout with fetch-depth: 0)" >&2
    exit 1
fi

# `dvc ... diff --md` prints only the two header lines of the table when nothing changed;
# count the lines after them to tell an empty diff from a real one.
has_rows() {
    [[ $(printf '%s\n' "$1" | grep -c '^|') -gt 2 ]]
}

metrics=$(dvc metrics diff --md "$base")
params=$(dvc params diff --md "$base")

echo "## Metrics (vs $base)"
echo
if has_rows "$metrics"; then printf '%s\n' "$metrics"; else echo "No metric changes."; fi
echo
echo "## Params (vs $base)"
echo
if has_rows "$params"; then printf '%s\n' "$params"; else echo "No param changes."; fi
echo
echo "## Report"
echo
if [[ -f metrics/report.md ]]; then
    cat metrics/report.md
else
    echo "No report (metrics/report.md not found in the working tree)."
fi
