"""The flax.linen CLIP modules (vision + text towers) and the guide's Classifier; no loading code.

transformers 5.x ships no Flax models, so the project owns this one. The
parameter tree mirrors the old HF Flax CLIP exactly (``vision_model/encoder/
layers/0/self_attn/q_proj/kernel`` …), so ``flax_model.msgpack`` files load as
they are and PyTorch weights convert with the usual renaming rules.

All image inputs are NHWC. ``module.bind(variables).vision_model.unbind()``
gives a stand-alone vision tower, as in the Flax transfer-learning guide.
Loading, caching and checksumming weights live in ``clip_transfer.models.loading``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# --------------------------------------------------------------------------
# Configs: small frozen dataclasses (hashable, so modules can hold them).
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    'quick_gelu': _quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


def _activation(name: str) -> Callable:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f'unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}'
    ) from None


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


@flax.struct.dataclass
class VisionOutput:
  """What the vision tower returns (named as in transformers)."""

  last_hidden_state: jax.Array  # (B, 1 + num_patches, hidden), before post_layernorm
  pooler_output: jax.Array  # (B, hidden): class token after post_layernorm


@flax.struct.dataclass
class TextOutput:
  last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm
  pooler_output: jax.Array  # (B, hidden): the EOS token's state


class Attention(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    b, l, d = x.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f'hidden size {d} is not divisible by {h} heads')
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    # Scale q before the product, as the reference does (same rounding).
    q = dense('q_proj')(x) * ((d // h) ** -0.5)
    k = dense('k_proj')(x)
    v = dense('v_proj')(x)
    q, k, v = (t.reshape(b, l, h, d // h) for t in (q, k, v))
    if self.causal:
      causal = jnp.tril(jnp.ones((l, l), bool))[None, None]
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    return dense('out_proj')(dot_product_attention(q, k, v, mask=mask))


def dot_product_attention(q, k, v, *, scale: Optional[float] = None, mask=None):
  """softmax(q·kᵀ·scale [masked]) · v per head: (B, Q|K, H, Dh) in, (B, Q, H·Dh) out.

  The one attention core of every family. ``scale=None``: q comes pre-scaled (CLIP's
  and SigLIP's references scale q, DINOv2's the logits: the same rounding as each).
  ``mask``: broadcastable to (B, H, Q, K), True where a key may be attended. The
  softmax runs in float32 even for bf16 compute.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  if scale is not None:
    logits = logits * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return attend(probs, v)


