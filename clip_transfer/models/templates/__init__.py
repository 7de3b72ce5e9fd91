"""Prompt templates for zero-shot classification, kept as data (one JSON list per name).

Bundled lists (``{}`` is replaced by the class name):

- ``openai_imagenet``: the CLIP paper's 80 ImageNet templates (openai/CLIP
  ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``; open_clip's
  ``OPENAI_IMAGENET_TEMPLATES``).
- ``openai_imagenet_7``: the notebook's 7-template subset (open_clip's
  ``SIMPLE_IMAGENET_TEMPLATES``).
- ``cifar10``, ``cifar100``: the 18 templates of openai/CLIP ``data/prompts.md``.
- ``simple``: ``a photo of a {}.``, the paper's baseline prompt.
"""

from __future__ import annotations

import json
import os

from clip_transfer.errors import UserError

_DIR = os.path.dirname(os.path.abspath(__file__))
PLACEHOLDER = '{}'


def available() -> list[str]:
  """Names of the bundled template lists."""
  return sorted(f[:-len('.json')] for f in os.listdir(_DIR) if f.endswith('.json'))


def load_templates(name_or_file: str) -> list[str]:
  """A bundled name, or a path to a .json list / .txt file with one template per line."""
  bundled = os.path.join(_DIR, f'{name_or_file}.json')
  if os.sep not in name_or_file and os.path.isfile(bundled):
    path = bundled
  elif os.path.isfile(name_or_file):
    path = name_or_file
  elif os.sep in name_or_file or name_or_file.endswith(('.json', '.txt')):
    raise UserError(f'--templates file {name_or_file} does not exist')  # a path, not a name
  else:
    raise UserError(f'no template list {name_or_file!r}: pass a file (.json list or .txt, one '
                    f'template per line) or one of {", ".join(available())}')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if path.endswith('.json'):
    try:
      templates = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
      raise UserError(f'{path}: expected a JSON list of strings')
  else:
    templates = [line.strip() for line in text.splitlines() if line.strip()]
  if not templates:
    raise UserError(f'{path}: no templates')
  bad = [t for t in templates if PLACEHOLDER not in t]
  if bad:
    raise UserError(f'{path}: {len(bad)} template(s) without the {PLACEHOLDER} placeholder for '
                    f'the class name, first {bad[0]!r}')
  return templates


def fill(template: str, class_name: str) -> str:
  """The prompt for one class (str.replace: other braces in a template stay as they are)."""
  return template.replace(PLACEHOLDER, class_name)
