"""clip-transfer: the library shared by the embed, probe and fine-tune stages."""

__version__ = '0.1.0'

# Every stage imports this package before Beam or TFDS: errors' import silences their noise.
from clip_transfer import errors as _errors  # pylint: disable=unused-import,g-bad-import-order