def attend(probs, v):
  """``probs @ v`` per head: (B, H, Q, K) x (B, K, H, Dh) → (B, Q, H·Dh).

  The product is written head-major (bhqd), then transposed: asked for bqhd directly,
  XLA:CPU emits that batched dot in a layout its fast dot paths do not take, and
  attention ran ~2× slower on CPU (benchmarks/attention.py measures it).
  """
  b, _, q, _ = probs.shape
  out = jnp.einsum('bhqk,bkhd->bhqd', probs, v)
  return out.transpose(0, 2, 1, 3).reshape(b, q, -1)


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(x)
    x = _activation(self.hidden_act)(x)
    return nn.Dense(d, dtype=self.dtype, name='fc2')(x)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block."""

  config: Any  # VisionConfig | TextConfig
  dtype: Dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    c = self.config
    ln = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + Attention(c.num_attention_heads, self.dtype, self.causal,
                      name='self_attn')(ln('layer_norm1')(x), mask)
    x = x + MLP(c.intermediate_size, c.hidden_act, self.dtype,
                name='mlp')(ln('layer_norm2')(x))
    return x


class LayerCollection(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    # Named '0', '1', … so paths match HF Flax checkpoints ('layers/0/…').
    for i in range(self.config.num_hidden_layers):
      x = EncoderLayer(self.config, self.dtype, self.causal, name=str(i))(x, mask)
    return x


class Encoder(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    return LayerCollection(self.config, self.dtype, self.causal, name='layers')(x, mask)


class VisionEmbeddings(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    init = nn.initializers.normal(0.02)
    class_embedding = self.param('class_embedding', init, (c.hidden_size,))
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                      strides=(c.patch_size, c.patch_size), padding='VALID',
                      use_bias=False, dtype=self.dtype, kernel_init=init,
                      name='patch_embedding')(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, c.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    pos = nn.Embed(c.num_patches + 1, c.hidden_size, embedding_init=init,
                   name='position_embedding')(jnp.arange(c.num_patches + 1))
    return x + pos[None].astype(x.dtype)


def check_input(pixel_values, c) -> None:
  """Refuses pixels that are not (B, image_size, image_size, channels) NHWC."""
  expected = (c.image_size, c.image_size, c.num_channels)
  if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
    raise ValueError(
        f'vision tower expects NHWC input of shape (B, {expected[0]}, '
        f'{expected[1]}, {expected[2]}), got {tuple(pixel_values.shape)}')


class VisionTransformer(nn.Module):
  """The CLIP vision tower. Input: NHWC pixels, already normalised."""

  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> VisionOutput:
    c = self.config
    check_input(pixel_values, c)
    ln = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
    x = VisionEmbeddings(c, self.dtype, name='embeddings')(pixel_values)
    x = ln('pre_layrnorm')(x)  # sic: the reference's spelling
    x = Encoder(c, self.dtype, name='encoder')(x)
    pooled = ln('post_layernorm')(x[:, 0])
    return VisionOutput(last_hidden_state=x, pooler_output=pooled)


class TextTransformer(nn.Module):
  config: TextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None) -> TextOutput:
    c = self.config
    # HF layout nests both embeddings under 'embeddings'.
    x = TextEmbeddings(c, name='embeddings')(input_ids).astype(self.dtype)
    mask = None
    if attention_mask is not None:
      mask = attention_mask[:, None, None, :].astype(bool)
    x = Encoder(c, self.dtype, causal=True, name='encoder')(x, mask)
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name='final_layer_norm')(x)
    if c.eos_token_id == 2:
      # Legacy configs: the EOS token has the highest id in the vocabulary.
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    pooled = x[jnp.arange(x.shape[0]), eos]
    return TextOutput(last_hidden_state=x, pooler_output=pooled)


class TextEmbeddings(nn.Module):
  config: TextConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init,
                   name='token_embedding')(input_ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                   name='position_embedding')(jnp.arange(input_ids.shape[-1]))
    return tok + pos[None]


class CLIP(nn.Module):
  """CLIP with ``vision_model`` and ``text_model`` defined in ``setup()``.

  ``text_config`` is None for vision-only checkpoints; ``projection_dim`` is
  None when the checkpoint has no ``visual_projection``.
  """

  vision_config: VisionConfig
  text_config: Optional[TextConfig] = None
  projection_dim: Optional[int] = None
  logit_scale_init_value: float = 2.6592
  dtype: Dtype = jnp.float32

  family = 'clip'
  pooling = 'class token after post_layernorm'

  def setup(self):
    self.vision_model = VisionTransformer(self.vision_config, self.dtype)
    if self.text_config is not None:
      self.text_model = TextTransformer(self.text_config, self.dtype)
    else:
      self.text_model = None
    if self.projection_dim is not None:
      dense = lambda: nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
      self.visual_projection = dense()
      if self.text_config is not None:
        self.text_projection = dense()
        self.logit_scale = self.param(
            'logit_scale', nn.initializers.constant(self.logit_scale_init_value), ())

  def project_image(self, pooled):
    """The pooled vision feature → the image-text space (``visual_projection``)."""
    if self.projection_dim is None:
      raise ValueError('this checkpoint has no visual_projection')
    return self.visual_projection(pooled)

  def get_image_features(self, pixel_values):
    """Projected image embeddings (B, projection_dim)."""
    return self.project_image(self.vision_model(pixel_values).pooler_output)

  def logit_params(self):
    """(logit_scale, logit_bias): CLIP's scores are exp(scale) · cos, with no bias."""
    return self.logit_scale, None

  def get_text_features(self, input_ids, attention_mask=None):
    if self.text_model is None or self.projection_dim is None:
      raise ValueError('this checkpoint has no text tower / text_projection')
    return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

  def __call__(self, pixel_values, input_ids=None, attention_mask=None):
    """Returns dict(image_embeds, text_embeds, logits_per_image, logits_per_text)."""
    if input_ids is None:
      return {'image_embeds': self.get_image_features(pixel_values)}
    image = self.get_image_features(pixel_values)
    text = self.get_text_features(input_ids, attention_mask)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits_per_text = jnp.exp(self.logit_scale) * text @ image.T
    return {
        'image_embeds': image,
        'text_embeds': text,
        'logits_per_image': logits_per_text.T,
        'logits_per_text': logits_per_text,
    }


def dummy_inputs(module: CLIP, batch: int = 1):
  """Zero inputs with the right shapes for ``module.init``."""
  v = module.vision_config
  pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
  if module.text_config is None or module.projection_dim is None:
    return (pixels,)
  ids = jnp.zeros((batch, module.text_config.max_position_embeddings), jnp.int32)
  return (pixels, ids)


def init_params(module: CLIP, seed: int = 0):
  """Randomly initialised params (deterministic in ``seed``)."""
  init = jax.jit(lambda rng: module.init(rng, *dummy_inputs(module), method=_init_all))
  return init(jax.random.PRNGKey(seed))['params']


def _init_all(module: CLIP, pixel_values, input_ids=None):
  # Touch every submodule so init creates all params (projections included).
  out = module.vision_model(pixel_values)
  if module.projection_dim is not None:
    module.visual_projection(out.pooler_output)
  if input_ids is not None:
    module(pixel_values, input_ids)
  return out


def param_shapes(module: CLIP) -> dict:
  """The param tree's shapes, without allocating it."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *dummy_inputs(module), method=_init_all))
  return shapes['params']


class Classifier(nn.Module):
  """The Flax transfer-learning guide's classifier: backbone + zero-init Dense head.

  With ``projection_dim`` the head sits on CLIP's L2-normalised projected
  features (``projection`` holds the pretrained ``visual_projection``), where
  the class text embeddings are a ready-made head (zero-shot initialisation).
  """

  num_classes: int
  backbone: nn.Module
  projection_dim: Optional[int] = None
  # L2-normalise the pooled features without a projection: SigLIP's image-text space is
  # its pooled feature itself (implied when projection_dim is set).
  normalize: bool = False

  @nn.compact
  def __call__(self, x):
    x = self.backbone(x).pooler_output
    if self.projection_dim is not None:
      x = nn.Dense(self.projection_dim, use_bias=False, dtype=x.dtype, name='projection')(x)
    if self.projection_dim is not None or self.normalize:
      x = x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True).astype(x.dtype)
    return nn.Dense(self.num_classes, name='head', kernel_init=nn.zeros)(x)
