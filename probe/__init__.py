"""Linear probe on an embedding dataset: python -m probe.train; probe.predict applies a saved head."""

from probe.head import LinearHead, load_head, predict

__all__ = ['LinearHead', 'load_head', 'predict', 'train_probe', 'train_probe_arrays']


def __getattr__(name):
  # train pulls in JAX and sklearn; only pay for them when asked.
  if name in ('train_probe', 'train_probe_arrays'):
    from probe import train  # pylint: disable=g-import-not-at-top
    return getattr(train, name)
  raise AttributeError(name)
