"""Parameter groups as data: regex rules → optax.multi_transform labels.

A rule is ``(regex, spec)``: the regex is matched in full against a leaf's
'/'-joined path (``backbone/encoder/layers/3/mlp/fc1/kernel``); ``spec`` is
``None`` (frozen: ``optax.set_to_zero()``, no optimizer state) or a learning
rate multiplier. Every leaf must match exactly one rule, as big_vision insists
("All params must be covered"): a typo in a regex fails loudly instead of
silently training or freezing the wrong weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from clip_transfer.errors import UserError
from clip_transfer.models import families

Rule = tuple[str, Optional[float]]  # (regex over '/'-joined paths, lr multiplier or None=frozen)
FROZEN = 'frozen'
# The one list of modes (``last:N`` takes the number of trainable encoder layers).
MODES = ('linear', 'full', 'differential', 'last:N', 'custom')


class RuleError(UserError):
  """Rules that leave a parameter uncovered, cover it twice, or cannot be parsed."""


def paths(params) -> list[str]:
  """'/'-joined paths of every leaf, in tree order."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return list(flat)


def num_layers(params) -> int:
  """How many encoder layers the params hold (from the tree, not a config; any family)."""
  layer = re.compile(f'backbone/{families.TOWER_LAYERS}/([0-9]+)/')
  idx = {int(m.group(1)) for m in map(layer.match, paths(params)) if m}
  return max(idx) + 1 if idx else 0


def parse_mode(mode: str) -> tuple[str, Optional[int]]:
  """('last', N) for 'last:N', (mode, None) for the other named modes; one error otherwise."""
  if mode.startswith('last:'):
    n = mode[len('last:'):]
    if not n.isdigit():
      raise UserError(f'mode {mode!r}: expected last:N with an integer N >= 0, e.g. last:2')
    return 'last', int(n)
  if mode not in MODES:
    raise UserError(f'unknown mode {mode!r}; choose one of {", ".join(MODES)} '
                    '(custom needs --rules)')
  return mode, None


def mode_rules(mode: str, params, backbone_lr_factor: float = 0.1,
               custom_rules: Optional[str] = None) -> list[Rule]:
  """The rules for a mode; ``params`` is the classifier's tree."""
  name, n = parse_mode(mode)
  if name == 'custom':
    if not custom_rules:
      raise UserError('mode custom needs --rules (JSON text or a JSON file)')
    return parse_rules(custom_rules)
  # 'projection' (the pretrained visual_projection under a zero-shot-initialised head)
  # belongs with the backbone; its rule matches nothing in the guide's plain classifier.
  if name == 'linear':  # the Flax guide's example: a frozen backbone, a trained head
    return [('backbone/.*', None), ('projection/.*', None), ('head/.*', 1.0)]
  if name == 'full':
    return [('backbone/.*', 1.0), ('projection/.*', 1.0), ('head/.*', 1.0)]
  if name == 'differential':  # pretrained weights move slower than the new head
    if not backbone_lr_factor > 0:
      raise UserError(f'--backbone_lr_factor must be > 0, got {backbone_lr_factor} '
                      '(a frozen backbone is mode linear)')
    return [('backbone/.*', float(backbone_lr_factor)),
            ('projection/.*', float(backbone_lr_factor)), ('head/.*', 1.0)]
  total = num_layers(params)
  if n > total:
    raise UserError(f'mode {mode!r}: the backbone has {total} encoder layers; '
                    f'N must be between 0 and {total}')
  if n == 0:  # exactly linear: post_layernorm trains only along with a trained layer
    return mode_rules('linear', params)
  # The same meaning on every family's names (clip_transfer.models.families).
  frozen = '|'.join(str(i) for i in range(total - n))
  trained = '|'.join(str(i) for i in range(total - n, total))
  layers = f'backbone/{families.TOWER_LAYERS}'
  rules: list[Rule] = [(f'backbone/{families.TOWER_BEFORE}/.*', None)]
  if frozen:
    rules.append((f'{layers}/({frozen})/.*', None))
  return rules + [(f'{layers}/({trained})/.*', 1.0),
                  (f'backbone/{families.TOWER_AFTER}/.*', 1.0), ('projection/.*', 1.0),
                  ('head/.*', 1.0)]


