"""The Flax guide's ``load_model``, at the name users know: ``clip_transfer.clip.load_model``.

    module, variables = clip_transfer.clip.load_model('openai/clip-vit-base-patch32')

The work is in ``clip_transfer.models`` (loading, cache, checksum, vision tower).
"""

from clip_transfer.models.loading import DEFAULT_MODEL, load, load_model  # pylint: disable=unused-import
