"""Beam pipelines: `python -m pipelines.embed`."""

import clip_transfer  # pylint: disable=unused-import  (first: quiets Beam's import-time log lines)
