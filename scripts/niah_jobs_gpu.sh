#!/usr/bin/env bash
# Chosen cases of the needle-in-a-haystack evaluation on one 4-GPU machine, as a list of jobs:
#   w4:LENGTH:IDS   real W = 4 (torchrun, NCCL, all 4 GPUs); these run one after another, the rest beside them
#   w2:LENGTH:IDS   real W = 2 on a pair of GPUs (pairs alternate)
#   sim:LENGTH:IDS  simulated W = 2, 4 and 8 in one process (reference_attention) on one GPU
# IDS: case numbers of `--cases 50` at that length, e.g. 31-99 or 21-49,91-99; an optional fourth field names
# the job (sim:8000:21-35:a, sim:8000:36-49:b) so that several jobs of one kind and length can run side by side.
# Every job writes OUT_DIR/{kind}_{length}[_{tag}].jsonl with --resume, so running the same command again (on a
# warm machine, within the time limit of a call) continues where the last one stopped. Everything ends up in
# OUT_DIR.tar too.
#
#   bash scripts/niah_jobs_gpu.sh OUT_DIR SECONDS [--gguf FILE] JOB...
#   python launch/eval_niah.py --summarize OUT_DIR/*.jsonl
set -u
usage="usage: niah_jobs_gpu.sh OUT_DIR SECONDS [--gguf FILE] JOB..."
out=${1:?$usage}
limit=${2:?$usage}
shift 2
gguf=()
if [ "${1:-}" = "--gguf" ]; then gguf=(--gguf "$2"); shift 2; fi
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$out"
export OMP_NUM_THREADS=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root: launch/ imports spava_ds
python3 launch/eval_niah.py --prepare "${gguf[@]}" || exit 1  # the safetensors cache, once, before the jobs share it
ids() { python3 -c "import sys; print(' '.join(str(i) for part in sys.argv[1].split(',') for i in
  (range(int(part.split('-')[0]), int(part.split('-')[-1]) + 1))))" "$1"; }
w4_jobs=()
pair=0
gpu=0
port=29650
for spec in "$@"; do
  IFS=: read -r kind length range tag <<< "$spec"
  name=${kind}_$length${tag:+_$tag}
  common=(--lengths "$length" --cases 50 --case-ids $(ids "$range") --resume --out "$out/$name.jsonl")
  case $kind in
    w4) w4_jobs+=("$length:$range:$name") ;;
    w2) port=$((port + 1))
        CUDA_VISIBLE_DEVICES=$((2 * pair)),$((2 * pair + 1)) timeout "$limit" torchrun --standalone \
          --nproc_per_node 2 --master_port "$port" launch/eval_niah.py "${common[@]}" \
          > "$out/$name.log" 2>&1 &
        pair=$(((pair + 1) % 2)) ;;
    sim) CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 launch/eval_niah.py --simulate 2 4 8 "${common[@]}" \
          > "$out/$name.log" 2>&1 &
         gpu=$(((gpu + 1) % 4)) ;;
    *) echo "unknown job kind '$kind' in '$spec' (w4, w2 or sim)" >&2; exit 2 ;;
  esac
done
(  # the W = 4 jobs in turn, under one deadline
  end=$((SECONDS + limit))
  for job in "${w4_jobs[@]}"; do
    IFS=: read -r length range name <<< "$job"
    left=$((end - SECONDS)); [ "$left" -gt 10 ] || break
    timeout "$left" torchrun --standalone --nproc_per_node 4 --master_port 29640 launch/eval_niah.py \
      --lengths "$length" --cases 50 --case-ids $(ids "$range") --resume --out "$out/$name.jsonl" \
      > "$out/$name.log" 2>&1
  done
) &
wait
for f in "$out"/*.jsonl; do echo "$f: $(wc -l < "$f") rows"; done
tar -cf "$out.tar" -C "$(dirname "$out")" "$(basename "$out")"
