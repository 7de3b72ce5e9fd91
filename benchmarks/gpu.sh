#!/usr/bin/env bash
# The GPU checks, as one script for the `device` tool (not CI). Uses the GPU
# image's own jax/flax/optax/torch/transformers (no installs).
#  issue 5:  ViT-B/32 (random:vit-b32) at batch 256 in bf16 — backbone forward vs
#            PyTorch, and fine-tune train step vs forward, with model FLOPs utilisation.
#  issue 12: embed pipeline vs backbone-only vs the all-core preprocessing limit on
#            512-px JPEGs (random:vit-b32, bf16, batch 256; goal >= 0.8 of the smaller
#            limit), forward MFU with and without jax.nn.dot_product_attention
#            (goal >= 40%), and the probe on 50,000 x 768, 100 classes (JAX on the GPU
#            vs scikit-learn on this machine's CPU; goal >= 10x).
# Time: each step has a limit; issue 12's steps (first) sum to 7 minutes, issue 5's to 6 more.
# Not yet run on a GPU. Needs apache_beam, array_record and tensorflow_datasets in the image
# (the version line below fails loudly if beam is missing).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PEAK=${PEAK:-989}  # dense bf16 TFLOP/s of an H100/H200 SXM
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import jax, flax, optax, torch, transformers, apache_beam; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'beam', apache_beam.__version__, jax.devices())"
# Each step has its own time limit, so one slow step cannot spend the whole lease.
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" || echo "!! exit $? ($limit s limit): $*"; }
# issue 12 first (the open question): pipeline vs backbone vs host limit, then MFU.
step 180 python3 -m benchmarks.embed --model random:vit-b32 --dtype bfloat16 --batch_size 256 \
  --images 16384 --unique_images 512 --image_size 512 --repeats 2 --with_limit \
  --skip_memory --skip_decode_bound --skip_fast_decode --json "$OUT/embed_pipeline_bf16_b256.json"
step 90 python3 -m benchmarks.attention --dtype bfloat16 --batch_size 256 --iters 20 --peak_tflops "$PEAK" --json "$OUT/attention_bf16_b256.json"
step 150 python3 -m benchmarks.probe --num 50000 --dim 768 --classes 100 --skip_digits --json "$OUT/probe_50k_768_100.json"
# issue 5 (measured before; rerun if time is left)
step 60 python3 -m benchmarks.backbone --dtype bfloat16 --batch_size 256 --iters 20 --peak_tflops "$PEAK" --json "$OUT/backbone_bf16_b256.json"
step 60 python3 -m benchmarks.finetune --model random:vit-b32 --dtype bfloat16 --batch_size 256 --steps 20 --peak_tflops "$PEAK" --json "$OUT/finetune_full_bf16_b256.json"
step 60 python3 -m benchmarks.finetune --model random:vit-b32 --dtype bfloat16 --batch_size 512 --steps 20 --peak_tflops "$PEAK" --json "$OUT/finetune_full_bf16_b512.json"
step 60 python3 -m benchmarks.finetune --model random:vit-b32 --dtype bfloat16 --batch_size 256 --steps 20 --mode linear --peak_tflops "$PEAK" --json "$OUT/finetune_linear_bf16_b256.json"
step 60 python3 -m benchmarks.backbone --dtype float32 --batch_size 256 --iters 10 --json "$OUT/backbone_fp32_b256.json"
