r"""python -m finetune.export: the chosen model where other ecosystems load it.

  python -m finetune.export --workdir=runs/demo/finetune --output_dir=runs/demo/export
  python -m finetune.export --head=probe:runs/demo/probe --output_dir=runs/demo/export_probe

Writes into OUTPUT_DIR:
* a Hugging Face ``save_pretrained`` directory of the (fine-tuned) vision tower
  (``config.json``, ``model.safetensors``, ``preprocessor_config.json``: load it
  with ``CLIPVisionModel`` (``CLIPVisionModelWithProjection`` for a head on projected
  features), ``SiglipVisionModel`` or ``Dinov2Model`` / ``Dinov2WithRegistersModel``;
  the model card says how to compute the feature the head reads);
* ``head.safetensors`` (``weight`` (C, F), ``bias`` (C,): a ``torch.nn.Linear``) and
  ``head.json`` (class names, which feature the head reads, the run it came from);
* ``logits.jax_export``: a serialised ``jax.export`` function (StableHLO) from
  uint8 NHWC images of any batch size to logits, normalisation inside, that
  ``jax.export.deserialize(open(f, 'rb').read()).call(images)`` runs without this code base;
* ``README.md``: the model card (dataset, rung, validation protocol, top-1 with its interval).

``--workdir`` is ``--head=finetune:WORKDIR``; probe and zero-shot runs export through
``--head=probe:DIR`` / ``zeroshot:DIR`` (the pretrained tower plus their head).
An interrupted or diverged run is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from clip_transfer import flags
from clip_transfer import models
from clip_transfer import outputs
from clip_transfer.errors import Parser, UserError, cli_main
from clip_transfer.protocol import rungs

HEAD_WEIGHTS, HEAD_JSON, JAX_FILE, CARD = ('head.safetensors', 'head.json', 'logits.jax_export',
                                            'README.md')
OWNED_FILES = ('config.json', 'model.safetensors', 'preprocessor_config.json', HEAD_WEIGHTS,
               HEAD_JSON, JAX_FILE, CARD)


@dataclasses.dataclass
class ExportConfig:
  output_dir: str = flags.field(help='where the export goes (a new or empty directory)')
  workdir: Optional[str] = flags.field(None, 'a finetune.train workdir (= --head=finetune:DIR)')
  head: Optional[str] = flags.field(None, 'probe:DIR, zeroshot:DIR or finetune:WORKDIR')
  mode: Optional[str] = flags.field(None, 'the fine-tuned method when the workdir holds several '
                                    '(full, full@probe+wise, …)')
  model: Optional[str] = flags.field(None, 'where the weights are now (default: the model the '
                                     'run recorded); refused unless its checksum matches')
  jax_export: bool = flags.field(True, 'also write logits.jax_export (--no_jax_export to skip)')
  overwrite: bool = flags.field(False, 'replace an export this tool wrote in --output_dir')

  def __post_init__(self):
    if (self.workdir is None) == (self.head is None):
      raise UserError('pass exactly one of --workdir (a fine-tune run) and --head '
                      '(probe:DIR, zeroshot:DIR or finetune:WORKDIR)')
    if self.workdir is not None:
      # Checked here so the refusal names the flag the user typed, not the --head it becomes.
      if not os.path.isdir(self.workdir):
        raise UserError(f'--workdir={self.workdir}: no such directory (a finetune.train '
                        '--workdir)')
      self.head = f'finetune:{self.workdir}'


@dataclasses.dataclass
class Exported:
  """The parts of an export, as arrays (what ``export`` writes)."""

  vision: dict  # the vision tower's params (linen tree)
  projection: Optional[np.ndarray]  # (D, P) visual projection when the head reads it
  weight: np.ndarray  # (C, F) the head as torch.nn.Linear
  bias: np.ndarray  # (C,)


def parts(rung: rungs.Rung, params: dict) -> Exported:
  """The tower, projection and head of ``rung.params(…)`` (a probe's standardisation folded in)."""
  from clip_transfer.protocol import heads  # pylint: disable=g-import-not-at-top

  proj = params.get('projection')
  projection = None if proj is None else np.asarray(proj['kernel'], np.float32)
  h = params['head']
  if rung.kind == 'probe':
    kernel, bias = heads.fold(h['kernel'], h['bias'], h['mean'], h['std'])
  else:
    kernel, bias = np.asarray(h['kernel'], np.float32), np.asarray(h['bias'], np.float32)
  return Exported(params['backbone'], projection, np.ascontiguousarray(kernel.T), bias)


def jax_function(rung: rungs.Rung, pretrained, params: dict) -> bytes:
  """The serialised uint8 (B, H, W, 3) → float32 (B, C) function; B is symbolic."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  fn = rung.logits_fn(pretrained)
  h, w, c = pretrained.preprocess.output_shape
  (b,) = jax.export.symbolic_shape('b')
  # The weights are closed over: constants of the exported program, so it stands alone.
  exported = jax.export.export(jax.jit(lambda images: fn(params, images)))(
      jax.ShapeDtypeStruct((b, h, w, c), jnp.uint8))
  return bytes(exported.serialize())


def model_card(rung: rungs.Rung, arch: str, pretrained) -> str:
  from clip_transfer.models import hf_export  # pylint: disable=g-import-not-at-top
  m, hd = rung.entry, rung.header
  ds, val = hd.get('dataset') or {}, hd.get('validation') or {}
  lo, hi = (m.get('top1_ci95') or [float('nan')] * 2)[:2]
  chosen = ', '.join(f'{k} {v:g}' for k, v in (m.get('selected') or {}).items()
                     if isinstance(v, (int, float)))
  processor, feature = hf_export.usage(pretrained, rung.feature)
  feature = feature.replace('\n', '\n  ')
  return f"""# {ds.get('name')} classifier ({rung.kind}: {rung.method})

A {len(rung.class_names)}-class image classifier: `{pretrained.name}`'s vision tower
({'fine-tuned' if rung.kind == 'finetune' else 'frozen'}) plus a linear head, exported by
clip-transfer's `finetune.export` from `{rung.spec}`.

| | |
|---|---|
| dataset | `{ds.get('spec')}` ({ds.get('name')} {ds.get('version')}), trained on `{ds.get('train_split')}`, scored on `{ds.get('eval_split')}` ({hd.get('num_eval')} images) |
| rung | {rung.kind}, method `{rung.method}`{f' ({chosen} chosen on validation)' if chosen else ''}{'' if rung.head_init == 'zeros' else f', head started from `{rung.head_init}`'} |
| validation protocol | {_validation_text(val)} |
| top-1 on `{ds.get('eval_split')}` | {100 * m.get('top1', float('nan')):.2f}% (95% bootstrap interval {100 * lo:.2f}–{100 * hi:.2f}) |
| backbone weights | `{pretrained.name}`, params sha256 `{str(rung.weights_sha256)[:16]}…` |

## Use from PyTorch

```python
import json, torch, transformers
from safetensors.torch import load_file
d = 'THIS_DIRECTORY'
tower = transformers.{arch}.from_pretrained(d).eval()
processor = transformers.{processor}.from_pretrained(d)
head = load_file(f'{{d}}/{HEAD_WEIGHTS}')
names = json.load(open(f'{{d}}/{HEAD_JSON}'))['class_names']
with torch.no_grad():
  out = tower(**processor(images=[pil_image], return_tensors='pt'))
  {feature}
  logits = x @ head['weight'].T + head['bias']
print(names[int(logits.argmax(-1))])
```

## Use from JAX (no clip-transfer needed)

```python
import jax, numpy as np
fn = jax.export.deserialize(open('THIS_DIRECTORY/{JAX_FILE}', 'rb').read())
logits = fn.call(images)  # uint8 (B, {pretrained.preprocess.output_shape[0]}, {pretrained.preprocess.output_shape[1]}, 3), resized and centre-cropped
```
"""


def _validation_text(val: dict) -> str:
  if not val:
    return 'none recorded (zero-shot: nothing was chosen on labels)'
  return (f"a stratified, seeded ({val.get('seed')}) {100 * val.get('fraction', 0):.0f}% of the "
          f"train split ({val.get('num_examples')} images, ids sha256 "
          f"`{str(val.get('ids_sha256'))[:12]}…`) chose every hyperparameter; the eval split was "
          'scored once')


def export(config: ExportConfig) -> dict:
  """Writes the export; returns what was written (paths, classes, the transformers class)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from clip_transfer.models import hf_export  # pylint: disable=g-import-not-at-top

  rung = rungs.open_rung(config.head, config.mode)  # interrupted or diverged: refused here
  outputs.prepare_output_dir(config.output_dir, config.overwrite, 'export', OWNED_FILES,
                             complete=HEAD_JSON, clear=False)
  pretrained = models.load(config.model or rung.model.get('name'))
  rung.check_model(pretrained)
  outputs.prepare_output_dir(config.output_dir, config.overwrite, 'export', OWNED_FILES,
                             complete=HEAD_JSON)
  params = rung.params(pretrained)  # a fine-tuned model's checkpoint, read once
  p = parts(rung, params)
  out = config.output_dir
  arch = hf_export.save_vision(pretrained, p.vision, out, p.projection)
  save_file({'weight': p.weight, 'bias': p.bias}, os.path.join(out, HEAD_WEIGHTS))
  if config.jax_export:
    with open(os.path.join(out, JAX_FILE), 'wb') as fh:
      fh.write(jax_function(rung, pretrained, params))
  with open(os.path.join(out, CARD), 'w') as fh:
    fh.write(model_card(rung, arch, pretrained))
  info = {'class_names': rung.class_names,
          'feature': hf_export.usage(pretrained, rung.feature)[1],  # Python, from out = tower(…)
          'transformers_class': arch, 'run': rung.spec, 'method': rung.method,
          'top1': rung.entry.get('top1'), 'top1_ci95': rung.entry.get('top1_ci95'),
          'model': rung.model.get('name'), 'weights_sha256': rung.weights_sha256,
          'jax_export': JAX_FILE if config.jax_export else None,
          'jax_input': 'uint8 (B, H, W, 3), resized and centre-cropped as preprocessor_config.json'}
  with open(os.path.join(out, HEAD_JSON), 'w') as fh:  # last: marks a complete export
    json.dump(info, fh, indent=1)
  return {**info, 'output_dir': out}


@cli_main
def main(argv=None):
  p = Parser(prog='python -m finetune.export', description=__doc__.split('\n\n')[0])
  flags.add_flags(p, ExportConfig)
  info = export(flags.from_args(ExportConfig, p.parse_args(argv)))
  print(f'{info["run"]} ({info["method"]}, top1 {info["top1"]:.4f}) → {info["output_dir"]}: '
        f'{info["transformers_class"]} + {HEAD_WEIGHTS}'
        f'{" + " + JAX_FILE if info["jax_export"] else ""}')


if __name__ == '__main__':
  main()
