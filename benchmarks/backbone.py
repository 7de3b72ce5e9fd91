"""Each family's jitted Flax vision tower vs its transformers PyTorch reference, same weights.

    python -m benchmarks.backbone [--families clip,siglip,dinov2 --batch_size 32 --iters 5]

Random base-size weights are made in PyTorch (CLIP ViT-B/32, SigLIP B/16-224,
DINOv2 B/14 at 224 input: its 37x37 position grid interpolated), saved with
save_pretrained and loaded with clip_transfer.models.load, so both sides run the
same network, side by side in one process, calls alternating (JAX, torch, JAX, …;
the figure is the ratio of the median times, each round's ratio beside it). Both
take float32 NCHW/NHWC pixels already normalised (preprocessing excluded); the
compared output is each family's pooled feature (CLIP: pooler_output; SigLIP: the
MAP head; DINOv2: class token ‖ mean patch token). JAX runs as the product does: importing
``clip_transfer.models`` adds the project's XLA:CPU defaults
(``clip_transfer.xla_defaults``) before the backend starts; the XLA_FLAGS it ran
with are in the result.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from clip_transfer import models
from benchmarks import write_json  # pylint: disable=g-import-not-at-top

# Vision tower forward, multiply-accumulates per image (224 px inputs).
GMACS_PER_IMAGE = {'clip': 4.4, 'siglip': 17.6, 'dinov2': 23.0}
LABELS = {'clip': 'CLIP ViT-B/32 (CLIPVisionModel)', 'siglip': 'SigLIP B/16 (SiglipVisionModel)',
          'dinov2': 'DINOv2 B/14 (Dinov2Model)'}


def _reference(family):
  """(transformers model with base-size random weights, its pooled feature from NCHW pixels)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  if family == 'clip':
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig())  # ViT-B/32 shapes
    return ref.eval(), lambda x: ref(pixel_values=x).pooler_output
  if family == 'siglip':
    ref = transformers.SiglipVisionModel(transformers.SiglipVisionConfig())  # B/16, 224
    return ref.eval(), lambda x: ref(pixel_values=x).pooler_output
  ref = transformers.Dinov2Model(transformers.Dinov2Config(image_size=518))  # dinov2-base

  def pooled(x):
    h = ref(pixel_values=x).last_hidden_state
    return torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1)
  return ref.eval(), pooled


def _time_pairs(fn_a, fn_b, iters):
  """Seconds per call of each, measured alternately (a, b, a, b, …) after two warm-up
  calls each, so a shared machine's slow and quick spells fall on both sides alike."""
  for fn in (fn_a, fn_a, fn_b, fn_b):  # warm-up (and compile)
    fn()
  a, b = [], []
  for _ in range(iters):
    for fn, out in ((fn_a, a), (fn_b, b)):
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
  return a, b


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--families', default='clip,siglip,dinov2',
                      help='comma-separated: clip, siglip, dinov2')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='compute and weights dtype, both sides (bfloat16 for GPUs)')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help="the device's peak for --dtype, to print model FLOPs utilisation")
  parser.add_argument('--json', default=None, help='also write the results to this file')
  args = parser.parse_args(argv)
  families = [f for f in args.families.split(',') if f]
  unknown = sorted(set(families) - set(GMACS_PER_IMAGE))
  if unknown:
    parser.error(f'unknown families {unknown}; choose from {sorted(GMACS_PER_IMAGE)}')
  per_family = {f: _one(f, args) for f in families}
  # CLIP's figures stay at the top level, where earlier readers (gpu.sh) find them.
  result = {**per_family.get('clip', {}), 'families': per_family}
  write_json(args.json, result)
  return result


def _one(family, args):
  import torch  # pylint: disable=g-import-not-at-top

  ref, ref_pooled = _reference(family)
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    models.clear_cache()
    pre = models.load(d)
  dtype = jnp.dtype(args.dtype)
  module = pre.module.clone(dtype=dtype)
  backbone, bvars = module.bind(pre.variables).vision_model.unbind()
  bvars = jax.tree_util.tree_map(lambda a: a.astype(dtype), bvars)  # inference: weights too
  models.clear_cache()
  b = args.batch_size
  x = np.random.RandomState(0).randn(b, 224, 224, 3).astype(np.float32)

  forward = jax.jit(lambda v, x: backbone.apply(v, x.astype(dtype)).pooler_output)
  xj = jnp.asarray(x)

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  tdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[args.dtype]
  ref = ref.to(device=device, dtype=tdtype)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=tdtype)

  def torch_forward():
    with torch.inference_mode():
      out = ref_pooled(xt)
    if device == 'cuda':
      torch.cuda.synchronize()
    return out

  jax_s, torch_s = _time_pairs(lambda: forward(bvars, xj).block_until_ready(), torch_forward,
                               args.iters)
  t_jax, t_torch = float(np.median(jax_s)), float(np.median(torch_s))
  round_ratios = sorted(t / j for j, t in zip(jax_s, torch_s))
  err = float(np.abs(np.asarray(forward(bvars, xj), np.float32)
                     - torch_forward().float().cpu().numpy()).max())

  jax_ips, torch_ips = b / t_jax, b / t_torch
  gflops = lambda ips: 2 * GMACS_PER_IMAGE[family] * ips
  result = dict(family=family, model=LABELS[family], batch_size=b,
                jax_images_per_s=round(jax_ips, 2), torch_images_per_s=round(torch_ips, 2),
                ratio=round(jax_ips / torch_ips, 3),
                ratio_per_round=[round(r, 3) for r in round_ratios],
                jax_gflops=round(gflops(jax_ips), 1),
                torch_gflops=round(gflops(torch_ips), 1), max_abs_diff=err, dtype=args.dtype,
                jax_device=str(jax.devices()[0].device_kind), torch_device=device,
                torch_threads=torch.get_num_threads(), xla_flags=os.environ.get('XLA_FLAGS', ''))
  if args.peak_tflops:
    result['jax_mfu'] = round(gflops(jax_ips) / 1e3 / args.peak_tflops, 4)
    result['torch_mfu'] = round(gflops(torch_ips) / 1e3 / args.peak_tflops, 4)
  print(f'backbone {LABELS[family]} {args.dtype}, batch {b}: flax {jax_ips:.2f} img/s '
        f'({gflops(jax_ips):.0f} GFLOP/s), torch {torch_ips:.2f} img/s '
        f'({gflops(torch_ips):.0f} GFLOP/s), ratio {jax_ips / torch_ips:.3f}x '
        f'(rounds {round_ratios[0]:.2f}-{round_ratios[-1]:.2f}), '
        f'max |diff| {err:.2e}', file=sys.stderr)
  del ref, bvars
  return result


if __name__ == '__main__':
  main()
