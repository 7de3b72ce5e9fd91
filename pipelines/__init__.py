"""Beam pipelines: `python -m pipelines.embed`."""
