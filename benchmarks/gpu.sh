#!/usr/bin/env bash
# The GPU measurements as one script: the measurement parts of benchmarks/gpu_parts.py and
# benchmarks/trainer_overhead.py on the flan-t5-base architecture (random weights) with real DialogSum
# rows, then the CUDA tests (`pytest -m gpu`, whose test (e) is the tiny offline `dvc repro` on the
# card). Everything it writes goes under "$OUT", which must be set (e.g. OUT=gpu-out).
#
# How to run it, from the repo root:
#
# 1. Beside ../shared, with .venv installed from requirements.txt and a package index (under a minute):
#        bash benchmarks/gpu.sh prepare
#    It writes .gpu/ (git-ignored):
#      .gpu/whl/     wheels (CPython 3.12, x86-64) of every package the pipeline needs beyond torch
#                    (dvc, dvclive, datasets, evaluate, rouge_score, ...; not bitsandbytes, 41 MiB,
#                    unless GPU_SH_WITH_BNB=1), plus transformers, peft, datasets, fsspec and regex at
#                    this venv's versions;
#      .gpu/shared/  the part of ../shared the run reads (DialogSum with its first 2000 train rows, the
#                    flan-t5-small and flan-t5-base configs and tokenizer), linked as ../shared on the
#                    GPU machine when it has none.
#    The GPU machine's own python3 (torch with CUDA) is used.
#
# 2. On the GPU machine, with the repo and its .gpu/ folder (the script stops itself after
#    GPU_SH_BUDGET_S = 420 s):
#        OUT=gpu-out bash benchmarks/gpu.sh
#    Parts run in order, each under `timeout` with its cap (GPU_SH_PARTS, "name:seconds") or what the
#    budget has left: attention (which SDPA kernel T5's biased attention runs), stages (part of an epoch of
#    each training stage at the defaults, a validation, all 500 test dialogues at bf16 and 4 beams,
#    generate.batch_size candidates, the seed recipe, and the default repro's projection), train (full
#    fine-tuning MFU: compile off at pad 8 and 64, compile on at pad 64), memory (every method's peak vs
#    full at the same batch, bf16 base, checkpointing off/on), overhead (the Trainer path vs a plain loop,
#    each candidate switched off), decoder (Llama-3.2-1B-sized LoRA and QLoRA 4-bit), pytest (CUDA tests
#    and the tiny dvc repro). A part that fails or is cut is recorded and the next one runs; after every
#    part its JSON is merged into $OUT, so nothing finished is lost.
#    Output in $OUT: summary.md (card, part exit codes and times, the GPU targets as measured, every
#    part's numbers: what goes into BENCHMARKS.md), results.json (the same as data), gpu.log (everything
#    printed), env.txt (nvidia-smi -q, versions, pip freeze, gcc) and gpu-util.csv (nvidia-smi once a
#    second).
#
DRY_RUN=${GPU_SH_DRY_RUN:-0}
BUDGET=${GPU_SH_BUDGET_S:-420}  # 7 minutes: a 10-minute job slot keeps margin for the start and the copies
RESERVE=15  # seconds kept for the summary (a cut part also gets up to 15 s to die)
# parts in order, each with its cap in seconds: measurements first (the numbers the docs wait for), then the
# CUDA tests with the tiny `dvc repro` (tests/test_gpu.py (e)) with what is left
PARTS=${GPU_SH_PARTS:-"attention:20 stages:110 train:110 memory:50 overhead:45 decoder:45 pytest:120"}

