"""Parameter groups as data: regex rules → optax.multi_transform labels.

A rule is ``(regex, spec)``: the regex is matched in full against a leaf's
'/'-joined path (``backbone/encoder/layers/3/mlp/fc1/kernel``); ``spec`` is
``None`` (frozen: ``optax.set_to_zero()``, no optimizer state) or a learning
rate multiplier. Every leaf must match exactly one rule, as big_vision insists
("All params must be covered"): a typo in a regex fails loudly instead of
silently training or freezing the wrong weights.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import optax
from flax import traverse_util

from transfer.errors import UserError

Rule = tuple[str, Optional[float]]  # (regex over '/'-joined paths, lr multiplier or None=frozen)
FROZEN = 'frozen'
MODES = ('linear', 'full', 'differential', 'last:N', 'custom')


class RuleError(UserError):
  """Rules that leave a parameter uncovered, cover it twice, or cannot be parsed."""


def paths(params) -> list[str]:
  """'/'-joined paths of every leaf, in tree order."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return list(flat)


def num_layers(params, prefix: str = 'backbone/encoder/layers/') -> int:
  """How many encoder layers the params hold (from the tree, not a config)."""
  idx = {int(p[len(prefix):].split('/')[0]) for p in paths(params) if p.startswith(prefix)}
  return max(idx) + 1 if idx else 0


def mode_rules(mode: str, params, backbone_lr_factor: float = 0.1) -> list[Rule]:
  """The rules for a named mode; ``params`` is the classifier's tree."""
  if mode == 'linear':  # the Flax guide's example: a frozen backbone, a trained head
    return [('backbone/.*', None), ('head/.*', 1.0)]
  if mode == 'full':
    return [('backbone/.*', 1.0), ('head/.*', 1.0)]
  if mode == 'differential':  # pretrained weights move slower than the new head
    return [('backbone/.*', float(backbone_lr_factor)), ('head/.*', 1.0)]
  if mode.startswith('last:'):
    try:
      n = int(mode[len('last:'):])
    except ValueError:
      raise UserError(f'mode {mode!r}: expected last:N with an integer N, e.g. last:2') from None
    total = num_layers(params)
    if not 0 <= n <= total:
      raise UserError(f'mode {mode!r}: the backbone has {total} encoder layers; '
                      f'N must be between 0 and {total}')
    frozen = '|'.join(str(i) for i in range(total - n))
    trained = '|'.join(str(i) for i in range(total - n, total))
    rules: list[Rule] = [('backbone/(embeddings|pre_layrnorm)/.*', None)]
    if frozen:
      rules.append((f'backbone/encoder/layers/({frozen})/.*', None))
    if trained:
      rules.append((f'backbone/encoder/layers/({trained})/.*', 1.0))
    return rules + [('backbone/post_layernorm/.*', 1.0), ('head/.*', 1.0)]
  raise UserError(f'unknown mode {mode!r}; choose one of {", ".join(MODES)} '
                  '(custom needs --rules)')


def parse_rules(text_or_path: str) -> list[Rule]:
  """Rules from JSON text or a JSON file: ``[["regex", null | "frozen" | lr_mult], …]``."""
  text = text_or_path
  if os.path.exists(text_or_path):
    with open(text_or_path) as fh:
      text = fh.read()
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise RuleError(f'--rules is neither a file nor valid JSON ({e.msg} at char {e.pos})') from None
  if not isinstance(raw, list) or not raw:
    raise RuleError('--rules must be a non-empty JSON list of [regex, spec] pairs')
  rules = []
  for i, r in enumerate(raw):
    if not (isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)):
      raise RuleError(f'rule {i} must be [regex, spec], got {r!r}')
    regex, spec = r
    if spec is None or spec == FROZEN:
      spec = None
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec >= 0:
      spec = float(spec)
    else:
      raise RuleError(f'rule {i} ({regex!r}): spec must be null, "frozen" or a learning-rate '
                      f'multiplier >= 0, got {spec!r}')
    rules.append((regex, spec))
  return rules


def labels(params, rules: Sequence[Rule]):
  """A tree like ``params`` with the index of the one rule each leaf matches (as 'gN').

  Raises RuleError listing every uncovered and every doubly covered path.
  """
  try:
    compiled = [re.compile(r) for r, _ in rules]
  except re.error as e:
    raise RuleError(f'bad regex in rules: {e}') from None
  uncovered, doubled = [], []

  def label(path, _):
    name = '/'.join(path)
    hits = [i for i, c in enumerate(compiled) if c.fullmatch(name)]
    if not hits:
      uncovered.append(name)
      return None
    if len(hits) > 1:
      doubled.append(f'{name} (rules {", ".join(repr(rules[i][0]) for i in hits)})')
    return f'g{hits[0]}'

  out = traverse_util.path_aware_map(label, flax.core.unfreeze(params))
  problems = []
  if uncovered:
    problems.append(f'{len(uncovered)} parameter(s) match no rule: {", ".join(uncovered)}')
  if doubled:
    problems.append(f'{len(doubled)} parameter(s) match several rules: {", ".join(doubled)}')
  if problems:
    raise RuleError('all params must be covered exactly once; ' + '; '.join(problems))
  # Same container type as params, so multi_transform sees matching trees.
  return flax.core.freeze(out) if isinstance(params, flax.core.FrozenDict) else out


def trainable_mask(params, rules: Sequence[Rule]):
  """True for leaves whose rule trains them."""
  lab = labels(params, rules)
  return jax.tree.map(lambda l: rules[int(l[1:])][1] is not None, lab)


def count(params, mask=None) -> int:
  """Number of scalars in ``params`` (only where ``mask`` is True, if given)."""
  sizes = jax.tree.map(lambda p: int(p.size), flax.core.unfreeze(params))
  if mask is None:
    return sum(jax.tree.leaves(sizes))
  return sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)


def _is_kernel(keypath) -> bool:
  last = keypath[-1] if keypath else None
  return getattr(last, 'key', None) == 'kernel'


def decay_mask(params):
  """Weight decay on Dense/Conv kernels only: not biases, LayerNorm, embeddings."""
  # Keypaths, not traverse_util: inside multi_transform the tree holds MaskedNodes.
  return jax.tree_util.tree_map_with_path(lambda kp, _: _is_kernel(kp), params)


def make_optimizer(params, rules: Sequence[Rule], schedule: Callable[[Any], Any], *,
                   weight_decay: float = 1e-4, clip_norm: Optional[float] = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """AdamW per group (lr = schedule × multiplier), frozen groups set to zero, clipped first."""
  lab = labels(params, rules)
  transforms = {}
  for i, (_, mult) in enumerate(rules):
    if mult is None:
      transforms[f'g{i}'] = optax.set_to_zero()
    else:
      transforms[f'g{i}'] = optax.adamw(lambda step, m=mult: m * schedule(step), b1=b1, b2=b2,
                                        weight_decay=weight_decay, mask=decay_mask)
  tx = optax.multi_transform(transforms, lab)
  if clip_norm:
    # Frozen leaves get zero gradients (stop_gradient), so they add nothing to the norm.
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx
