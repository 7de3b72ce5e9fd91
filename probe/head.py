"""The saved probe head (``clip_transfer.protocol.heads.LinearHead``, shared with fine-tune's LP-FT) and `predict`."""

from __future__ import annotations

from typing import Union

import numpy as np

from clip_transfer.protocol.heads import HEAD_FILE, LinearHead, load_head  # pylint: disable=unused-import  (re-exported)


def predict(head: Union[str, LinearHead], embeddings: np.ndarray) -> np.ndarray:
  """Predicted class indices (int64) for raw (unstandardised) embeddings."""
  if not isinstance(head, LinearHead):
    head = load_head(head)
  return np.argmax(head.logits(embeddings), axis=1).astype(np.int64)

