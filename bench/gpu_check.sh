#!/usr/bin/env bash
# GPU check for one NVIDIA machine, in under 10 minutes: bert-base train-step throughput at seq_len 128 and 512
# (bf16 autocast, SDPA flash kernels, torch.compile) with MFU against the card's bf16 dense peak, then a few DDP
# steps of `maskedlm train` under torchrun on 1 GPU, then `maskedlm train`'s tokens/s against the bare step's (what
# the loop costs). Run from the repository root: `bash bench/gpu_check.sh`.
# Env: VENV (default .venv-gpu), PEAK_TFLOPS (override the card's peak), SKIP_INSTALL=1, OUT (log dir),
# DEVICE=cpu (a dry run of the whole flow on a machine without a GPU: plumbing only, the numbers mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

if [ "$DEVICE" = cpu ]; then
  GPU_NAME="none (dry run on the CPU)"; PEAK_TFLOPS=${PEAK_TFLOPS:-0}
else
  command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found; this script needs an NVIDIA GPU" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
fi

# The card's bf16 dense peak (TFLOP/s, no sparsity): NVIDIA datasheets.
if [ -z "${PEAK_TFLOPS:-}" ]; then
  case "$GPU_NAME" in
    *H200*) PEAK_TFLOPS=989 ;;
    *H100*PCIe*|*"H100 PCIe"*) PEAK_TFLOPS=756 ;;
    *H100*) PEAK_TFLOPS=989 ;;  # SXM
    *A100*) PEAK_TFLOPS=312 ;;
    *L40S*) PEAK_TFLOPS=362 ;;
    *A10G*) PEAK_TFLOPS=70 ;;
    *) PEAK_TFLOPS=0; log "unknown card '$GPU_NAME': set PEAK_TFLOPS to get MFU" ;;
  esac
fi
log "GPU: $GPU_NAME, bf16 dense peak ${PEAK_TFLOPS} TFLOP/s"

# Environment: reuse a CUDA torch that is already importable (machines without internet), else make a venv.
PY=""
for cand in "$VENV/bin/python" python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == 'cpu' else 1)" "$DEVICE" 2>/dev/null; then
    PY=$cand; break
  fi
done
if [ -z "$PY" ] && [ "${SKIP_INSTALL:-0}" != "1" ]; then
  log "creating $VENV and installing torch (CUDA build) + deps"
  test -x "$VENV/bin/python" || python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch  # the Linux x86_64 wheel on PyPI is the CUDA build
  PY=$VENV/bin/python
fi
[ -n "$PY" ] || { echo "gpu_check: no Python with a CUDA torch; unset SKIP_INSTALL or set VENV" >&2; exit 2; }
if ! "$PY" -c "import transformers, tokenizers, safetensors, numpy, tqdm, maskedlm" 2>/dev/null; then
  if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    "$PY" -m pip install -q tokenizers safetensors numpy tqdm transformers || true
    "$PY" -m pip install -q --no-deps -e . || true
  fi
fi
# Fall back to the source tree when the editable install could not be made (offline machine).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
BIN_DIR=$(dirname "$(command -v "$PY")")

# 1) Throughput: bert-base, bf16, SDPA; tokens per step ≈ 32k at both lengths. First all four systems side by side
#    in eager mode (no compile, so a slow compile cannot cost these numbers), then maskedlm's two systems compiled
#    (compile time reported apart; the bench prints its rounds as they finish, so a timed-out run keeps them).
SYSTEMS="maskedlm-bert-bf16 maskedlm-modern-bf16 hf-bert-bf16 hf-modern-sparse-bf16"
for spec in "128 256" "512 64"; do
  set -- $spec
  log "throughput: bert-base, seq_len $1, batch $2, eager, side by side"
  timeout 60 "$PY" bench/throughput.py --device "$DEVICE" --preset bert-base --seq-len "$1" --batch "$2" \
    --systems $SYSTEMS --rounds 4 --steps 5 --warmup 3 --gpu-peak-tflops "$PEAK_TFLOPS" \
    --json "$OUT/throughput_T$1.json" 2>&1 | tee "$OUT/throughput_T$1.txt" || log "throughput seq_len $1 failed or timed out"
  log "throughput: bert-base, seq_len $1, batch $2, maskedlm compiled"
  timeout 100 "$PY" bench/throughput.py --device "$DEVICE" --preset bert-base --seq-len "$1" --batch "$2" --compile \
    --systems maskedlm-bert-bf16 maskedlm-modern-bf16 --rounds 4 --steps 5 --warmup 3 --gpu-peak-tflops "$PEAK_TFLOPS" \
    --json "$OUT/throughput_T$1_compile.json" 2>&1 | tee "$OUT/throughput_T$1_compile.txt" \
    || log "compiled throughput seq_len $1 failed or timed out"
