#!/usr/bin/env bash
# The GPU check: the gpu-marked tests, then a short bench on the base model (75 M parameters,
# 128 px): fp32, bf16-mixed, fp16-mixed and the hand-written torch.amp loop with TF32 off; bf16-true by
# update method (masters, Kahan, stochastic rounding); bf16-storage and 8-bit moments; then fp32
# and bf16-mixed with TF32 on; then the pi0-sized preset fitted into a 24 GiB budget and trained
# 3 steps with the choice. Prints the bench tables and the fit; not yet run on a GPU.
#
# Made for this project's GPU machine (Python 3.12, its own torch with CUDA, no network): it never
# installs torch; the packages that machine lacks come as wheels from .whl/, made here beforehand by
# scripts/gpu_wheels.sh. Usage, from the repository root:
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else runs/gpu_check)
set -euo pipefail
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vlamp-site .whl/*.whl
  export PYTHONPATH=/tmp/vlamp-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this is the GPU check"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
PY

echo "== gpu tests"
# (-o addopts=: one process; the image has pytest but not pytest-xdist, which addopts asks for)
python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts= tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"

echo "== data: 2 tasks x 6 episodes at 128 px"
data=/tmp/vlamp-gpu-data
[ -d "$data" ] || python3 -m vlamp data generate --tasks drawer-open,drawer-close \
  --episodes-per-task 6 --image-size 128 --out "$data"

common=(--steps 60 --warmup 10 --rounds 3 --episodes 0 --no-progress
        train.device=cuda model.size=base "dataset.path=$data" dataset.val_episodes=1
        train.batch_size=64 train.warmup_steps=10 train.log_every=10)
echo "== bench, TF32 off"
python3 -m vlamp bench --modes fp32,bf16-mixed,fp16-mixed --out "$out/bench_tf32_off" \
  "${common[@]}" precision.tf32=false
echo "== bench, bf16-true updated with FP32 masters, Kahan compensation, stochastic rounding"
python3 -m vlamp bench --modes bf16-true,bf16-true/kahan,bf16-true/stochastic --no-baseline \
  --out "$out/bench_updates" "${common[@]}"
echo "== bench, the memory levers: bf16 storage with fp32 compute, 8-bit moments"
python3 -m vlamp bench --modes bf16-storage,bf16-true/stochastic+8bit,bf16-mixed+8bit --no-baseline \
  --out "$out/bench_levers" "${common[@]}"
echo "== bench, TF32 on"
python3 -m vlamp bench --modes fp32,bf16-mixed --no-baseline --out "$out/bench_tf32_on" \
  "${common[@]}" precision.tf32=true
echo "== the pi0-sized preset (3.25 B) in a 24 GiB budget: fit, then 3 steps with its choice"
echo "   (the budget caps this process's CUDA allocator, standing in for a 24 GB card)"
pi0=(model.name=hf-vlm model.size=pi0 model.image_size=128 train.device=cuda train.batch_size=8 train.clip_grad_norm=0
     "dataset.path=$data" dataset.val_episodes=0)
python3 -m vlamp fit "${pi0[@]}" --budget 24GiB --rows 12 2>&1 | tee "$out/fit_pi0_24gib.txt"
python3 -m vlamp train "${pi0[@]}" precision.mode=auto train.memory_budget=24GiB train.steps=3 \
  train.save_every=0 eval.final=false train.log_every=1 train.warmup_steps=1 --no-progress \
  output_dir="$out/pi0_24gib" 2>&1 | tail -5
grep '"memory"' "$out/pi0_24gib/metrics.jsonl"
