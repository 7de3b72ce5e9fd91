"""XLA:CPU settings this project measured faster, added to ``XLA_FLAGS`` before JAX's CPU
backend starts (``apply_cpu_defaults``; importing ``clip_transfer`` calls it).

XLA reads ``XLA_FLAGS`` once, when a backend initialises; a flag added later changes
nothing, so once any JAX backend is up this does nothing. A flag the user set (in
``XLA_FLAGS``, any value) is left as it is; ``CLIP_TRANSFER_XLA_DEFAULTS=0`` turns all of
this off. Nothing is added when ``JAX_PLATFORMS`` names platforms without ``cpu``, or
on a jaxlib older than the one these were measured on (an unknown flag name in
``XLA_FLAGS`` aborts XLA).

What and why (README, "Performance notes"):

- ``xla_cpu_experimental_ynn_fusion_type=`` (empty): dots go to XLA's Eigen matmul
  instead of YNNPACK, which jaxlib 0.10 uses for every plain dot by default; on this
  project's x86 CPU (avx512) the ViT's dense layers (e.g. 6272x768 @ 768x3072, SigLIP
  B/16 at batch 32) ran 25-35% faster on Eigen.
"""

from __future__ import annotations

import os
import re
import sys
from typing import MutableMapping, Optional

OFF_SWITCH = 'CLIP_TRANSFER_XLA_DEFAULTS'
# (flag, value): XLA:CPU only; GPU/TPU compiles never read them.
CPU_DEFAULTS = (('xla_cpu_experimental_ynn_fusion_type', ''),)
MIN_JAXLIB = (0, 10)  # the flag names above exist from here on (measured on 0.10.2)


def _flag_names(xla_flags: str) -> set[str]:
  return {m.group(1) for m in re.finditer(r'(?:^|\s)--?([A-Za-z0-9_]+)', xla_flags)}


def _backend_started() -> bool:
  # Without importing jax (report tools need none): not imported yet means not started.
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(bridge, '_backends', None)) if bridge is not None else False


def _jaxlib_version() -> Optional[tuple[int, ...]]:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return tuple(int(p) for p in re.findall(r'\d+', metadata.version('jaxlib'))[:2])
  except Exception:  # pylint: disable=broad-except
    return None


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None,
                       backend_started: Optional[bool] = None) -> list[str]:
  """Adds each of ``CPU_DEFAULTS`` the user did not set to ``XLA_FLAGS``; returns what it added.

  Adds nothing (returns []) when switched off, when JAX_PLATFORMS excludes cpu, on an
  older jaxlib, or when a JAX backend has already started (too late for XLA to read it).
  """
  environ = os.environ if environ is None else environ
  if environ.get(OFF_SWITCH, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return []
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms and 'cpu' not in platforms:
    return []
  version = _jaxlib_version()
  if version is None or version < MIN_JAXLIB:
    return []
  if _backend_started() if backend_started is None else backend_started:
    return []
  current = environ.get('XLA_FLAGS', '')
  have = _flag_names(current)
  added = [f'--{name}={value}' for name, value in CPU_DEFAULTS if name not in have]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current.strip()] + added).strip()
  return added
