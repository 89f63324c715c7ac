#!/usr/bin/env bash
# The README's offline smoke run ("Offline smoke run", or with `llama` the decoder-only one under
# "Your model and your data"), timed as a new user meets it: a fresh clone of this repo's HEAD in a
# temp dir with nothing beside it, the README's commands as written, then the wall time of the
# setup, of `dvc repro`, and of each stage (from when DVC announces it to when it announces the next).
#   bash benchmarks/smoke_run.sh [t5|llama]
# It writes (and then removes) the README's paths: /tmp/sample-data, /tmp/tiny-t5, /tmp/tiny-llama.
# The README's "Offline smoke run" numbers come from this script (quiet and busy host alike).
# tests/test_pipeline.py checks its commands are the README's.
set -euo pipefail
family=${1:-t5}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
# on failure the log of `dvc repro` is printed before the temp clone goes
trap 'status=$?; [ $status -ne 0 ] && [ -f "$work/repro.log" ] && tail -n 60 "$work/repro.log" >&2; rm -rf "$work" /tmp/tiny-t5 /tmp/tiny-llama /tmp/sample-data' EXIT
git clone -q "$repo" "$work/p"
cd "$work/p"
rm -rf /tmp/tiny-t5 /tmp/tiny-llama /tmp/sample-data
start=$(date +%s.%N)
python scripts/make_sample_data.py /tmp/sample-data
if [ "$family" = llama ]; then
  python scripts/make_tiny_model.py /tmp/tiny-llama --family llama
  model=/tmp/tiny-llama
else
  python scripts/make_tiny_model.py /tmp/tiny-t5
  model=/tmp/tiny-t5
fi
python scripts/set_params.py model.name=$model data.source=/tmp/sample-data data.limit=30 \
  train.epochs=1 \
  generate.num_beams=1 generate.max_new_tokens=16 validate.dialogues=4 validate.max_new_tokens=16
mid=$(date +%s.%N)
dvc repro 2>&1 | python -u -c '
import sys, time
start = time.perf_counter()
for line in sys.stdin:
    print(f"{time.perf_counter() - start:8.2f} {line}", end="")
' > "$work/repro.log"
end=$(date +%s.%N)
python - "$work/repro.log" "$start" "$mid" "$end" <<'PY'
import re, sys
log, start, mid, end = sys.argv[1], *map(float, sys.argv[2:])
marks = [(float(t), name) for t, name in re.findall(r"^ *([\d.]+) Running stage '([^']+)'", open(log).read(), re.M)]
marks.append((end - mid, None))
print("  ".join(f"{name} {after - at:.1f}" for (at, name), (after, _) in zip(marks, marks[1:])))
print(f"setup {mid - start:.1f} s, dvc repro {end - mid:.1f} s, total {end - start:.1f} s")
PY
# what the README promises: ROUGE for every variant in the report
grep -c "rougeL" "$work/p/metrics/report.md" >/dev/null && ls "$work/p/metrics/evaluate"
