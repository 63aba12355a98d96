#!/bin/bash
# Predicted vs measured peak: each run records both in metrics.jsonl (train.memory_budget set).
# The bf16-mixed rows measure their plan first (a cached plan is not measured again: delete it
# from ~/.cache/vlamp/plans to see that moment).
cd "$(dirname "$0")/.."
V=${VLAMP:-vlamp}
COMMON="train.steps=3 eval.final=false train.threads=${THREADS:-2} train.memory_budget=200GiB train.log_every=1 train.warmup_steps=1 dataset.val_episodes=0"
mkdir -p "${OUT:-runs/fitcheck}"
run() { name=$1; shift; rm -rf ${OUT:-runs/fitcheck}/$name; $V train $COMMON output_dir=${OUT:-runs/fitcheck}/$name "$@" --no-progress > ${OUT:-runs/fitcheck}/$name.log 2>&1; grep '"memory"' ${OUT:-runs/fitcheck}/$name/metrics.jsonl | tail -1 | sed "s/^/$name /"; }
run tiny-fp32 precision.mode=fp32
run tiny-fp32-ckpt precision.mode=fp32 'train.checkpoint=[Block]'
run tiny-storage precision.mode=bf16-storage
run tiny-storage-8bit precision.mode=bf16-storage precision.optimizer_state=8bit
run tiny-fp32-16x4 precision.mode=fp32 train.batch_size=16 train.grad_accum=4
run tiny-kahan-b128 precision.mode=bf16-storage precision.update=kahan train.batch_size=128
run smol-fp32 model.name=hf-vlm model.size=smolvla precision.mode=fp32 train.batch_size=8
run smol-storage-8bit model.name=hf-vlm model.size=smolvla precision.mode=bf16-storage precision.optimizer_state=8bit train.batch_size=8
run smol-storage-ckpt model.name=hf-vlm model.size=smolvla precision.mode=bf16-storage 'train.checkpoint=[SiglipEncoderLayer,GemmaDecoderLayer]' train.batch_size=8
run smol-lora model.name=hf-vlm model.size=smolvla precision.mode=bf16-storage train.batch_size=8 train.lora.rank=16 'train.lora.targets=[Linear]' 'train.freeze=[Embedding,Conv2d,LayerNorm,GemmaRMSNorm,MultiheadAttention]'
run smol-mixed model.name=hf-vlm model.size=smolvla precision.mode=bf16-mixed train.batch_size=8
run smol-lora-mixed model.name=hf-vlm model.size=smolvla precision.mode=bf16-mixed train.batch_size=8 train.lora.rank=16 'train.lora.targets=[Linear]' 'train.freeze=[Embedding,Conv2d,LayerNorm,GemmaRMSNorm,MultiheadAttention]'
run smol-fp32-8bit-2x4 model.name=hf-vlm model.size=smolvla precision.mode=fp32 precision.optimizer_state=8bit train.batch_size=2 train.grad_accum=4
# The real-size rows of the README (each takes the machine: run them one at a time):
#   fp32 at the depth `vlamp fit --largest model.depth ... --modes fp32 --states auto` finds, and
#   precision.mode=auto at a 3x larger depth (see README, "What fits on your machine"), and
#   the pi0-sized preset with precision.mode=auto train.memory_budget=18GiB.
echo done
