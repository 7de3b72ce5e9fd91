"""Prompt templates for zero-shot classification, kept as data (one JSON list per name).

Bundled lists (``{}`` is replaced by the class name):

- ``openai_imagenet``: the CLIP paper's 80 ImageNet templates (openai/CLIP
  ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``; open_clip's
  ``OPENAI_IMAGENET_TEMPLATES``).
- ``openai_imagenet_7``: the notebook's 7-template subset (open_clip's
  ``SIMPLE_IMAGENET_TEMPLATES``).
- ``cifar10``, ``cifar100``: the 18 templates of openai/CLIP ``data/prompts.md``.
- ``simple``: ``a photo of a {}.``, the paper's baseline prompt.
- ``siglip_imagenet``: what the SigLIP authors' zero-shot evaluator uses, the default for
  SigLIP models: big_vision's ``discriminative_classifier`` defaults to
  ``prompt_templates="clip_paper"`` with ``canonicalize=True``
  (google-research/big_vision ``big_vision/evaluators/proj/image_text/
  discriminative_classifier.py``; the list in ``prompt_engineering_constants.py``
  ``CLIP_PAPER_PROMPT_TEMPLATES`` is the CLIP paper's 80 plus the bare ``{}``), and
  ``prompt_engineering._canonicalize`` lower-cases them and removes punctuation except
  the ``{}``. So: these 81, canonicalised (``a bad photo of a {}``, …, ``{}``).
  transformers' ``SiglipTokenizer`` canonicalises text the same way, so with a real
  checkpoint only the list matters; the generated ``random:`` tokenizers see the exact text.

``fill`` writes a class name's underscores as spaces (``prompt_name``).
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


def prompt_name(class_name: str) -> str:
  """A class name as prompts say it: underscores become spaces (``red_things`` → ``red
  things``), as CLIP's own prompts write names and big_vision's evaluator canonicalises
  them. Only prompts use it; recorded class names stay as the dataset has them."""
  return class_name.replace('_', ' ')


def fill(template: str, class_name: str) -> str:
  """The prompt for one class (str.replace: other braces in a template stay as they are)."""
  return template.replace(PLACEHOLDER, prompt_name(class_name))


# The bundled list a family's zero-shot uses when --templates is not given.
FAMILY_DEFAULTS = {'siglip': 'siglip_imagenet'}
DEFAULT = 'openai_imagenet'  # CLIP, OpenCLIP


def default_for(family: str) -> str:
  """The template list a family's authors evaluate zero-shot with (see the module docstring)."""
  return FAMILY_DEFAULTS.get(family, DEFAULT)
