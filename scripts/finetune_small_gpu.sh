#!/usr/bin/env bash
# Train the small Qwen2.5-VL-shaped model (make_tiny_model.py --preset small) on the synthetic video tasks with the
# GPUs of one machine, and evaluate it on a held-out split. Used for docs/accuracy.md (fine-tuning section).
#
#   scripts/finetune_small_gpu.sh OUT_DIR [MINUTES] [INIT_MODEL] [TRAIN_VIDEOS] [CONFIG]
#
# MINUTES of training (default 6), after a 40-step probe that measures the step rate so that the learning-rate
# schedule ends when the time does. INIT_MODEL: a checkpoint to continue (default: a fresh small model).
# Data: TRAIN_VIDEOS (default 20000) training videos of 8/16/32/64 frames and 180 held-out ones, rendered with all
# CPU cores. Writes OUT_DIR/run/{metrics.jsonl,eval_step*.jsonl,model/} and OUT_DIR/result.tar (model + logs).
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [MINUTES] [INIT_MODEL] [TRAIN_VIDEOS] [CONFIG]}
MINUTES=${2:-6}
INIT=${3:-}
TRAIN_VIDEOS=${4:-20000}
CONFIG=${5:-configs/finetune_gpu_small.json}
PY=${PYTHON:-python3}
GPUS=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
mkdir -p "$OUT"
export OMP_NUM_THREADS=1  # data workers and generators: one thread each
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root: launch/ imports spava_ds

echo "[$(date +%T)] rendering $TRAIN_VIDEOS training + 180 held-out videos with $WORKERS processes"
$PY -m spava_ds.tasks --out "$OUT/data" --train "$TRAIN_VIDEOS" --test 180 --frames 8,16,32,64 --seed 11 \
    --workers "$WORKERS" 2>&1 | grep -v "videos:" || true
if [ -z "$INIT" ]; then
    INIT=$OUT/init
    $PY launch/make_tiny_model.py --preset small --out "$INIT"
fi
common=(--deepspeed-config "$CONFIG" --train "$OUT/data/train.jsonl" --num-workers 3)
echo "[$(date +%T)] probe: 40 steps on $GPUS GPU(s)"
$PY -m deepspeed.launcher.runner --num_gpus "$GPUS" launch/finetune.py "${common[@]}" --model "$INIT" \
    --output "$OUT/probe" --max-steps 40 --no-export --overwrite  # a throwaway measurement
STEPS=$($PY - "$OUT/probe/metrics.jsonl" "$MINUTES" <<'PYEOF'
import json, sys
times = [e["time"] for e in map(json.loads, open(sys.argv[1])) if "time" in e][10:]
rate = (len(times) - 1) / (times[-1] - times[0])
print(int(rate * 60 * float(sys.argv[2]) * 0.92))  # 8% for the periodic evaluations
PYEOF
)
echo "[$(date +%T)] training $STEPS steps (about $MINUTES minutes)"
$PY -m deepspeed.launcher.runner --num_gpus "$GPUS" launch/finetune.py "${common[@]}" --model "$INIT" \
    --output "$OUT/run" --max-steps "$STEPS" --max-minutes "$($PY -c "print($MINUTES * 1.15)")" \
    --eval "$OUT/data/test.jsonl" --eval-every $(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))
tar -cf "$OUT/result.tar" -C "$OUT" run/metrics.jsonl run/model $(cd "$OUT" && ls run/eval_step*.jsonl)
echo "[$(date +%T)] done: $OUT/result.tar"
