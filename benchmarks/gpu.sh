#!/usr/bin/env bash
# The GPU checks of issue 5, as one script for the `device` tool (not CI):
# ViT-B/32 (random:vit-b32) at batch 256 in bf16 — backbone forward vs PyTorch,
# and fine-tune train step vs forward, with model FLOPs utilisation.
# Uses the GPU image's own jax/flax/optax/torch/transformers (no installs).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PEAK=${PEAK:-989}  # dense bf16 TFLOP/s of an H100/H200 SXM
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
python3 -m benchmarks.backbone --dtype bfloat16 --batch_size 256 --iters 20 --peak_tflops "$PEAK" --json "$OUT/backbone_bf16_b256.json"
python3 -m benchmarks.finetune --model random:vit-b32 --dtype bfloat16 --batch_size 256 --steps 20 --peak_tflops "$PEAK" --json "$OUT/finetune_full_bf16_b256.json"
python3 -m benchmarks.finetune --model random:vit-b32 --dtype bfloat16 --batch_size 512 --steps 20 --peak_tflops "$PEAK" --json "$OUT/finetune_full_bf16_b512.json"
python3 -m benchmarks.finetune --model random:vit-b32 --dtype bfloat16 --batch_size 256 --steps 20 --mode linear --peak_tflops "$PEAK" --json "$OUT/finetune_linear_bf16_b256.json"
python3 -m benchmarks.backbone --dtype float32 --batch_size 256 --iters 10 --json "$OUT/backbone_fp32_b256.json"