done

# 2) DDP through torchrun on 1 GPU: a small generated corpus, a tokenizer, prepared rows, 30 steps.
log "DDP smoke: torchrun --nproc-per-node 1 -m maskedlm train"
D=$OUT/ddp
rm -rf "$D" && mkdir -p "$D"
"$PY" - "$D/corpus.txt" <<'EOF'
import random, sys
rng = random.Random(0)
words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 9))) for _ in range(3000)]
with open(sys.argv[1], 'w') as f:
    for doc in range(4000):
        for _ in range(rng.randint(2, 6)):
            f.write(' '.join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + '.\n')
        f.write('\n')
EOF
TORCHRUN="$BIN_DIR/torchrun"; [ -x "$TORCHRUN" ] || TORCHRUN="$PY -m torch.distributed.run"
(
  set -x
  "$PY" -m maskedlm tokenizer train --input "$D/corpus.txt" --vocab-size 4096 --out "$D/tok"
  "$PY" -m maskedlm prepare --input "$D/corpus.txt" --tokenizer "$D/tok" --seq-len 128 --out "$D/data" --val-fraction 0.02
  timeout 90 $TORCHRUN --standalone --nproc-per-node 1 -m maskedlm train --config bert-mini --data "$D/data" \
    --out "$D/run" train.max_steps=30 train.log_every_steps=10 eval.every_steps=30 checkpoint.every_steps=30
) 2>&1 | tee "$OUT/ddp.txt" || log "DDP smoke failed"

# 3) The training loop against the bare step: `maskedlm train` (data loading, masking, logging read a step late)
#    and bench/throughput.py's step on the same shape (bert-base, vocab 4096, seq_len 128, 256 rows, no compile).
#    Their tokens/s ratio is what the loop costs on top of the step.
log "loop vs step: bert-base, seq_len 128, 256 rows, vocab 4096"
VOCAB=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$D/data/meta.json")
timeout 45 "$PY" bench/throughput.py --device "$DEVICE" --preset bert-base --vocab "$VOCAB" --seq-len 128 --batch 256 \
  --systems maskedlm-bert-bf16 --rounds 3 --steps 10 --warmup 3 2>&1 | tee "$OUT/loop_step.txt" || log "step bench failed"
timeout 75 "$PY" -m maskedlm train --config bert-base --data "$D/data" --out "$D/run_base" train.max_steps=60 \
  train.global_batch_rows=256 train.micro_batch_rows=256 train.log_every_steps=20 eval.every_steps=0 \
  checkpoint.every_steps=0 2>&1 | tee "$OUT/loop_train.txt" || log "loop run failed"

log "summary"
for f in "$OUT"/throughput_T*.txt; do
  [ -f "$f" ] && { echo "== $f"; grep -E "^(maskedlm|hf)-|^MFU|^matmul peaks" "$f" || true; }
done
grep -E "^step|^done|eval step" "$OUT/ddp.txt" || true
echo "== loop vs step (the train log's tok/s after warm-up against the bench's maskedlm-bert-bf16)"
grep -E "^maskedlm-bert-bf16" "$OUT/loop_step.txt" || true
grep -E "^step (40|60)" "$OUT/loop_train.txt" || true
log "finished in $(( $(date +%s) - START )) s"
