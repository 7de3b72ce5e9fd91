"""The linear head both stages fit: standardised features, L2-regularised softmax regression, solved exactly.

For an L2 strength ``l2`` the objective is

    mean_i CE(x_i W + b, y_i) + l2/2 * ||W||^2          (bias unpenalised)

on features standardised with the fit set's statistics; ``fit_jax`` solves a
whole grid of ``l2`` values in one ``vmap``ped L-BFGS program. With an
``anchor`` W0 (the zero-shot head: ``methods.AnchoredMethod``) the head is
``W0 + Δ`` and the penalty moves to the offset, bias included:

    mean_i CE(x_i (W0 + Δ) + b, y_i) + l2/2 * (||Δ||^2 + ||b||^2)

so a large ``l2`` stays at W0 (zero bias: exactly the zero-shot classifier)
and a small one is a plain probe on the same features. ``AnchoredMethod``
takes x = exp(logit_scale) · normalize(projected) and W0 = the unit-norm
class text embeddings, so Δ is measured in text-embedding units (CLAP's
parametrisation) and the loss gradient is not shrunk by the temperature.

The probe fits the plain head on cached embeddings; fine-tune modes that train only the head fit it on the
frozen backbone's features, so "linear" means the same thing in both stages.
The saved heads (and ``fold``, a standardised head on raw features) are in
``clip_transfer.protocol.heads``; the methods and the L2 selection on validation in
``clip_transfer.protocol.methods``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from clip_transfer import distributed

# Decades wide enough for a huge clean set (weak) and a few shots (strong).
DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SOLVERS = ('lbfgs', 'adam')
MAX_ITER = 1000  # sklearn's max_iter in the CLIP paper's protocol
# Both methods stop when max |gradient| of the mean objective <= TOL. sklearn's
# default 1e-4 applies to that mean-scaled objective (sklearn >= 1.2) and stops
# 768-d, 100-class fits after ~5 iterations, far from converged; the CLIP
# paper's sklearn summed the loss, an N times tighter stop. 1e-5 converges
# both to within float32 noise of each other (see benchmarks/probe.py).
TOL = 1e-5
ADAM_LR = 1e-2  # full-batch Adam on standardised features; L-BFGS needs no step size
CHUNK = 20  # solver iterations per jitted call, between progress updates
MAX_BACKTRACK = 30  # step halvings before a problem counts as stalled (2^-30: no progress left)
# Below this many multiply-adds per loss evaluation (rows x dim x classes),
# compiling costs more than computing: rows are padded (weight 0) to a
# power-of-two bucket, so a run's sweep and its few-shot and cross-validation
# fits share a few executables instead of compiling once per shape.
SMALL_PROBLEM = 1 << 24
MIN_BUCKET = 256


def is_small(rows: int, dim: int, num_classes: int) -> bool:
  return rows * dim * num_classes <= SMALL_PROBLEM


def bucket_rows(rows: int, dim: int, num_classes: int) -> int:
  """Rows to pad to: a power of two for small problems, the rows themselves otherwise."""
  if not is_small(rows, dim, num_classes):
    return rows
  return max(MIN_BUCKET, 1 << (rows - 1).bit_length())


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit norm (zero rows stay zero): what zero-shot compares with text."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.where(norm > 0, norm, 1)).astype(np.float32)


@dataclasses.dataclass
class Standardizer:
  """Per-feature mean/std from the fit set; applied to everything the head sees.

  ``normalize``: rows are L2-normalised first (the anchored head's features,
  where mean 0 / std 1 keep the zero-shot head's geometry).
  """

  mean: np.ndarray  # (D,) float32
  std: np.ndarray  # (D,) float32, constant features get 1 so they map to 0, not NaN
  normalize: bool = False

  @classmethod
  def fit(cls, x: np.ndarray) -> 'Standardizer':
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    std = np.where(std < 1e-8, 1.0, std)
    return cls(mean.astype(np.float32), std.astype(np.float32))

  @classmethod
  def unit_norm(cls, dim: int, scale: float = 1.0) -> 'Standardizer':
    """Rows normalised, then times ``scale`` (as std 1/scale, so a saved head holds it)."""
    return cls(np.zeros(dim, np.float32), np.full(dim, 1 / scale, np.float32), normalize=True)

  @classmethod
  def fit_across_processes(cls, x_local: np.ndarray) -> 'Standardizer':
    """``fit`` on the rows of every process together; each passes its own rows."""
    if distributed.process_count() == 1:
      return cls.fit(x_local)
    # Two passes in float64 like np.std, the sums taken over processes.
    n = distributed.sum_over_processes(np.float64(len(x_local)))
    mean = distributed.sum_over_processes(x_local.sum(axis=0, dtype=np.float64)) / n
    var = distributed.sum_over_processes(
        np.square(x_local - mean).sum(axis=0, dtype=np.float64)) / n
    std = np.sqrt(var)
    std = np.where(std < 1e-8, 1.0, std)
    return cls(mean.astype(np.float32), std.astype(np.float32))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    if self.normalize:
      x = l2_normalize(x)
    return ((x - self.mean) / self.std).astype(np.float32)


def make_head(num_classes: int) -> nn.Dense:
  """The Flax guide's classifier head: zero-initialised, so every L2 starts from the same point.

  HIGHEST precision keeps float32 matmuls float32 on GPUs (not TF32), so every
  backend solves the problem sklearn solves; it changes nothing on CPU.
  """
  return nn.Dense(num_classes, kernel_init=nn.zeros, precision=jax.lax.Precision.HIGHEST)

def _max_abs(tree) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(jnp.abs(t)) for t in jax.tree.leaves(tree)]))


@functools.lru_cache(maxsize=16)
def _solver(num_classes: int, solver: str, tol: float, anchored: bool = False, mesh=None):
  """A jitted, vmapped (over L2) run of the solver up to `stop_at` iterations; compiled once per shape.

  L-BFGS directions come from ``optax.lbfgs(linesearch=None)``; the step size
  from a backtracking (Armijo) search written here. optax's zoom linesearch
  branches with ``lax.cond`` on per-problem state, and under ``vmap`` a cond
  becomes a select that evaluates both branches: three loss+gradient passes
  per iteration instead of one. The objective is convex, so curvature pairs
  stay positive without the Wolfe curvature test. The loss and its gradient
  are traced once (inside the search loop), which keeps compile time down.
  ``anchored``: the params are the offset from ``anchor`` (module docstring).
  """
  head = make_head(num_classes)
  opt = optax.lbfgs(linesearch=None) if solver == 'lbfgs' else optax.adam(ADAM_LR)

  def penalty(params):
    if anchored:  # the offset from the anchor, bias included: L2 = inf is exactly zero-shot
      return jnp.sum(jnp.square(params['kernel'])) + jnp.sum(jnp.square(params['bias']))
    return jnp.sum(jnp.square(params['kernel']))

  def data_sum(params, x, y, w, anchor):
    """The rows' weighted cross-entropy, summed (the numerator of the mean)."""
    if anchored:  # one matmul with W0 + Δ; the anchor is an argument, so one compile serves all
      logits = jnp.dot(x, anchor + params['kernel'],
                       precision=jax.lax.Precision.HIGHEST) + params['bias']
    else:
      logits = head.apply({'params': params}, x)
    return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def loss_fn(params, x, y, w, l2, anchor):
    # Weighted mean: rows of weight 0 pad a set to a shape that is already compiled.
    return data_sum(params, x, y, w, anchor) / jnp.sum(w) + 0.5 * l2 * penalty(params)

  def sharded_value_and_grad(params, x, y, w, l2, anchor):
    """``loss_fn``'s value and gradient on rows split over the mesh: one psum per call.

    Each device differentiates the weighted sum of its rows' losses; a single
    all-reduce adds the partial sums, gradients and weights of every device.
    One collective per evaluation, each depending on the last, so every process
    issues them in the same order (concurrent independent all-reduces can be
    paired up differently on different processes by CPU collectives).
    """
    total, grad = jax.value_and_grad(data_sum)(params, x, y, w, anchor)
    # Packed into one vector: a tuple would lower to several all-reduces that
    # may run concurrently, in a different order on each process.
    packed, unpack = jax.flatten_util.ravel_pytree((total, grad, jnp.sum(w)))
    total, grad, weight = unpack(jax.lax.psum(packed, distributed.AXIS))
    reg, reg_grad = jax.value_and_grad(penalty)(params)
    value = total / weight + 0.5 * l2 * reg
    return value, jax.tree.map(lambda g, r: g / weight + 0.5 * l2 * r, grad, reg_grad)

  def start(carry, value_and_grad):
    params = jax.tree.map(jnp.zeros_like, carry[0])  # the zero-initialised head
    value, grad = value_and_grad(params)
    return params, opt.init(params), value, grad, jnp.int32(0), _max_abs(grad), jnp.bool_(False)

  def run_one(carry, l2, x, y, w, stop_at, fresh, anchor):
    if mesh is None:
      value_and_grad = jax.value_and_grad(functools.partial(loss_fn, x=x, y=y, w=w, l2=l2,
                                                            anchor=anchor))
    else:
      value_and_grad = functools.partial(sharded_value_and_grad, x=x, y=y, w=w, l2=l2,
                                         anchor=anchor)
    # `fresh` is the same for every L2, so under vmap this stays a real branch.
    carry = jax.lax.cond(fresh, lambda c: start(c, value_and_grad), lambda c: c, carry)

    def body(c):
      params, state, value, grad, it, _, _ = c
      direction, state = opt.update(grad, state, params)  # already a descent direction
      if solver == 'adam':
        new = optax.apply_updates(params, direction)
        new_value, new_grad = value_and_grad(new)
        return new, state, new_value, new_grad, it + 1, _max_abs(new_grad), jnp.bool_(False)
      slope = optax.tree.vdot(grad, direction)
      # Float32 noise in the curvature pairs can spoil the direction; fall back to the gradient.
      ascent = ~(slope < 0)
      direction = jax.tree.map(lambda d, g: jnp.where(ascent, -g, d), direction, grad)
      slope = jnp.where(ascent, -optax.tree.vdot(grad, grad), slope)
      # The slack of a few float32 ulps of the loss: below it, decrease cannot be measured.
      slack = 4 * jnp.finfo(jnp.float32).eps * jnp.abs(value)

      def too_high(ls):  # written as a negation so a NaN value counts as too high
        eta, v, _, _, k = ls
        return ~(v <= value + 1e-4 * eta * slope + slack) & (k < MAX_BACKTRACK)

      def halve(ls):  # the first pass (eta 2 -> 1) tries the full L-BFGS step
        eta = ls[0] * 0.5
        new = jax.tree.map(lambda p, d: p + eta * d, params, direction)
        v, g = value_and_grad(new)
        return eta, v, g, new, ls[4] + 1

      ls = (jnp.float32(2.0), jnp.float32(jnp.inf), grad, params, jnp.int32(-1))
      _, v, g, new, k = jax.lax.while_loop(too_high, halve, ls)
      stalled = k >= MAX_BACKTRACK  # no decrease left at float32 precision: stop here
      new, v, g = jax.tree.map(lambda a, b: jnp.where(stalled, a, b), (params, value, grad),
                               (new, v, g))
      return new, state, v, g, it + 1, _max_abs(g), stalled

    def cond(c):
      return (c[4] < stop_at) & (c[5] > tol) & ~c[6]

    # Under vmap the loop runs until every L2 has stopped; finished ones keep their state.
    return jax.lax.while_loop(cond, body, carry)

  def empty_carry(dim, num_l2):
    """Placeholder state of the right shapes; `fresh=True` fills it on the device."""
    def one(x):
      params = head.init(jax.random.key(0), x)['params']
      return (params, opt.init(params), jnp.float32(0), params, jnp.int32(0), jnp.float32(0),
              jnp.bool_(False))
    shapes = jax.eval_shape(jax.vmap(one, axis_size=num_l2, in_axes=None),
                            jax.ShapeDtypeStruct((1, dim), jnp.float32))
    return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)

  vmapped = jax.vmap(run_one, in_axes=(0, 0, None, None, None, None, None, None))
  if mesh is None:
    return empty_carry, jax.jit(vmapped)
  # Rows split over the mesh, the solver state (the heads) replicated: each
  # device runs the same iterations on its rows, its matmuls' sums completed
  # by the psum above; every process holds the whole (small) state.
  spec, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(distributed.AXIS)
  replicated = jax.sharding.NamedSharding(mesh, spec)
  run = jax.jit(jax.shard_map(vmapped, mesh=mesh,
                              in_specs=(spec, spec, rows, rows, rows, spec, spec, spec),
                              out_specs=spec, check_vma=False))

  def placed_carry(dim, num_l2):
    return jax.device_put(jax.tree.map(np.asarray, empty_carry(dim, num_l2)), replicated)
  return placed_carry, run


