"""Attention formulations, measured: the vision tower's forward as it is, the earlier layout, and ``jax.nn.dot_product_attention``.

    python -m benchmarks.attention --dtype bfloat16 --batch_size 256 --peak_tflops 989

Times the embed stage's jitted forward (``pipelines.jax_handler.build_forward``,
uint8 in) on ``random:vit-b32`` as ``clip_transfer.models.clip`` has it, then with
``clip.Attention`` swapped, in this process only, for a subclass whose
softmax(QK^T)V is ``jax.nn.dot_product_attention`` (``implementation``: cudnn's
fused kernel where the platform has one, else XLA's). Same parameter tree;
reports images/s, MFU and the max |difference| of the embeddings. Also the layout
``clip.attend`` replaced (probs @ v asked for in bqhd order directly, which XLA:CPU
ran ~2x slower than head-major then transposed). Nothing in ``clip_transfer/``
changes: adopting a variant is the lead's call (CPU parity must stay ≤ 1e-4).
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import write_json  # pylint: disable=g-import-not-at-top

GMACS_PER_IMAGE = 4.4  # ViT-B/32 vision tower forward


def fused_attention_class(implementation):
  from clip_transfer.models import clip  # pylint: disable=g-import-not-at-top

  class FusedAttention(clip.Attention):
    """clip.Attention with the product, softmax and product fused (same params)."""

    @nn.compact
    def __call__(self, x, mask=None):
      b, l, d = x.shape
      h = self.num_heads
      dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
      q = dense('q_proj')(x) * ((d // h) ** -0.5)  # pre-scaled, as the reference
      k = dense('k_proj')(x)
      v = dense('v_proj')(x)
      q, k, v = (t.reshape(b, l, h, d // h) for t in (q, k, v))
      if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, l, l))
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, is_causal=self.causal,
                                         implementation=implementation)
      return dense('out_proj')(out.reshape(b, l, d))

  return FusedAttention


def bqhd_attend(probs, v):
  """``clip.attend`` before 2026-12-01: the product asked for in (B, Q, H, Dh) order."""
  b, _, q, _ = probs.shape
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, q, -1)


def _time(fn, iters):
  fn().block_until_ready()  # compile
  fn().block_until_ready()
  t = time.perf_counter()
  for _ in range(iters):
    out = fn()
  out.block_until_ready()
  return (time.perf_counter() - t) / iters


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='random:vit-b32')
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--iters', type=int, default=20)
  p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  p.add_argument('--peak_tflops', type=float, default=None, help="the device's peak for --dtype")
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)

  from pipelines import jax_handler  # pylint: disable=g-import-not-at-top
  from clip_transfer import models  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import clip  # pylint: disable=g-import-not-at-top

  pre = models.load(args.model, args.dtype)
  size = pre.preprocess.output_shape
  pixels = jnp.asarray(np.random.RandomState(0).randint(0, 256, (args.batch_size, *size),
                                                        dtype=np.uint8))
  results = {'model': args.model, 'dtype': args.dtype, 'batch_size': args.batch_size,
             'device': str(jax.devices()[0].device_kind), 'variants': {}}
  base_forward = jax_handler.build_forward(pre)
  base_out = np.asarray(base_forward(pixels)[0])
  variants = [('einsum (clip_transfer.models.clip today)', None),
              ('einsum, product in bqhd order (before 2026-12-01)', 'bqhd')]
  on_gpu = jax.devices()[0].platform == 'gpu'
  variants += [('dot_product_attention xla', 'xla')]
  if on_gpu:
    variants += [('dot_product_attention cudnn', 'cudnn')]
  original, original_attend = clip.Attention, clip.attend
  for name, impl in variants:
    try:
      if impl == 'bqhd':
        clip.attend = bqhd_attend
      elif impl is not None:
        clip.Attention = fused_attention_class(impl)
      forward = jax_handler.build_forward(pre)  # traced now: picks up the swapped class
      seconds = _time(lambda: forward(pixels)[0], args.iters)  # pylint: disable=cell-var-from-loop
      diff = float(np.abs(np.asarray(forward(pixels)[0]) - base_out).max())
    except Exception as e:  # pylint: disable=broad-except  (e.g. no cudnn kernel for the shape)
      results['variants'][name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
      print(f'{name}: {results["variants"][name]["error"]}', file=sys.stderr)
      continue
    finally:
      clip.Attention, clip.attend = original, original_attend
    ips = args.batch_size / seconds
    r = {'images_per_s': round(ips, 2), 'gflops': round(2 * GMACS_PER_IMAGE * ips, 1),
         'max_abs_diff_vs_today': diff}
    if args.peak_tflops:
      r['mfu'] = round(2 * GMACS_PER_IMAGE * ips / 1e3 / args.peak_tflops, 4)
    results['variants'][name] = r
    print(f'{name}: {ips:.1f} img/s, {r["gflops"]:.0f} GFLOP/s'
          + (f', MFU {100 * r["mfu"]:.1f}%' if 'mfu' in r else '')
          + f', max |diff| {diff:.2e}', file=sys.stderr)
  write_json(args.json, results)
  return results


if __name__ == '__main__':
  main()
