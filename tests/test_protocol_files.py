"""The files stages hand each other: metrics.json (writer, reader, method names) and saved heads."""

import json
import os

import numpy as np
import pytest

from clip_transfer.errors import UserError
from clip_transfer.protocol import heads
from clip_transfer.protocol import metrics


def _metrics(**model):
  m = metrics.header('probe', dataset={'spec': 'digits', 'name': 'digits', 'version': '1',
                                       'train_split': 'train', 'eval_split': 'test'},
                     model={'name': 'random:tiny', metrics.WEIGHTS_CHECKSUM: 'ab' * 32, **model},
                     class_names=['a', 'b'], num_train=4, num_eval=2)
  m['methods']['jax'] = metrics.classification(np.array([[1., 0.], [0., 1.]]), np.array([0, 0]),
                                               ['a', 'b'])
  return m


def test_metrics_round_trip_file_or_directory(tmp_path):
  m = _metrics()
  path = metrics.write(str(tmp_path), m)
  assert path == str(tmp_path / 'metrics.json') and not os.path.exists(path + '.tmp')
  assert metrics.read(str(tmp_path)) == metrics.read(path) == json.loads(json.dumps(m))
  assert metrics.read(path)['methods']['jax']['top1'] == 0.5


def test_writer_refuses_nan(tmp_path):
  m = _metrics()
  m['methods']['jax']['wall_s'] = float('nan')
  with pytest.raises(UserError, match='NaN or inf'):
    metrics.write(str(tmp_path), m)
  assert not os.path.exists(tmp_path / 'metrics.json')


@pytest.mark.parametrize('text,message', [
    (None, 'no such file'),
    ('{"stage": "probe", "methods": {', 'not readable JSON'),
    (b'\xff\xfe\x00', 'not readable JSON'),
    ('[1, 2]', 'no "stage" and "methods"'),
    ('{"stage": "probe", "methods": []}', 'no "stage" and "methods"'),
    ('{"methods": {}}', 'no "stage" and "methods"'),
    ('{"stage": "probe", "methods": {"jax": {"top1": NaN}}}', 'methods.jax.top1 is NaN or inf'),
    ('{"stage": "probe", "methods": {"jax": {"top1_ci95": [0.1, Infinity]}}}',
     r'methods.jax.top1_ci95\[1\] is NaN or inf'),
])
def test_reader_refuses_in_one_line(tmp_path, text, message):
  path = tmp_path / 'metrics.json'
  if isinstance(text, bytes):
    path.write_bytes(text)
  elif text is not None:
    path.write_text(text)
  with pytest.raises(UserError, match=message) as e:
    metrics.read(str(tmp_path))
  assert '\n' not in str(e.value)


def test_weights_checksum_reads_the_old_name():
  assert metrics.weights_checksum({'weights_sha256': 'new'}) == 'new'
  assert metrics.weights_checksum({'params_sha256': 'old'}) == 'old'  # files from before
  assert metrics.weights_checksum({}) is None and metrics.weights_checksum(None) is None


@pytest.mark.parametrize('name,parts', [
    ('jax', metrics.MethodName('jax')),
    ('sklearn_5shot', metrics.MethodName('sklearn', shots=5)),
    ('full@probe', metrics.MethodName('full', head_init='probe')),
    ('last:2@zeroshot+wise', metrics.MethodName('last:2', head_init='zeroshot', wise=True)),
    ('differential+wise', metrics.MethodName('differential', wise=True)),
    ('jax_16shot', metrics.MethodName('jax', shots=16)),
])
def test_method_names_built_and_parsed_in_one_place(name, parts):
  assert metrics.parse_method(name) == parts
  assert str(parts) == name
  assert metrics.method_name(parts.base, head_init=parts.head_init, wise=parts.wise,
                             shots=parts.shots) == name


def _head(d=3, c=2):
  rng = np.random.default_rng(0)
  return heads.LinearHead(kernel=rng.normal(size=(d, c)).astype(np.float32),
                          bias=rng.normal(size=c).astype(np.float32),
                          mean=rng.normal(size=d).astype(np.float32),
                          std=rng.uniform(0.5, 2, size=d).astype(np.float32),
                          class_names=['cat', 'dog'][:c], l2=1e-3)


def test_probe_head_round_trip_and_fold(tmp_path):
  head = _head()
  head.save(str(tmp_path))
  back = heads.load_head(str(tmp_path))
  for k in ('kernel', 'bias', 'mean', 'std'):
    np.testing.assert_array_equal(getattr(back, k), getattr(head, k))
  assert (back.class_names, back.l2) == (['cat', 'dog'], 1e-3)
  x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  kernel, bias = back.folded()  # the same head on raw features
  np.testing.assert_allclose(x @ kernel + bias, back.logits(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match=r'do not fit this head, which takes \(N, 3\)'):
    back.logits(x[:, :2])


def test_zeroshot_head_round_trip_and_dense(tmp_path):
  emb = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  head = heads.ZeroshotHead(emb, np.log(100.0), ['cat', 'dog'], ['a photo of a {}.'])
  head.save(str(tmp_path))
  back = heads.load_zeroshot_head(str(tmp_path))
  np.testing.assert_array_equal(back.head, emb)
  assert back.class_names == ['cat', 'dog'] and back.templates == ['a photo of a {}.']
  kernel, bias = back.dense()
  x = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
  np.testing.assert_allclose(x @ kernel + bias, 100 * x @ emb.T, rtol=1e-4)


def test_heads_refuse_what_they_cannot_read_in_one_line(tmp_path):
  with pytest.raises(UserError, match='no probe head at'):
    heads.load_head(str(tmp_path))
  with pytest.raises(UserError, match='no zero-shot head at'):
    heads.load_zeroshot_head(str(tmp_path))
  path = tmp_path / heads.HEAD_FILE
  cases = {
      'not a probe head file .it holds pickled Python objects, which are never loaded':
          lambda: path.write_bytes(b'not an npz'),  # numpy would try to unpickle it
      "no 'std' array": lambda: np.savez(path, kernel=np.zeros((3, 2)), bias=np.zeros(2),
                                         mean=np.zeros(3), class_names=np.array(['a', 'b']),
                                         l2=1.0),
      'pickled Python objects': lambda: np.savez(
          path, kernel=np.zeros((3, 2)), bias=np.zeros(2), mean=np.zeros(3), std=np.ones(3),
          class_names=np.array([{'code': 1}, 2], dtype=object), l2=1.0),
      'do not fit together': lambda: np.savez(
          path, kernel=np.zeros((3, 2)), bias=np.zeros(3), mean=np.zeros(3), std=np.ones(3),
          class_names=np.array(['a', 'b']), l2=1.0),
  }
  for message, write in cases.items():
    write()
    with pytest.raises(UserError, match=message) as e:
      heads.load_head(str(tmp_path))
    assert '\n' not in str(e.value) and 'allow_pickle' not in str(e.value)  # never the unsafe fix
  (tmp_path / heads.ZEROSHOT_HEAD_FILE).write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(UserError, match='not a readable zero-shot head file'):
    heads.load_zeroshot_head(str(tmp_path))