def fit_jax(x: np.ndarray, y: np.ndarray, num_classes: int, l2s: Sequence[float], *,
            weights: Optional[np.ndarray] = None, solver: str = 'lbfgs',
            max_iter: int = MAX_ITER, tol: float = TOL, desc: str = 'jax',
            progress: bool = True, anchor: Optional[np.ndarray] = None,
            mesh=None) -> tuple[dict, dict]:
  """Fits one head per L2 in a single vmapped solve. Returns stacked params (G, …) and info.

  ``anchor`` (D, C): fit the offset Δ from it instead (the params returned are Δ).
  With a ``mesh`` (``clip_transfer.distributed.mesh()``) the rows are split
  over its devices, and over processes: each process passes only its own rows
  (``x``, ``y``, ``weights``) and gets the same heads back.
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')
  empty_carry, run = _solver(num_classes, solver, float(tol), anchor is not None, mesh)
  # Unused without an anchor: a scalar placeholder keeps the plain solve's signature.
  anchor_j = np.zeros((), np.float32) if anchor is None else np.asarray(anchor, np.float32)
  w = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  if mesh is None:
    pad = bucket_rows(len(x), x.shape[1], num_classes) - len(x)  # weight-0 rows: same optimum
    xj = jnp.asarray(np.pad(x, ((0, pad), (0, 0))))
    yj = jnp.asarray(np.pad(y, (0, pad)))
    wj = jnp.asarray(np.pad(w, (0, pad)))
  else:
    # Padding to equal shards gets weight 0: out of the loss and of its mean.
    (xj, yj, wj), _ = distributed.shard_rows((x, y, w), mesh)
  l2j = np.asarray(l2s, np.float32)
  carry = empty_carry(x.shape[1], len(l2s))
  bar = tqdm(total=max_iter, desc=desc, file=sys.stderr, leave=False, disable=not progress)
  done = 0
  while True:
    stop_at = min(done + CHUNK, max_iter)
    carry = run(carry, l2j, xj, yj, wj, np.int32(stop_at), np.bool_(done == 0), anchor_j)
    if mesh is not None:
      jax.block_until_ready(carry)  # every device, not only the first one read below
    its, gmax, stalled = distributed.replicated((carry[4], carry[5], carry[6]))
    bar.update(stop_at - done)
    stopped = (gmax <= tol) | (its >= max_iter) | stalled
    bar.set_postfix_str(f'converged {int((gmax <= tol).sum())}/{len(l2s)} '
                        f'max|grad| {float(np.max(np.where(stopped, 0, gmax))):.1e}')
    done = stop_at
    if stopped.all() or done >= max_iter:
      break
  bar.close()
  params = distributed.replicated(carry[0])
  # A stalled search (no decrease left in float32) counts as converged: sklearn's ftol stop.
  return params, {'n_iter': its.tolist(), 'converged': ((gmax <= tol) | stalled).tolist()}


def jax_logits(params: dict, x: np.ndarray) -> np.ndarray:
  """Logits (G, N, C) of stacked heads, or (N, C) for a single head."""
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  if kernel.ndim == 2:
    return x @ kernel + bias
  return np.einsum('nd,gdc->gnc', x, kernel) + bias[:, None, :]
