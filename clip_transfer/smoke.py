"""Smoke forward pass: load a model, embed a few images, print what came out.

    python -m clip_transfer.smoke --model=random:tiny
"""

import argparse
import time

import jax
import numpy as np

from clip_transfer import models
from clip_transfer.data import preprocess
from clip_transfer.errors import cli_main


@cli_main
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='random:tiny',
                      help='hub id, save_pretrained directory (CLIP, SigLIP, DINOv2), or a preset: '
                      'random:tiny, random:vit-b32, random:siglip-tiny, random:dinov2-tiny …')
  parser.add_argument('--batch_size', type=int, default=4)
  args = parser.parse_args(argv)

  t0 = time.perf_counter()
  pre = models.load(args.model)
  backbone, backbone_vars = pre.vision_tower()
  rng = np.random.RandomState(0)
  images = [rng.randint(0, 256, (48 + 7 * i, 64, 3), dtype=np.uint8) for i in range(args.batch_size)]
  pixels = preprocess.prepare_batch(images, pre.preprocess)
  forward = jax.jit(lambda v, x: backbone.apply(v, preprocess.normalize(x, pre.preprocess)))
  out = forward(backbone_vars, pixels)
  pooled = np.asarray(out.pooler_output)
  print(f'model {args.model}: {pixels.shape[0]} images {pixels.shape[1:]} uint8 -> '
        f'pooler_output {pooled.shape}, finite={bool(np.isfinite(pooled).all())}, '
        f'{time.perf_counter() - t0:.1f}s')


if __name__ == '__main__':
  main()
