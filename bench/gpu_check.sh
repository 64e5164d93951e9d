#!/usr/bin/env bash
# The GPU checks in one prepared run, on a machine with CUDA (the device tool's machine: its own python3, not
# the venv). Each part is capped so the whole fits in 10 minutes; every log goes under $OUT (default ./gpu-logs).
#   bash bench/gpu_check.sh            # PY=python3 OUT=gpu-logs
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS COMMAND...: run capped, log to $OUT/NAME.log, one status line
  local name=$1 cap=$2; shift 2
  local t0=$SECONDS
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (cap $cap s) -> $OUT/$name.log" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft, accelerate, triton; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| triton',
triton.__version__, '|', torch.cuda.get_device_name())"; } > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
# the CUDA tests: the Triton merge against float64, the micro pipeline on CUDA in bf16
part cuda_tests 140 $PY -m pytest -q -p no:cacheprovider tests/test_merge.py tests/test_device.py -k "cuda or bf16"
part merge_bench 80 $PY bench/merge_bench.py --device cuda --reps 15
part step_bench 50 $PY bench/step_bench.py --repeats 30
part scale_bench 150 $PY bench/scale_bench.py --device cuda --batch 32 --steps 5 --rounds 2
tail -n 6 "$OUT/scale_bench.log"
# the rehearsal of the paper's profile (configs/rehearsal.yaml: Florence-2-base's conventions, the catalogue's files)
# on CUDA in bf16 under torchrun, a vision-language target end to end
part rehearsal_bf16 170 make all PROFILE=rehearsal TARGET=snli-ve PY="$PY" STAMP= \
  LAUNCH="torchrun --nproc_per_node 1" REHEARSAL_ASSETS="$OUT/rehearsal-assets" \
  OVERRIDES="precision=bf16 runs_dir=$OUT/rehearsal-runs backbone.source=$OUT/rehearsal-assets/florence-2-rehearsal data.root=$OUT/rehearsal-assets/data"
tail -n 7 "$OUT/rehearsal_bf16.log"
