"""Zero-shot classification with an image-text model's text tower: the first rung of the ladder.

    python -m probe.zeroshot --embeddings=DIR --output_dir=OUT [--templates=openai_imagenet]

The default templates are the model family's own (``templates.default_for``: the CLIP
paper's 80 for CLIP/OpenCLIP, big_vision's canonicalised list for SigLIP); class
names' underscores are spaces in prompts.

Each class is the mean of its L2-normalised prompt embeddings ("a photo of a
{}." …), renormalised (the CLIP paper's prompt ensembling); an image scores
``exp(logit_scale) * cos(image, class)`` (+ ``logit_bias`` for SigLIP, whose
probabilities are the sigmoid of that; its argmax is unchanged). The images come from the embedding
dataset's ``projected`` feature, so no image is read again. Writes
OUT/metrics.json and OUT/zeroshot_head.npz (class embeddings, logit scale,
class names, templates), which a fine-tune can start its head from.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import numpy as np

from clip_transfer.models import templates as templates_lib
from clip_transfer.errors import Parser, UserError, cli_main
from clip_transfer import flags
from clip_transfer.protocol import heads
from clip_transfer.protocol import metrics as metrics_lib
from clip_transfer import outputs
from clip_transfer.protocol import validation
from clip_transfer.protocol.metrics import classification

HEAD_FILE = heads.ZEROSHOT_HEAD_FILE
METHOD = 'zeroshot'
OWNED_FILES = ('metrics.json', 'metrics.json.tmp', HEAD_FILE)  # what a zero-shot run writes
BATCH_SIZE = 256  # prompts per text-tower call; every call has this shape (one compile)


def _normalize(x, xp=np):
  return x / xp.linalg.norm(x, axis=-1, keepdims=True)


def encode_texts(module, variables, tokenizer, texts: Sequence[str],
                 batch_size: int = BATCH_SIZE) -> np.ndarray:
  """L2-normalised ``get_text_features`` of each text: float32 (N, projection_dim)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  ids, mask = tokenizer(texts)
  eos = module.text_config.eos_token_id
  if tokenizer.pools_at == 'last':
    # SigLIP pools at the last position of max-length padded text, trained without a
    # mask: its reference (SiglipModel.get_text_features(input_ids)) passes none.
    mask = np.ones_like(ids)
  elif eos != 2:  # legacy configs (eos_token_id == 2) pool at the highest id instead
    missing = ~(ids == eos).any(axis=1)
    if missing.any():
      raise UserError(f'prompt {texts[int(np.argmax(missing))]!r} has no EOS token '
                      f'({eos}) after tokenizing: the text tower would pool at the wrong position')
  n = len(ids)
  batch = max(1, min(batch_size, n))
  pad = -n % batch
  # Edge padding: the extra rows are real prompts (finite norms), dropped below.
  ids = np.pad(ids, ((0, pad), (0, 0)), mode='edge')
  mask = np.pad(mask, ((0, pad), (0, 0)), mode='edge')

  @jax.jit
  def features(variables, ids, mask):
    f = module.apply(variables, ids, mask, method=type(module).get_text_features)
    return _normalize(f.astype(jnp.float32), jnp)

  out = [np.asarray(features(variables, ids[i:i + batch], mask[i:i + batch]))
         for i in range(0, n + pad, batch)]
  return np.concatenate(out)[:n]