# seconds a part may take: its cap, or what the budget has left (0: skip it)
budget_for() {
    local left=$((START + BUDGET - RESERVE - $(date +%s)))
    if ((left < 20)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}

record() {  # part name, exit code (or "skipped"), start time
    printf '%s\t%s\t%s\n' "$1" "$2" "$(($(date +%s) - $3))" >>"$W/steps.tsv"
    echo "=== $1: exit $2 after $(($(date +%s) - $3)) s (total $(($(date +%s) - START)) s)"
}

# part NAME CAP CMD...: run CMD under `timeout` with min(CAP, budget left) seconds (TERM, then KILL 10 s
# later); whatever the part wrote so far is merged into $OUT at once, so a later cut loses nothing
part() {
    local name=$1 cap=$2 t s rc=0
    shift 2
    t=$(budget_for "$cap")
    if ((t == 0)); then
        printf '%s\tskipped (no time left)\t0\n' "$name" >>"$W/steps.tsv"
        echo "=== $name: skipped, the budget is spent"
        return 0
    fi
    echo "=== [$(date -u +%T)] $name (at most $t s): $*"
    s=$(date +%s)
    timeout --kill-after=10 "$t" "$@" || rc=$?
    record "$name" "$rc" "$s"
    summarize
}

setup_machine() {
    if ((DRY_RUN)); then
        PY=${GPU_SH_PYTHON:-$(command -v python)}
    else
        PY=${GPU_SH_PYTHON:-$(command -v python3)}
    fi
    rm -rf "$W" && mkdir -p "$W/bin" "$W/parts"
    : >"$W/steps.tsv"
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$W/bin/python"
    printf '#!/bin/sh\nexec "%s" -m dvc "$@"\n' "$PY" >"$W/bin/dvc"
    chmod +x "$W/bin/python" "$W/bin/dvc"
    export PATH="$W/bin:$PATH"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$W/hf"
    export DVC_NO_ANALYTICS=1 ITERATIVE_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
    export GIT_AUTHOR_NAME=gpu GIT_AUTHOR_EMAIL=gpu@localhost GIT_COMMITTER_NAME=gpu GIT_COMMITTER_EMAIL=gpu@localhost
    local s rc=0
    s=$(date +%s)
    if ((DRY_RUN)); then
        rc="dry run: this venv"
    elif compgen -G ".gpu/whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
            .gpu/whl/*.whl || rc=$?
        export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: no .gpu/whl (run 'bash benchmarks/gpu.sh prepare' first and carry .gpu)"; rc=missing
    fi
    record install "$rc" "$s"
    # tests and benchmarks read ../shared beside the repo root; it does not travel: link the carried copy
    if [[ ! -f ../shared/data/dialogsum/test.jsonl ]]; then
        if [[ -d .gpu/shared ]] && ln -sfn "$ROOT/.gpu/shared" ../shared 2>/dev/null; then
            echo "linked ../shared -> .gpu/shared"
        elif [[ -d .gpu/shared ]]; then  # the parent is not writable: run from a copy that has ../shared
            mkdir -p "$W/checkout/main"
            tar -C "$ROOT" --exclude=./.git -cf - . | tar -C "$W/checkout/main" -xf -
            ln -sfn "$ROOT/.gpu/shared" "$W/checkout/shared"
            ROOT=$W/checkout/main && cd "$ROOT"
            echo "running from $ROOT (../shared linked beside it)"
        else
            echo "warning: no ../shared and no .gpu/shared: tests skip, the parts fail"
        fi
    fi
}

describe_machine() {  # never fails: a missing tool is reported, not fatal
    {
        echo "date: $(date -u +%FT%TZ)"
        uname -a || true
        nvidia-smi || echo "nvidia-smi failed"
        echo
        "$PY" - <<'PY' || echo "python import check failed"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("transformers", "peft", "accelerate", "datasets", "evaluate", "dvc", "dvclive", "rouge_score",
             "bitsandbytes", "tokenizers", "huggingface_hub", "pyarrow", "numpy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:  # noqa: BLE001 - report every import problem, keep going
        print(name, "IMPORT FAILED:", type(error).__name__, error)
PY
        echo "git: $(git --version 2>/dev/null || echo none)"
        echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "cpus: $(nproc)"
        echo "gcc: $(gcc --version 2>/dev/null | head -n 1 || echo none) (torch.compile's inductor needs a C compiler)"
        free -g 2>/dev/null | head -n 2 || true
        echo; echo "== pip freeze (image + carried wheels)"
        "$PY" -m pip list --format=freeze 2>/dev/null || true
        echo; echo "== nvidia-smi -q"
        nvidia-smi -q 2>/dev/null || true
    } >"$OUT/env.txt" 2>&1
    sed -n '1,/^== pip freeze/p' "$OUT/env.txt" | grep -v '^== pip freeze' || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader >"$W/card.txt" \
        2>/dev/null || echo "cpu (dry run)" >"$W/card.txt"
}

make_models() {  # the random flan-t5-base checkpoint every part loads (a tiny T5 in a dry run)
    local s rc=0
    s=$(date +%s)
    if ((DRY_RUN)); then
        python scripts/make_tiny_model.py "$W/model" --tokenizer ../shared/models/flan-t5-small-config || rc=$?
    else
        python scripts/make_random_model.py "$W/model" --config ../shared/models/flan-t5-base-config || rc=$?
    fi
    record model "$rc" "$s"
}

summarize() {  # $OUT/results.json (every part's JSON so far) and $OUT/summary.md (the targets table)
    "$PY" benchmarks/gpu_summary.py "$W/parts" "$W/steps.tsv" "$W/card.txt" "$OUT" >/dev/null || echo "summary failed"
}

on_machine() {
    echo "=== gpu.sh on $(uname -n) at $(date -u +%FT%TZ); budget $BUDGET s; parts: $PARTS; dry run: $DRY_RUN"
    setup_machine
    describe_machine
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 1 >"$OUT/gpu-util.csv" 2>/dev/null &
    local sampler=$! entry name cap dry=()
    ((DRY_RUN)) && dry=(--dry-run)
    make_models
    for entry in $PARTS; do
        name=${entry%%:*} cap=${entry##*:}
        if [[ $name == pytest ]]; then
            part pytest "$cap" python -m pytest -v -m gpu tests/test_gpu.py -rA --durations=0 -p no:cacheprovider
        elif [[ $name == overhead ]] && ((DRY_RUN)); then
            part overhead "$cap" python benchmarks/trainer_overhead.py --config-dir "$W/model" --batch 2 --steps 2 \
                --json "$W/parts/overhead.json"
        elif [[ $name == overhead ]]; then  # the Trainer path vs a plain loop, flan-t5-base at the default batch
            part overhead "$cap" python benchmarks/trainer_overhead.py --config flan-t5-base-config --batch 32 \
                --steps 8 --candidates --json "$W/parts/overhead.json"
        else
            part "$name" "$cap" python benchmarks/gpu_parts.py "$name" --model "$W/model" --out "$W/parts" "${dry[@]}"
        fi
    done
    kill "$sampler" 2>/dev/null || true
    summarize
    cat "$OUT/summary.md" 2>/dev/null || true
    echo "=== done in $(($(date +%s) - START)) s; \$OUT: $(ls "$OUT" | tr '\n' ' ')"
}

case "${1:-}" in
    prepare) prepare ;;
    "" | dry-run)
        if [[ ${1:-} == dry-run ]]; then  # the whole script on this CPU with tiny sizes: the plumbing, in a minute or two
            DRY_RUN=1
            BUDGET=${GPU_SH_BUDGET_S:-300}
            OUT=${OUT:-$(mktemp -d)}
        fi
        : "${OUT:?set OUT to the folder for the results, e.g. OUT=gpu-out}"
        export OUT
        mkdir -p "$OUT"
        on_machine 2>&1 | tee "$OUT/gpu.log"
        ;;
    *) echo "usage: bash benchmarks/gpu.sh [prepare | dry-run]" >&2; exit 2 ;;
esac
