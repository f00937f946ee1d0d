#!/usr/bin/env bash
# Accuracy against video length (launch/eval_videoqa.py) on one 4-GPU machine, jobs side by side (nothing is
# timed): real W = 2 and W = 4 (torchrun, NCCL) and W = 8 simulated in one process, plus W = 4 with a forced
# 16-token passing budget. Held-out videos of 16/32/64/128 frames are rendered first (the seeds of docs/accuracy.md).
# Each job writes OUT_DIR/<job>.jsonl as it goes; everything ends up in OUT_DIR.tar.
#
#   bash scripts/videoqa_grid_gpu.sh OUT_DIR MODEL_DIR [SECONDS] [LIMIT_PER_LENGTH]
#   python launch/eval_videoqa.py --summarize OUT_DIR/w*.jsonl --table table.md --plot accuracy.png
set -u
out=${1:?usage: videoqa_grid_gpu.sh OUT_DIR MODEL_DIR [SECONDS] [LIMIT_PER_LENGTH]}
model=${2:?usage: videoqa_grid_gpu.sh OUT_DIR MODEL_DIR [SECONDS] [LIMIT_PER_LENGTH]}
limit=${3:-300}
cases=${4:-60}
mkdir -p "$out"
export OMP_NUM_THREADS=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root: launch/ imports spava_ds
tests=()
for spec in 16:116 32:132 64:164 128:228; do
  frames=${spec%:*}
  python3 -m spava_ds.tasks --out "$out/data/test$frames" --train 0 --test 60 --frames "$frames" \
    --seed "${spec#*:}" --workers 8 > /dev/null 2>&1 &
  tests+=("$out/data/test$frames/test.jsonl")
done
wait
common=(--model "$model" --tests "${tests[@]}" --limit "$cases")
CUDA_VISIBLE_DEVICES=0,1 timeout "$limit" torchrun --standalone --nproc_per_node 2 --master_port 29511 \
  launch/eval_videoqa.py "${common[@]}" --out "$out/w2.jsonl" > "$out/w2.log" 2>&1 &
timeout "$limit" torchrun --standalone --nproc_per_node 4 --master_port 29512 \
  launch/eval_videoqa.py "${common[@]}" --out "$out/w4.jsonl" > "$out/w4.log" 2>&1 &
timeout "$limit" torchrun --standalone --nproc_per_node 4 --master_port 29513 \
  launch/eval_videoqa.py "${common[@]}" --passing-len 16 --methods dense spava apb --out "$out/w4_pass16.jsonl" \
  > "$out/w4_pass16.log" 2>&1 &
CUDA_VISIBLE_DEVICES=3 timeout "$limit" python3 launch/eval_videoqa.py "${common[@]}" --simulate 8 \
  --out "$out/w8sim.jsonl" > "$out/w8sim.log" 2>&1 &
wait
for f in "$out"/*.jsonl; do echo "$f: $(wc -l < "$f") rows"; done
tail -n 3 "$out"/*.log
tar -cf "$out.tar" -C "$(dirname "$out")" --exclude data "$(basename "$out")"
