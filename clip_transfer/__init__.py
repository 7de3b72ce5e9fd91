"""clip-transfer: the library shared by the embed, probe and fine-tune stages."""

__version__ = '0.1.0'

# Every stage imports this package before Beam or TFDS: errors' import silences their noise.
from clip_transfer import errors as _errors  # pylint: disable=unused-import,g-bad-import-order
# Before any stage starts JAX: the XLA:CPU flags this project measured faster (README,
# "Performance notes"); a flag the user set wins, and after JAX has started it does nothing.
from clip_transfer import xla_defaults as _xla_defaults  # pylint: disable=g-bad-import-order
_xla_defaults.apply_cpu_defaults()
