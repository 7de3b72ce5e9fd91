"""Parameter groups, pretrained transfer and the optimizer's frozen/trainable behaviour."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finetune import groups
from finetune import model as model_lib
from finetune import config
from finetune import steps as steps_lib
from clip_transfer import models
from clip_transfer.models import clip
from clip_transfer.data import preprocess
from clip_transfer.errors import UserError

pytestmark = pytest.mark.usefixtures('xla_cache')  # tests/conftest.py

NUM_CLASSES = 5



@pytest.fixture(scope='module')
def pretrained():
  # A vision-only micro CLIP (2 layers, 16x16 input): same code paths, faster compiles.
  vision = clip.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, image_size=16, patch_size=8)
  module = clip.CLIP(vision)
  return models.Pretrained(module, {'params': clip.init_params(module)},
                                preprocess.PreprocessConfig.for_image_size(16), 'micro')


@pytest.fixture(scope='module')
def initialised(pretrained):
  return model_lib.create(pretrained, NUM_CLASSES)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32)}


def _train(pretrained, initialised, mode, steps=3, **kw):
  cfg = config.Config(model='micro', lr=(1e-2,), warmup=0.0, **kw)
  mesh = steps_lib.make_mesh()
  state, trainable, _ = steps_lib.create_state(pretrained, NUM_CLASSES, mode, cfg, 100, initialised,
                                             mesh)
  before = jax.tree.map(np.asarray, state.params)
  step, _ = steps_lib.jit_steps(mesh, trainable, pretrained.preprocess)
  for i in range(steps):
    state, metrics = step(state, _batch(seed=i))
  return before, jax.tree.map(np.asarray, state.params), trainable, state


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def test_backbone_is_the_pretrained_one_and_head_is_zero(pretrained, initialised):
  _, variables = initialised
  _, vision_vars = pretrained.vision_tower()
  assert _flat(variables['params']['backbone']).keys() == _flat(vision_vars['params']).keys()
  for k, v in _flat(vision_vars['params']).items():
    np.testing.assert_array_equal(_flat(variables['params']['backbone'])[k], v)
  assert not np.any(np.asarray(variables['params']['head']['kernel']))
  # create skips running the classifier's init (shapes only): still exactly what running it
  # and transferring gives, leaf for leaf, dtype for dtype (fails should init ever add a
  # leaf that is not zeros).
  model, _ = initialised
  ran = model_lib.transfer(
      jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.float32)),
      vision_vars)
  assert _flat(ran).keys() == _flat(variables).keys()
  for k, v in _flat(ran).items():
    got = _flat(variables)[k]
    assert isinstance(got, jax.Array) and got.dtype == v.dtype, k
    np.testing.assert_array_equal(got, v)


def test_transfer_accepts_frozendict_and_names_first_mismatch(pretrained, initialised):
  _, variables = initialised
  _, vision_vars = pretrained.vision_tower()
  out = model_lib.transfer(flax.core.freeze(variables), flax.core.freeze(vision_vars))
  assert isinstance(out, flax.core.FrozenDict)
  assert isinstance(model_lib.transfer(dict(variables), vision_vars), dict)

  bad = flax.core.unfreeze(vision_vars)
  bad['params']['encoder']['layers']['1']['mlp']['fc1']['kernel'] = jnp.zeros((3, 3))
  with pytest.raises(model_lib.TransferError, match=r'params/backbone/encoder/layers/1/mlp/fc1'
                     r'/kernel: pretrained shape \(3, 3\) != initialised shape \(32, 64\)'):
    model_lib.transfer(variables, bad)
  missing = flax.core.unfreeze(vision_vars)
  del missing['params']['post_layernorm']
  with pytest.raises(model_lib.TransferError, match='lack params/backbone/post_layernorm/bias'):
    model_lib.transfer(variables, missing)


def test_uncovered_and_doubly_covered_paths_are_listed(initialised):
  params = initialised[1]['params']
  with pytest.raises(groups.RuleError, match=r'match no rule: head/bias, head/kernel'):
    groups.labels(params, [('backbone/.*', None)])
  with pytest.raises(groups.RuleError, match=r"several rules: head/bias \(rules '\.\*', "
                     r"'head/\.\*'\), head/kernel"):
    groups.labels(params, [('.*', 1.0), ('head/.*', None)])


def test_parse_rules_from_json_and_file(tmp_path):
  rules = groups.parse_rules('[["backbone/.*", "frozen"], ["head/.*", 2]]')
  assert rules == [('backbone/.*', None), ('head/.*', 2.0)]
  f = tmp_path / 'rules.json'
  f.write_text('[["backbone/.*", null], ["head/.*", 1]]')
  assert groups.parse_rules(str(f)) == [('backbone/.*', None), ('head/.*', 1.0)]
  for bad in ('not json', '[]', '[["x", "fast"]]', '[["(", 1]]'):
    with pytest.raises(UserError):
      groups.labels({'x': jnp.zeros(1)}, groups.parse_rules(bad))


def test_unknown_mode_and_bad_last_n(initialised):
  params = initialised[1]['params']
  with pytest.raises(UserError, match="unknown mode 'fast'"):
    groups.mode_rules('fast', params)
  with pytest.raises(UserError, match='between 0 and 2'):
    groups.mode_rules('last:3', params)


@pytest.mark.parametrize('mode,trained_prefixes', [
    ('linear', ('head/',)),
    ('last:1', ('head/', 'backbone/post_layernorm/', 'backbone/encoder/layers/1/')),
])
def test_frozen_leaves_bit_for_bit_trainable_moved_no_state(pretrained, initialised, mode,
                                                            trained_prefixes):
  before, after, trainable, state = _train(pretrained, initialised, mode)
  b, a, t = _flat(before), _flat(after), _flat(trainable)
  for k in b:
    should_train = k.startswith(trained_prefixes)
    assert t[k] == should_train, k
    if should_train:
      assert not np.array_equal(a[k], b[k]), f'{k} did not move'
    else:
      assert a[k].tobytes() == b[k].tobytes(), f'frozen {k} changed'
  # Adam's moments exist for trainable leaves only (mu + nu = 2 per trainable scalar).
  held = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  assert held == 2 * groups.count(before, trainable)


def test_differential_scales_backbone_updates(pretrained, initialised):
  # Adam's first update is lr × g/|g| per scalar: its magnitude is the group's lr alone.
  cfg = config.Config(model='micro', lr=(1e-2,), warmup=0.0, weight_decay=0.0, clip_norm=0.0,
                       backbone_lr_factor=0.1)
  updates = {}
  for mode in ('full', 'differential'):
    state, _, _ = steps_lib.create_state(pretrained, NUM_CLASSES, mode, cfg, 100, initialised)
    rng = np.random.default_rng(0)

    def grad(p):
      z = rng.normal(size=p.shape)
      return jnp.asarray(z + np.sign(z), p.dtype)  # |g| >= 1: Adam's eps is negligible

    grads = jax.tree.map(grad, state.params)
    # jit: op by op, every leaf's shape compiles its own small programs (most of this test's time).
    updates[mode], _ = jax.jit(state.tx.update)(grads, state.opt_state, state.params)
  full, diff = _flat(updates['full']), _flat(updates['differential'])
  for k in ('backbone/encoder/layers/0/mlp/fc1/kernel', 'backbone/post_layernorm/scale'):
    np.testing.assert_allclose(np.abs(full[k]), 1e-2, rtol=1e-3)
    np.testing.assert_allclose(np.abs(diff[k]), 1e-3, rtol=1e-3)
  np.testing.assert_allclose(diff['head/kernel'], full['head/kernel'])


def test_weight_decay_only_on_kernels(initialised):
  params = initialised[1]['params']
  mask = _flat(groups.decay_mask(params))
  assert mask['head/kernel'] and mask['backbone/encoder/layers/0/self_attn/q_proj/kernel']
  assert not mask['head/bias'] and not mask['backbone/post_layernorm/scale']
  assert not mask['backbone/embeddings/position_embedding/embedding']


def test_transfer_carries_other_collections():
  zeros = lambda *s: jnp.zeros(s)
  init = {'params': {'backbone': {'bn': {'scale': zeros(3)}}, 'head': {'kernel': zeros(3, 2)}},
          'batch_stats': {'backbone': {'bn': {'mean': zeros(3)}}}}
  pre = {'params': {'bn': {'scale': jnp.ones(3)}}, 'batch_stats': {'bn': {'mean': jnp.full(3, 2.)}}}
  out = model_lib.transfer(init, pre)
  np.testing.assert_array_equal(out['batch_stats']['backbone']['bn']['mean'], [2., 2., 2.])
  np.testing.assert_array_equal(out['params']['backbone']['bn']['scale'], [1., 1., 1.])
  with pytest.raises(model_lib.TransferError, match="lack the collection 'batch_stats'"):
    model_lib.transfer(init, {'params': pre['params']})


def test_last_0_is_exactly_linear_and_zero_rates_are_refused(initialised):
  params = flax.core.unfreeze(initialised[1])['params']
  assert groups.mode_rules('last:0', params) == groups.mode_rules('linear', params)
  linear_plan, last0 = groups.plan('linear', params), groups.plan('last:0', params)
  assert jax.tree.leaves(linear_plan.trainable) == jax.tree.leaves(last0.trainable)
  with pytest.raises(groups.RuleError, match='multiplier > 0'):
    groups.parse_rules('[["backbone/.*", 0], ["head/.*", 1]]')
  with pytest.raises(UserError, match='backbone_lr_factor must be > 0'):
    groups.mode_rules('differential', params, backbone_lr_factor=0.0)


def test_lr_and_decay_are_data_around_the_optimizer_of_before(pretrained, initialised):
  """The peak lr and weight decay live in opt_state.hyperparams; inside is the optimizer of
  earlier versions (lr and decay constants), state for state and update for update."""
  cfg = config.Config(model='micro', lr=(1e-2,), weight_decay=(0.5,), warmup=0.1)
  state, _, plan = steps_lib.create_state(pretrained, NUM_CLASSES, 'last:1', cfg, 20, initialised)
  assert state.opt_state.hyperparams == {'learning_rate': np.float32(1e-2),
                                         'weight_decay': np.float32(0.5)}
  # What Plan.optimizer built before: the schedule's peak and the decay as constants.
  schedule = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=1e-2, warmup_steps=2,
                                                decay_steps=20, end_value=0.0)
  before = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
      {f'g{i}': optax.set_to_zero() if m is None else optax.adamw(
          lambda step, m=m: m * schedule(step), weight_decay=0.5, mask=groups.decay_mask)
       for i, (_, m) in enumerate(plan.rules)}, plan.labels))
  old_state = before.init(state.params)
  # Checkpoints of those versions restore as the inner state (finetune/checkpoints.py).
  assert jax.tree.structure(old_state) == jax.tree.structure(state.opt_state.inner_state)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), state.params)
  new_state, params = state.opt_state, state.params
  for _ in range(3):  # past the warmup's first (zero-lr) step
    old_u, old_state = jax.jit(before.update)(grads, old_state, params)
    new_u, new_state = jax.jit(state.tx.update)(grads, new_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                 old_u, new_u)
  assert np.abs(_flat(new_u)['head/kernel']).max() > 0
  for lr in (0.0, -1e-3):
    with pytest.raises(UserError, match='learning rate must be finite and > 0'):
      steps_lib.create_state(pretrained, NUM_CLASSES, 'full', cfg, 20, initialised, lr=lr)
