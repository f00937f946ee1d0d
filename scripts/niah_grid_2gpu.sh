#!/usr/bin/env bash
# The needle-in-a-haystack grid of launch/eval_niah.py on one 2-GPU machine, all jobs at once (the 135M model
# leaves an H100 mostly idle, so jobs share the GPUs; nothing here is timed):
#   real W = 2 (torchrun, NCCL) and simulated W = 4 and W = 8 (reference_attention in one process), one job per
#   context length, each writing OUT_DIR/w{W}_{length}.jsonl as it goes (a job cut by the time limit keeps its rows).
#
#   bash scripts/niah_grid_2gpu.sh OUT_DIR [GGUF_FILE] [SECONDS] [CASES_PER_TASK]
#   python launch/eval_niah.py --summarize OUT_DIR/*.jsonl --table niah.md --plot niah.png
set -u
out=${1:?usage: niah_grid_2gpu.sh OUT_DIR [GGUF_FILE] [SECONDS] [CASES_PER_TASK]}
gguf=${2:+--gguf $2}
limit=${3:-500}
cases=${4:-50}
mkdir -p "$out"
export OMP_NUM_THREADS=2 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 launch/eval_niah.py --prepare $gguf || exit 1  # the safetensors cache, once, before the jobs share it
i=0
for length in 1024 2048 4096 8000; do
  timeout "$limit" torchrun --standalone --nproc_per_node 2 launch/eval_niah.py --lengths "$length" \
    --cases "$cases" --out "$out/w2_$length.jsonl" > "$out/w2_$length.log" 2>&1 &
  for w in 4 8; do
    CUDA_VISIBLE_DEVICES=$((i % 2)) timeout "$limit" python3 launch/eval_niah.py --simulate "$w" --lengths "$length" \
      --cases "$cases" --out "$out/w${w}_$length.jsonl" > "$out/w${w}_$length.log" 2>&1 &
    i=$((i + 1))
  done
done
wait
for f in "$out"/*.jsonl; do echo "$f: $(wc -l < "$f") rows"; done
tail -n 3 "$out"/*.log
