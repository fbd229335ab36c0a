#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 6 minutes warm (each step has a time limit sized for a cold start), the GPU tests, the kernel benchmark, and the 125m and 1b
# presets exactly as shipped (benchmarks/mfu.py) beside the transformers + DeepSpeed peer of the same shape,
# batch and DeepSpeed config (benchmarks/peer_hf_deepspeed.py). Each benchmark writes its JSON (device, date,
# commit, command, config) into $RESULTS; each step's log goes to $LOGS.
#
#   make gpu-check                      # with the project installed in .venv (a CUDA build of torch)
#   PYTHON=python3 bash benchmarks/gpu_check.sh [--speed] [--dry-run]
#
# --speed adds the 1b preset without recompute, with compiled blocks, with FP8 (tensorwise, compiled; needs
# torchao and compute capability >= 8.9) and with document masking (varlen flash attention): selective
# recompute's cost, compile's and FP8's gains, document masking's cost (about 6 minutes).
#
# Environment: PYTHON (default .venv/bin/python, else python3), RESULTS (default benchmarks/results), WORK
# (scratch, default /tmp/pretrain-gpu-check), LOGS (default $WORK/logs), COMMIT (recorded in every JSON; default
# git's HEAD: set it where the tree was copied without .git). Triton's and Inductor's caches live under $WORK, so
# a second run on the same machine starts warm; the time limits are for a cold first run (no cache: every Triton
# kernel and compiled block is compiled inside the step). A failed step is reported and the rest still run; the
# exit status is 1 if any step failed, 2 without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RESULTS=${RESULTS:-benchmarks/results}
WORK=${WORK:-/tmp/pretrain-gpu-check}
LOGS=${LOGS:-$WORK/logs}
DRY=0
SPEED=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        --speed) SPEED=1 ;;
        *) echo "gpu_check: unknown argument $arg (--speed, --dry-run)" >&2; exit 2 ;;
    esac
done

if [ $DRY = 0 ]; then
    GPU=$($PY -c "import torch, sys; sys.exit(3) if not torch.cuda.is_available() else print(torch.cuda.get_device_name())") \
        || { echo "gpu_check: no CUDA device visible to $PY; this check measures a GPU" >&2; exit 2; }
else
    GPU="NVIDIA H100"
fi
# "NVIDIA H200" -> h200, "NVIDIA L40S" -> l40s, "NVIDIA GH200 480GB" -> gh200-480gb
TAG=$(echo "$GPU" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
[ $DRY = 1 ] || mkdir -p "$RESULTS" "$LOGS"
COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PRETRAIN_COMMIT=$COMMIT TRITON_CACHE_DIR=$WORK/triton-cache TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache
echo "gpu_check: commit $COMMIT, caches under $WORK, logs in $LOGS"
failed=()

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOGS/NAME.log, show the last lines
    local name=$1 limit=$2; shift 2
    echo "== $name: (limit ${limit} s) $*"
    [ $DRY = 1 ] && return 0
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - t0)) s"
    else
        echo "   FAILED (exit $?) after $((SECONDS - t0)) s; log: $LOGS/$name.log"
        failed+=("$name")
    fi
    tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
}

step gpu_tests 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests
step kernels 150 $PY benchmarks/kernels.py --iters 10 --out "$RESULTS/kernels_$TAG.json"
step mfu_125m 150 $PY benchmarks/mfu.py --config configs/125m.yaml --nproc 1 --steps 10 --warmup 3 --vocab 50304 \
    --work "$WORK" --out "$RESULTS/mfu_${TAG}_125m.json"
step peer_125m 120 $PY benchmarks/peer_hf_deepspeed.py --config configs/125m.yaml --vocab 50304 --steps 10 --warmup 3 \
    --out "$RESULTS/peer_${TAG}_125m.json"
step mfu_1b 180 $PY benchmarks/mfu.py --config configs/1b.yaml --nproc 1 --steps 10 --warmup 3 --vocab 128256 \
    --work "$WORK" --out "$RESULTS/mfu_${TAG}_1b.json"
# transformers holds the whole fp32 logits: at the preset's micro-batch 8 it runs out of memory on an H200, so
# the peer runs the same global batch at the largest micro-batch that fits, of 4 and 2.
peer_1b() {  # micro 4 x accum 8, else micro 2 x accum 16: the same global batch
    local micro
    for micro in 4 2; do
        $PY benchmarks/peer_hf_deepspeed.py --config configs/1b.yaml --vocab 128256 --steps 10 --warmup 3 \
            --set train.micro_batch_size=$micro --set train.grad_accum=$((32 / micro)) \
            --out "$RESULTS/peer_${TAG}_1b.json" && return 0
    done
    return 1
}
export -f peer_1b
export PY RESULTS TAG
step peer_1b 180 bash -c peer_1b

if [ $SPEED = 1 ]; then
    for variant in "none:--set model.activation_checkpointing=none" "compile:--set model.compile=true" \
                   "fp8:--set train.fp8=tensorwise --set model.compile=true" \
                   "docmask:--set model.document_mask=true"; do
        name=${variant%%:*}
        limit=180; [[ $name == compile || $name == fp8 ]] && limit=300  # Inductor compiles every block shape cold
        step "mfu_1b_$name" $limit $PY benchmarks/mfu.py --config configs/1b.yaml --nproc 1 --steps 10 --warmup 4 \
            --vocab 128256 --work "$WORK" ${variant#*:} --out "$RESULTS/mfu_${TAG}_1b_$name.json"
    done
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: ${#failed[@]} step(s) failed: ${failed[*]}"
    exit 1
fi
[ $DRY = 1 ] || echo "gpu_check: all steps passed on $GPU; results in $RESULTS"
