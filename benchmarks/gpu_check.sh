#!/usr/bin/env bash
# One prepared run on a lent GPU machine, which has no network: install offline, build the
# native extension in the background, run the GPU tests, then `benchmarks/run.py --quick` with
# the peers. Everything is logged under $OUT, which is what comes back from the machine.
#
# Before: on a machine with network, from the repository root, fill the ignored folder .whl/
# with the peers' wheels (pure Python, about 1 MB):
#     pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# and, if the GPU machine's Python lacks pytest, its wheels too:
#     pip download -d .whl pytest
# Carry .whl/ with the working tree to the GPU machine. There, from the repository root:
#     bash benchmarks/gpu_check.sh             # everything, logs under $OUT
#     bash benchmarks/gpu_check.sh --dry-run   # print the steps and the time each may take
#
# Time: a GPU machine is lent for 15 minutes in all; its start takes a few. The script stops
# every step at its deadline, GPU_CHECK_BUDGET_S seconds after it began (default 360), so that
# start and run stay within 9 minutes and a second try fits. The benchmark writes its JSON
# after every row, so a run cut short keeps what it measured.
set -uo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-360}
OUT=${OUT:-$PWD/gpu_check_out}
PYTHON=${PYTHON:-python}
PIP_OFFLINE=(--no-index --no-deps --no-build-isolation)
STARTED=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

left() { echo $(( BUDGET_S - ($(date +%s) - STARTED) )); }

# step NAME SECONDS COMMAND...: run COMMAND, its output in $OUT/NAME.log, stopped after
# SECONDS or at the budget's end, whichever comes first; its status goes to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local budget
    budget=$(left)
    (( limit > budget )) && limit=$budget
    if (( DRY_RUN )); then
        echo "[dry-run] $name (up to ${limit} s): $*"
        return 0
    fi
    if (( limit <= 0 )); then
        echo "SKIPPED $name: the budget is spent" | tee -a "$OUT/summary.txt"
        return 1
    fi
    echo "== $name (up to ${limit} s, $(left) s left): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $(( $(date +%s) - STARTED )) s" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
    return $status
}

cd "$(dirname "$0")/.."
echo "gpu_check on $(hostname) at $(date -u +%FT%TZ), budget ${BUDGET_S} s, logs in $OUT"
(( DRY_RUN )) || nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
(( DRY_RUN )) || git log -1 --format='commit %H %s' > "$OUT/commit.txt" 2>/dev/null

# 1. Offline installs: the peers' wheels, then siri itself without the extension (seconds).
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
    step install-wheels 60 "$PYTHON" -m pip install "${PIP_OFFLINE[@]}" "${wheels[@]}"
else
    echo "no wheel in .whl/: the peers' rows are measured only if they are installed already"
fi
SIRI_SKIP_EXT=1 step install-siri 90 "$PYTHON" -m pip install "${PIP_OFFLINE[@]}" -e .
step versions 30 "$PYTHON" -c "import torch, triton, pytest; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'triton', triton.__version__, 'pytest', pytest.__version__, torch.cuda.get_device_name())"

# 2. The extension (CPU and CUDA kernels) builds beside the installed package, in the
#    background (about 1.5 min on 16 cores); the Triton and torch backends are tested meanwhile.
if (( DRY_RUN )); then
    echo "[dry-run] build-extension (background): $PYTHON setup.py build_ext --inplace"
    BUILD_PID=""
else
    "$PYTHON" setup.py build_ext --inplace > "$OUT/build-extension.log" 2>&1 &
    BUILD_PID=$!
fi
PYTEST=("$PYTHON" -m pytest -m gpu -q -rfEs -p no:cacheprovider)
step gpu-tests-triton-torch 120 "${PYTEST[@]}" tests/test_gpu_kernels.py -k "backend-triton or backend-torch" \
    --junitxml="$OUT/gpu-tests-triton-torch.xml"

if [[ -n "$BUILD_PID" ]]; then
    echo "waiting for the extension build ($(left) s left)"
    # `timeout 0` would wait forever: at least one second.
    timeout "$(( $(left) > 0 ? $(left) : 1 ))" tail --pid="$BUILD_PID" -f /dev/null
    kill -0 "$BUILD_PID" 2>/dev/null && kill "$BUILD_PID" && echo "build-extension: stopped at the budget's end"
    wait "$BUILD_PID"
    echo "build-extension: exit $? after $(( $(date +%s) - STARTED )) s" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/build-extension.log"
fi

# 3. With the extension: the native CUDA backend and every other gpu-marked test.
step gpu-tests-native 90 "${PYTEST[@]}" tests -k "not backend-triton and not backend-torch" \
    --junitxml="$OUT/gpu-tests-native.xml"

# 4. The kernel sections of the benchmark, peers included, with whatever time is left (at
#    least 2 minutes; `packing` is left out for time).
step benchmark "$(left)" "$PYTHON" benchmarks/run.py --quick --only policy_loss --only fused_linear \
    --out "$OUT/benchmark.json"

echo "done after $(( $(date +%s) - STARTED )) s"
cat "$OUT/summary.txt" 2>/dev/null