def zeroshot_head(module, variables, tokenizer, class_names: Sequence[str],
                  templates: Sequence[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
  """Class embeddings float32 (C, P): per class, mean of normalised prompt features, renormalised."""
  if not class_names or not templates:
    raise UserError('zero-shot needs at least one class name and one template')
  prompts = [templates_lib.fill(t, c) for c in class_names for t in templates]
  feats = encode_texts(module, variables, tokenizer, prompts, batch_size)
  feats = feats.reshape(len(class_names), len(templates), -1)
  return _normalize(feats.mean(axis=1)).astype(np.float32)


def logit_scale(module, variables) -> float:
  """The model's learned temperature, log-space (CLIP multiplies cosines by its exp)."""
  return float(module.apply(variables, method=lambda m: m.logit_params()[0]))


def logit_bias(module, variables) -> float:
  """SigLIP's learned logit bias; 0 for CLIP, which has none."""
  bias = module.apply(variables, method=lambda m: m.logit_params()[1])
  return 0.0 if bias is None else float(bias)


def zeroshot_logits(projected_image_features, head, logit_scale, logit_bias=0.0) -> np.ndarray:  # pylint: disable=redefined-outer-name
  """``exp(logit_scale) * normalize(img) @ head.T + logit_bias``: float32 (N, C), as
  CLIPModel / SiglipModel ``logits_per_image``."""
  img = _normalize(np.asarray(projected_image_features, np.float32))
  logits = np.exp(np.float32(logit_scale)) * img @ np.asarray(head, np.float32).T
  return (logits + np.float32(logit_bias)).astype(np.float32)


def read_projected(embeddings: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(projected float32 (N, P), labels int64 (N,), ids) of one split of an embedding dataset."""
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top

  if 'projected' not in emb.feature_names(embeddings):
    # Not "re-embed with --projected": a vision-only model (DINOv2) has no projection at all.
    raise UserError(f'{embeddings} has no projected feature (the visual_projection output '
                    'zero-shot compares with text): zero-shot needs a model with a text tower '
                    '(CLIP, SigLIP, OpenCLIP), embedded without --no_projected; vision-only '
                    'models (DINOv2) can be probed but not scored zero-shot')
  return emb.read_split(embeddings, split, feature='projected')


def read_class_names(path: str, expected: int) -> list[str]:
  """One class name per line (blank lines skipped); exactly ``expected`` of them."""
  try:
    with open(path, encoding='utf-8') as f:
      names = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise UserError(f'cannot read --class_names {path}: {e.strerror}') from None
  if len(names) != expected:
    raise UserError(f'{path} holds {len(names)} class names but the dataset has {expected} '
                    'classes (one name per line, in label order)')
  return names


def metrics_json(entry: dict, header: dict) -> dict:
  """The metrics.json of this stage: one method entry under the shared header."""
  return {**header, 'methods': {METHOD: entry}}


def load_head(output_dir: str) -> heads.ZeroshotHead:
  """What this stage saved in ``output_dir`` (the class text embeddings and temperature)."""
  return heads.load_zeroshot_head(output_dir)


def run_zeroshot(embeddings: str, output_dir: Optional[str], *, model: Optional[str] = None,
                 templates: Optional[str] = None, class_names_file: Optional[str] = None,
                 eval_split: str = 'test', batch_size: int = BATCH_SIZE,
                 overwrite: bool = False) -> dict:
  """Zero-shot eval of an embedding dataset; returns the metrics dict (written when output_dir).

  ``templates``: a bundled list or a file; None picks the model family's default.
  """
  from clip_transfer import models  # pylint: disable=g-import-not-at-top
  from clip_transfer.data import embeddings as emb  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  if batch_size < 1:
    raise UserError(f'--batch_size must be at least 1, got {batch_size}')
  # A list named by the user is checked before anything loads; the family default after.
  prompts = templates_lib.load_templates(templates) if templates else None
  metadata = emb.read_metadata(embeddings)
  names = emb.class_names(embeddings)
  if class_names_file:
    names = read_class_names(class_names_file, len(names))
  recorded = metadata.get('model') or {}
  if recorded.get('text_tower') is False and not model:
    raise UserError(f'{embeddings} was embedded by {recorded.get("name")} '
                    f'({recorded.get("family")}), a vision-only model with no text tower; '
                    'zero-shot needs an image-text model (CLIP, SigLIP, OpenCLIP): use the probe')
  x, y, ids = read_projected(embeddings, eval_split)  # refuses a dataset without `projected`
  order = validation.eval_order(ids)
  x, y, ids = x[order], y[order], [ids[i] for i in order]
  if output_dir:  # a file, a read-only directory, foreign files or a previous run without
    # --overwrite (the rule of every stage): refused before the model loads; held exclusively.
    outputs.prepare_output_dir(output_dir, overwrite=overwrite, kind='zero-shot run',
                               owned=OWNED_FILES, complete='metrics.json', clear=False)
  recorded = metadata.get('model') or {}
  model = model or recorded.get('name')
  if not model:
    raise UserError(f'{embeddings}/metadata.json names no model; pass --model')
  pretrained = models.load(model)
  module, variables = pretrained.module, pretrained.variables
  if not pretrained.has_text:
    raise UserError(f'{model} ({pretrained.family}) is a vision-only model with no text tower; '
                    'zero-shot needs an image-text model (CLIP, SigLIP, OpenCLIP): use the probe')
  if x.shape[1] != module.projection_dim:
    raise UserError(f'{embeddings}: projected features are {x.shape[1]}-d but {model} projects '
                    f'to {module.projection_dim}')
  # The images were embedded by some weights; only the same weights' text tower matches them.
  want = metrics_lib.weights_checksum(recorded)
  if not want:
    raise UserError(f'{embeddings}/metadata.json records no model.weights_sha256 to check '
                    f'{model} against')
  got = pretrained.checksum()
  if got != want:
    raise UserError(f'{model} is not the model that embedded {embeddings}: weights sha256 '
                    f'{got[:12]}… != {want[:12]}… recorded (model {recorded.get("name")!r})')
  tok = tokenizer_lib.load_tokenizer(model, module.text_config)
  if prompts is None:
    templates = templates_lib.default_for(pretrained.family)
    prompts = templates_lib.load_templates(templates)
  if output_dir:  # everything checked: only now remove the previous run's files (--overwrite)
    outputs.prepare_output_dir(output_dir, overwrite=overwrite, kind='zero-shot run',
                               owned=OWNED_FILES, complete='metrics.json')

  t0 = time.perf_counter()
  head = zeroshot_head(module, variables, tok, names, prompts, batch_size)
  scale, bias = logit_scale(module, variables), logit_bias(module, variables)
  logits = zeroshot_logits(x, head, scale, bias)
  wall_s = time.perf_counter() - t0
  del variables  # the text tower's work is done

  entry = {**classification(logits, y, names), 'wall_s': wall_s, 'trainable_params': 0,
           'templates': templates, 'num_templates': len(prompts),
           'cost': 'the text tower over every class and template, then scoring the cached '
                   'projected embeddings (the one-off embedding apart)'}
  src = metadata.get('source', {})
  header = metrics_lib.header(
      'zeroshot',
      dataset={'spec': src.get('spec'), 'name': src.get('name'), 'version': src.get('version'),
               'train_split': None, 'eval_split': eval_split},
      model={'name': model, 'revision': recorded.get('revision'), 'weights_sha256': got},
      class_names=names, num_train=0, num_eval=len(y),
      eval=validation.eval_record(ids, y),
      embeddings=embeddings, metadata=metadata, embedding=emb.read_run_info(embeddings),
      logit_scale=scale, logit_bias=bias, batch_size=batch_size)
  out = metrics_json(entry, header)
  if output_dir:
    heads.ZeroshotHead(head, scale, list(names), list(prompts), bias).save(output_dir)
    metrics_lib.write(output_dir, out)
  return out


def summary(metrics: dict) -> str:
  m = metrics['methods'][METHOD]
  pct = lambda v: '-' if v is None else f'{100 * v:.2f}'
  return (f'zeroshot ({m["num_templates"]} templates from {m["templates"]}): top1 {pct(m["top1"])}'
          f'  top5 {pct(m["top5"])}  bal.acc {pct(m["balanced_accuracy"])}  '
          f'{m["wall_s"]:.2f} s')


@dataclasses.dataclass
class ZeroshotConfig:
  """Every zero-shot flag, declared once (clip_transfer.flags, as the other stages)."""

  embeddings: str = flags.field(help='embedding dataset directory with the projected feature '
                                '(pipelines.embed)')
  output_dir: str = flags.field(help='where metrics.json and zeroshot_head.npz go')
  model: Optional[str] = flags.field(None, "default: the model recorded in the dataset's "
                                     'metadata.json')
  templates: Optional[str] = flags.field(
      None, f'a bundled list ({", ".join(templates_lib.available())}) or a .json/.txt file; '
      "each template holds {} for the class name (default: the family's own, "
      f'{templates_lib.DEFAULT} for CLIP/OpenCLIP, '
      f'{templates_lib.FAMILY_DEFAULTS["siglip"]} for SigLIP)')
  class_names: Optional[str] = flags.field(None, 'file with one class name per line, in label '
                                           "order (default: the dataset's label names)")
  eval_split: str = flags.field('test', 'split scored')
  batch_size: int = flags.field(BATCH_SIZE, 'prompts per text-tower call')
  overwrite: bool = flags.field(False, 'replace the zero-shot run this tool wrote in '
                                '--output_dir (nothing else is ever removed)')


@cli_main
def main(argv=None):
  p = Parser(description=__doc__.splitlines()[0])
  flags.add_flags(p, ZeroshotConfig)
  c = flags.from_args(ZeroshotConfig, p.parse_args(argv))
  out = run_zeroshot(c.embeddings, c.output_dir, model=c.model, templates=c.templates,
                     class_names_file=c.class_names, eval_split=c.eval_split,
                     batch_size=c.batch_size, overwrite=c.overwrite)
  print(summary(out))


if __name__ == '__main__':
  main()
