"""Where a model is loaded: the per-process cache, the weights checksum, the vision tower.

    module, variables = clip_transfer.models.load_model('openai/clip-vit-base-patch32')

``load`` is the one way every stage gets a model: a hub id, a local
``save_pretrained`` directory of any family (CLIP, SigLIP, DINOv2, OpenCLIP; see
``clip_transfer.models.families``) or a ``random:<preset>``, read once per
process, name and dtype (a Beam worker's handler and the launcher share it;
fine-tune modes in one process share it). The linen modules live in one module
per family (``clip``, ``siglip``, ``dinov2``); ``families.read`` picks the reader and
``clip_transfer.models.checkpoints`` reads the weight files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any, Callable, Optional

import flax
import jax.numpy as jnp
import numpy as np

from clip_transfer.models import families
from clip_transfer.data.preprocess import PreprocessConfig

DEFAULT_MODEL = 'openai/clip-vit-base-patch32'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def params_checksum(params) -> str:
  """sha256 over the flattened params (path, dtype, shape, bytes), sorted by path."""
  h = hashlib.sha256()
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  for path in sorted(flat):
    a = np.asarray(flat[path])
    h.update(path.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(memoryview(np.ascontiguousarray(a)).cast('B'))  # no copy: 3x faster than tobytes()
  return h.hexdigest()


@dataclasses.dataclass
class Pretrained:
  """A loaded model with everything recorded alongside what is computed from it.

  What stages need, the same on every family: ``family``, ``pooling`` (what the
  vision tower's ``pooler_output`` is), ``embedding_dim``, ``projection_dim``
  (the image-text space, None when vision-only), ``has_text``, ``vision_tower()``.
  """

  module: Any  # a family's linen module, e.g. clip.CLIP
  variables: dict  # {'params': …}
  preprocess: PreprocessConfig
  name: str  # what the user passed
  revision: Optional[str] = None  # hub commit, when downloaded
  _checksum: Optional[str] = dataclasses.field(default=None, repr=False, compare=False)

  def checksum(self) -> str:
    """sha256 of the params; computed once (ViT-B/32 with its text tower: ~600 MB)."""
    if self._checksum is None:
      self._checksum = params_checksum(self.variables['params'])
    return self._checksum

  def vision_tower(self) -> tuple[Any, dict]:
    """The stand-alone vision tower and its variables, exactly as the Flax guide extracts them."""
    vision_model, vision_vars = self.module.bind(self.variables).vision_model.unbind()
    return vision_model, vision_vars

  def text_tower(self) -> Optional[tuple[Any, dict]]:
    """The stand-alone text tower and its variables (bind/unbind, as ``vision_tower``), or None."""
    if self.module.text_config is None:
      return None
    return self.module.bind(self.variables).text_model.unbind()

  @property
  def family(self) -> str:
    return self.module.family

  @property
  def pooling(self) -> str:
    return self.module.pooling

  @property
  def embedding_dim(self) -> int:
    """The width of the pooled vision feature (DINOv2's is class ‖ mean patch: 2·hidden)."""
    hidden = self.module.vision_config.hidden_size
    return 2 * hidden if self.family == 'dinov2' else hidden

  @property
  def projection_dim(self) -> Optional[int]:
    return self.module.projection_dim

  @property
  def has_text(self) -> bool:
    return self.module.text_config is not None and self.module.projection_dim is not None

  def image_projection(self) -> tuple[Optional[Callable], Any]:
    """``(fn, params)`` with ``fn(params, pooled) -> projected``, or ``(None, None)``.

    CLIP's is ``visual_projection`` (a kernel); SigLIP's embedding space is the pooled
    feature itself. The params are an argument so a jitted caller does not bake them in.
    """
    if self.projection_dim is None:
      return None, None
    if self.family == 'siglip':
      return (lambda _, pooled: pooled), None
    kernel = self.variables['params']['visual_projection']['kernel']
    # In the tower's compute dtype, as nn.Dense(dtype=…) would do it.
    return (lambda k, pooled: pooled @ k.astype(pooled.dtype)), kernel


_CACHE: dict[tuple[str, str], Pretrained] = {}
_CACHE_LOCK = threading.Lock()


def _dtype_name(dtype) -> str:
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
  return name


def load(name_or_path: str = DEFAULT_MODEL, dtype='float32') -> Pretrained:
  """The model, read at most once per process for each name.

  ``dtype`` is the compute dtype; params stay float32, so every dtype of a name
  shares one copy of them (and its checksum): only the module differs. Callers
  share the returned arrays; JAX arrays are immutable, and training copies them
  before it donates buffers (see ``finetune.model.transfer``).
  """
  key = (name_or_path, _dtype_name(dtype))
  with _CACHE_LOCK:  # RunInference may load from several threads at once
    base_key = (name_or_path, 'float32')
    if base_key not in _CACHE:
      ckpt = families.read(name_or_path)
      _CACHE[base_key] = Pretrained(ckpt.module, {'params': ckpt.params}, ckpt.preprocess,
                                    name_or_path, ckpt.revision)
    if key not in _CACHE:
      base = _CACHE[base_key]
      base.checksum()  # computed once, shared by every dtype
      _CACHE[key] = dataclasses.replace(base, module=base.module.clone(dtype=DTYPES[key[1]]))
    return _CACHE[key]


def clear_cache() -> None:
  """Forgets every loaded model (their memory is freed once no caller holds them)."""
  with _CACHE_LOCK:
    _CACHE.clear()


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=jnp.float32):
  """Returns ``(module, variables)`` with ``variables = {'params': …}``, as the Flax guide's ``load_model``.

  ``name_or_path``: a Hugging Face hub id, a local ``save_pretrained`` directory
  (``CLIPModel`` or ``CLIPVisionModel``), or ``random:tiny`` / ``random:vit-b32``.
  ``load`` gives the preprocessing config and checksum too.
  """
  pre = load(name_or_path, dtype)
  return pre.module, pre.variables
