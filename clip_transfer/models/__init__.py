"""Pretrained backbones: one module per family, and ``load`` — the one way a stage gets a model."""

from clip_transfer.models.loading import (  # pylint: disable=unused-import  (the room's API)
    DEFAULT_MODEL, DTYPES, Pretrained, clear_cache, load, load_model, params_checksum)
