#!/usr/bin/env bash
# The needle-in-a-haystack grid of launch/eval_niah.py on one 2-GPU machine, jobs side by side (the 135M model
# leaves an H100 mostly idle; nothing here is timed):
#   real W = 2 (torchrun, NCCL): one job per context length;
#   simulated W = 4 and 8 in one process per length (reference_attention; one dense run per case serves both).
# Each job writes OUT_DIR/{w2,sim}_{length}.jsonl as it goes (a job cut by the time limit keeps its rows), and
# everything ends up in OUT_DIR.tar too (the device tool returns only a few files per call).
#
#   bash scripts/niah_grid_2gpu.sh OUT_DIR [GGUF_FILE] [SECONDS] [CASES_PER_TASK] [LENGTHS...]
#   python launch/eval_niah.py --summarize OUT_DIR/*.jsonl --table niah.md --plot niah.png
set -u
out=${1:?usage: niah_grid_2gpu.sh OUT_DIR [GGUF_FILE] [SECONDS] [CASES_PER_TASK] [LENGTHS...]}
gguf=${2:+--gguf $2}
limit=${3:-500}
cases=${4:-50}
shift $(( $# < 4 ? $# : 4 ))
lengths=${*:-1024 2048 4096 8000}
mkdir -p "$out"
export OMP_NUM_THREADS=2 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 launch/eval_niah.py --prepare $gguf || exit 1  # the safetensors cache, once, before the jobs share it
i=0
for length in $lengths; do
  timeout "$limit" torchrun --standalone --nproc_per_node 2 launch/eval_niah.py --lengths "$length" \
    --cases "$cases" --out "$out/w2_$length.jsonl" > "$out/w2_$length.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$((i % 2)) timeout "$limit" python3 launch/eval_niah.py --simulate 4 8 --lengths "$length" \
    --cases "$cases" --out "$out/sim_$length.jsonl" > "$out/sim_$length.log" 2>&1 &
  i=$((i + 1))
done
wait
for f in "$out"/*.jsonl; do echo "$f: $(wc -l < "$f") rows"; done
tar -cf "$out.tar" -C "$(dirname "$out")" "$(basename "$out")"
