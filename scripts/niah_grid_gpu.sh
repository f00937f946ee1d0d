#!/usr/bin/env bash
# The needle-in-a-haystack grid of launch/eval_niah.py on one GPU machine, jobs side by side (the 135M model leaves
# an H100 mostly idle; nothing here is timed):
#   real W = 2 (torchrun, NCCL), and real W = 4 when the machine has 4 GPUs;
#   simulated W = 8 (and W = 4 on a 2-GPU machine) in one process (reference_attention; one dense run per case
#   serves every simulated size).
# Each length's cases are split into SPLITS contiguous chunks, one job per (world sizes, length, chunk). Each job
# writes OUT_DIR/{w2,w4,sim}_{length}_{chunk}.jsonl as it goes (a job cut by the time limit keeps its rows), and
# everything ends up in OUT_DIR.tar too (the device tool returns only a few files per call).
#
#   bash scripts/niah_grid_gpu.sh OUT_DIR [GGUF_FILE] [SECONDS] [CASES_PER_TASK] [SPLITS] [LENGTHS...]
#   python launch/eval_niah.py --summarize OUT_DIR/*.jsonl --table niah.md --plot niah.png
set -u
usage="usage: niah_grid_gpu.sh OUT_DIR [GGUF_FILE] [SECONDS] [CASES_PER_TASK] [SPLITS] [LENGTHS...]"
out=${1:?$usage}
gguf=${2:+--gguf $2}
cache=${NIAH_CACHE_DIR:+--cache-dir $NIAH_CACHE_DIR}  # where the dequantized model is kept (eval_niah --cache-dir)
limit=${3:-500}
cases=${4:-50}
splits=${5:-1}
shift $(( $# < 5 ? $# : 5 ))
lengths=${*:-1024 2048 4096 8000}
gpus=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
mkdir -p "$out"
export OMP_NUM_THREADS=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root: launch/ imports spava_ds
python3 launch/eval_niah.py --prepare $gguf $cache || exit 1  # the safetensors cache, once, before the jobs share it
if [ "$gpus" -ge 4 ]; then real="2 4"; sim="8"; else real="2"; sim="4 8"; fi
total=$(( 2 * cases ))  # two tasks (single, multikey) per case number
chunk=$(( (total + splits - 1) / splits ))
port=29600
job=0
for length in $lengths; do
  for ((s = 0; s < splits; s++)); do
    ids=$(seq -s ' ' $(( s * chunk )) $(( (s + 1) * chunk < total ? (s + 1) * chunk - 1 : total - 1 )))
    common=(--lengths "$length" --cases "$cases" --case-ids $ids $cache --resume)  # a later call continues
    for w in $real; do
      port=$((port + 1))
      # spread the jobs' rank 0s over the GPUs: rotate the visible devices per job
      devices=$(python3 -c "g=$gpus; j=$job; print(','.join(str((j + i) % g) for i in range(g)))")
      CUDA_VISIBLE_DEVICES=$devices timeout "$limit" torchrun --standalone --nproc_per_node "$w" \
        --master_port "$port" launch/eval_niah.py "${common[@]}" --out "$out/w${w}_${length}_$s.jsonl" \
        > "$out/w${w}_${length}_$s.log" 2>&1 &
      job=$((job + 1))
    done
    CUDA_VISIBLE_DEVICES=$((job % gpus)) timeout "$limit" python3 launch/eval_niah.py --simulate $sim "${common[@]}" \
      --out "$out/sim_${length}_$s.jsonl" > "$out/sim_${length}_$s.log" 2>&1 &
    job=$((job + 1))
  done
done
wait
for f in "$out"/*.jsonl; do echo "$f: $(wc -l < "$f") rows"; done
tar -cf "$out.tar" -C "$(dirname "$out")" "$(basename "$out")"