def check_mode(mode: str, custom_rules: Optional[str] = None) -> None:
  """What can be checked of a mode before a model is loaded (names, N, the rules' syntax)."""
  name, _ = parse_mode(mode)
  if name == 'custom':
    mode_rules(mode, None, custom_rules=custom_rules)


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
    elif (isinstance(spec, (int, float)) and not isinstance(spec, bool)
          and math.isfinite(spec) and spec > 0):
      spec = float(spec)
    else:
      # As big_vision asserts mult > 0: freezing is said with "frozen", which also
      # skips the backward pass and the optimizer state a zero rate would still cost.
      raise RuleError(f'rule {i} ({regex!r}): spec must be null, "frozen" or a learning-rate '
                      f'multiplier > 0, got {spec!r}')
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


@dataclasses.dataclass
class Plan:
  """What a mode means for one params tree: its rules, each leaf's group, what trains."""

  mode: str
  rules: list[Rule]
  labels: Any  # tree like params: 'gN', the index of the rule each leaf matches
  trainable: Any  # tree like params: True where the leaf's rule trains it

  def head_only(self, params) -> bool:
    """True when only ``head/`` leaves train: a convex problem (see head_only.solve_head_only)."""
    return all(path.startswith('head/') for path, t in zip(paths(params),
                                                            jax.tree.leaves(self.trainable)) if t)

  def optimizer(self, schedule: Callable[[Any], Any], *, clip_norm: Optional[float] = 1.0,
                b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """AdamW per group (lr = peak × schedule × multiplier), frozen groups set to zero, clipped first.

    ``schedule``: the lr's shape over the steps, peak 1. The peak lr and the weight
    decay are data, not constants baked into the program: they live in the state
    (``opt_state.hyperparams``, set by ``with_hyperparams``), so one transform, and one
    compiled step, serves every (lr, weight decay) of a grid.
    """

    def transform(learning_rate, weight_decay):
      transforms = {}
      for i, (_, mult) in enumerate(self.rules):
        if mult is None:
          transforms[f'g{i}'] = optax.set_to_zero()
        else:
          transforms[f'g{i}'] = optax.adamw(
              lambda step, m=mult: m * (learning_rate * schedule(step)), b1=b1, b2=b2,
              weight_decay=weight_decay, mask=decay_mask)
      tx = optax.multi_transform(transforms, self.labels)
      if clip_norm:
        # Frozen leaves get zero gradients (stop_gradient), so they add nothing to the norm.
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
      return tx

    # float32 whatever the params' dtype (a bfloat16 lr would lose two digits). NaN until
    # with_hyperparams sets them: a state that skipped it diverges at once, never trains at
    # a made-up rate.
    return optax.inject_hyperparams(transform, hyperparam_dtype=jnp.float32)(
        learning_rate=math.nan, weight_decay=math.nan)


def with_hyperparams(opt_state, learning_rate: float, weight_decay: float):
  """``Plan.optimizer``'s state with its peak lr and weight decay set (as float32 scalars)."""
  if not (math.isfinite(learning_rate) and learning_rate > 0):
    # Config checks --lr; this guards library callers (optax would happily step at lr 0).
    raise UserError(f'the learning rate must be finite and > 0, got {learning_rate}')
  if not (math.isfinite(weight_decay) and weight_decay >= 0):
    raise UserError(f'the weight decay must be finite and >= 0, got {weight_decay}')
  hyperparams = {'learning_rate': jnp.asarray(learning_rate, jnp.float32),
                 'weight_decay': jnp.asarray(weight_decay, jnp.float32)}
  return opt_state._replace(hyperparams=hyperparams)


def plan(mode: str, params, *, backbone_lr_factor: float = 0.1,
         custom_rules: Optional[str] = None) -> Plan:
  """A mode (or custom rules) → rules, labels, the trainable mask; ``Plan.optimizer`` the rest."""
  rules = mode_rules(mode, params, backbone_lr_factor, custom_rules)
  lab = labels(params, rules)
  trainable = jax.tree.map(lambda l: rules[int(l[1:])][1] is not None, lab)
  return Plan(mode, rules, lab, trainable)


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
