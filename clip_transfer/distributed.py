"""The multi-host runtime every training CLI shares: JAX's own (``jax.distributed``), one global mesh.

One controller process per host, started by the user (or Slurm / a TPU slice):

    python -m probe.train ... --coordinator_address=HOST0:1234 --num_processes=N --process_id=I

Without these flags a run is single-process and nothing here changes it: no
``jax.distributed.initialize``, the mesh is the local devices. On Slurm and on
Cloud TPU slices JAX finds the three values itself (``initialize()`` with no
arguments), so no flag is needed there.

What the stages use: ``initialize`` (once, first thing in ``main``), ``mesh``
(every device of every process on one ``data`` axis), ``local_range`` (the
rows this process reads), ``shard_rows`` (this process's rows → one global
array, ``jax.make_array_from_process_local_data``), ``gather_rows`` and
``allgather`` (results every process agrees on) and ``is_writer`` (files are
written by process 0 alone).

A process that dies must not leave the others waiting forever: the
coordination service's heartbeat timeout is a flag (short in tests), and a
watchdog thread polls the service for live processes, so the others end with
one line naming the lost process instead of hanging or dumping a C++ trace.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Optional, Sequence

import numpy as np

from clip_transfer import flags
from clip_transfer.errors import UserError

log = logging.getLogger(__name__)

AXIS = 'data'  # the one mesh axis: rows (examples) are split over it
WATCH_EVERY_S = 0.5  # how often the watchdog asks the service which processes are alive
# Environment variables of launchers under which jax.distributed.initialize()
# finds the coordinator, process count and index by itself.
AUTO_DETECT_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_STEP_NUM_TASKS', 'TPU_WORKER_HOSTNAMES',
                   'OMPI_COMM_WORLD_SIZE')
EXIT_PEER_LOST = 3  # exit status when another process of the run died
SHUTDOWN_TIMEOUT_S = 120  # at least this long for every process to reach the end


@dataclasses.dataclass(kw_only=True)
class DistributedOptions:
  """The multi-host flags; every training CLI's config inherits them (clip_transfer.flags)."""

  coordinator_address: Optional[str] = flags.field(
      None, 'multi-host: HOST:PORT of process 0, the same on every process (default: JAX\'s '
      'auto-detection on Slurm / TPU slices, else a single-process run)')
  num_processes: Optional[int] = flags.field(None, 'multi-host: how many processes in the run')
  process_id: Optional[int] = flags.field(None, 'multi-host: this process\'s index, 0 … N-1')
  heartbeat_timeout_s: int = flags.field(
      100, 'multi-host: a process silent this long counts as dead and the run stops')
  initialization_timeout_s: int = flags.field(
      300, 'multi-host: how long to wait for every process to join')


def _check(options: DistributedOptions) -> bool:
  """True when the flags ask for a multi-process run; a UserError when they contradict."""
  given = [options.coordinator_address is not None, options.num_processes is not None,
           options.process_id is not None]
  if not any(given):
    return False
  if options.num_processes == 1 and options.process_id in (None, 0):
    return False
  if not all(given):
    raise UserError('a multi-host run needs all of --coordinator_address, --num_processes and '
                    '--process_id (or none of them, for one process or JAX\'s auto-detection)')
  if options.num_processes < 1:
    raise UserError(f'--num_processes must be at least 1, got {options.num_processes}')
  if not 0 <= options.process_id < options.num_processes:
    raise UserError(f'--process_id must be in 0 … {options.num_processes - 1}, '
                    f'got {options.process_id}')
  host, _, port = options.coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'--coordinator_address must be HOST:PORT, got '
                    f'{options.coordinator_address!r}')
  if options.heartbeat_timeout_s < 1 or options.initialization_timeout_s < 1:
    raise UserError('--heartbeat_timeout_s and --initialization_timeout_s must be >= 1')
  return True


_stop_watching = threading.Event()
_heartbeat_timeout_s = None  # set by initialize: how long the service takes to notice a death


def _lost(message: str) -> None:
  # The main thread may be blocked inside a collective that will never
  # complete: leave at once, with the one line a user needs.
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


def _watch(client, num_processes: int, me: int, address: str) -> None:
  """Ends this process with one line when another one is gone (or the coordinator is)."""
  everyone = list(range(num_processes))
  while not _stop_watching.wait(WATCH_EVERY_S):
    try:
      live = client.get_live_nodes(everyone)
    except Exception:  # pylint: disable=broad-except
      if _stop_watching.is_set():
        return
      _lost(f'process {me}: lost the coordinator (process 0 at {address}); stopping')
    missing = [p for p in everyone if p not in live]
    if missing and not _stop_watching.is_set():
      _lost(f'process {me}: process {missing[0]} of {num_processes} stopped (no heartbeat); '
            'stopping this one too')


def _at_exit() -> None:
  _stop_watching.set()
  # JAX's shutdown barrier comes next and ends the process hard if a peer
  # never arrives: what the run printed must be out before that.
  sys.stdout.flush()
  sys.stderr.flush()


def initialize(options: DistributedOptions) -> None:
  """Joins the run described by the flags (or the environment); a no-op for one process."""
  import jax  # pylint: disable=g-import-not-at-top

  explicit = _check(options)
  auto = not explicit and any(os.environ.get(v) for v in AUTO_DETECT_ENV) and not any(
      v is not None for v in (options.coordinator_address, options.num_processes))
  if not (explicit or auto) or jax.distributed.is_initialized():
    return
  # CPU processes need a collectives library to talk to each other; the
  # setting only concerns the CPU backend (GPUs use NCCL, TPUs ICI).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kw = dict(initialization_timeout=options.initialization_timeout_s,
            heartbeat_timeout_seconds=options.heartbeat_timeout_s,
            # A finished process waits at most this long for the others at exit
            # (they may still be writing or tearing down).
            shutdown_timeout_seconds=max(options.heartbeat_timeout_s, SHUTDOWN_TIMEOUT_S))
  try:
    if explicit:
      jax.distributed.initialize(options.coordinator_address, options.num_processes,
                                 options.process_id, **kw)
    else:
      jax.distributed.initialize(**kw)
    jax.devices()  # join the backend now, so a missing process fails here, in one line
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'cannot join the multi-host run at '
                    f'{options.coordinator_address or "the auto-detected coordinator"}: '
                    f'{first}') from None
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  global _heartbeat_timeout_s  # pylint: disable=global-statement  (one run per process)
  _heartbeat_timeout_s = options.heartbeat_timeout_s
  client = jax_distributed.global_state.client
  me, n = jax.process_index(), jax.process_count()
  address = options.coordinator_address or jax_distributed.global_state.coordinator_address
  threading.Thread(target=_watch, args=(client, n, me, address), daemon=True,
                   name='peer-watchdog').start()
  # atexit runs last-registered first: stop watching before JAX's own shutdown
  # barrier, where the coordinator going away is the normal end of the run.
  atexit.register(_at_exit)
  log.info('process %d of %d joined %s: %d local devices, %d in all', me, n, address,
           jax.local_device_count(), jax.device_count())


@contextlib.contextmanager
def peer_failures():
  """Around a stage's work: a collective that fails because a peer died ends in one line.

  A dead peer shows first as an error inside a collective (gloo: connection
  reset); the coordination service names it within the heartbeat timeout, and
  the watchdog then ends this process with that one line. So on an error in a
  multi-process run, wait that long for the watchdog before letting the error
  through (it was then this process's own).
  """
  try:
    yield
  except Exception:  # pylint: disable=broad-except
    if _heartbeat_timeout_s is not None and not _stop_watching.is_set():
      time.sleep(_heartbeat_timeout_s + 5 * WATCH_EVERY_S)
    raise


def process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def is_writer() -> bool:
  """Files a run writes once (metrics.json, heads, reports) come from process 0."""
  return process_index() == 0


def mesh():
  """Every device of every process on one data axis (the local devices for one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def rows_sharded() -> bool:
  """Whether a stage splits its rows over ``mesh()``: more than one device in the run."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.device_count() > 1


def local_range(num_rows: int, index: Optional[int] = None,
                count: Optional[int] = None) -> range:
  """The contiguous rows ``[start, stop)`` process ``index`` of ``count`` reads (balanced)."""
  index = process_index() if index is None else index
  count = process_count() if count is None else count
  return range(num_rows * index // count, num_rows * (index + 1) // count)


def allgather(x: np.ndarray) -> np.ndarray:
  """(P, *x.shape): every process's ``x`` (same shape everywhere), on every process."""
  x = np.asarray(x)
  if process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # As raw bytes: JAX would turn float64/int64 into 32 bits (x64 is off).
  raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
  got = np.asarray(multihost_utils.process_allgather(raw, tiled=False))
  return np.ascontiguousarray(got).view(x.dtype).reshape((-1,) + x.shape)


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows, concatenated in process order (row counts may differ)."""
  local = np.asarray(local)
  if process_count() == 1:
    return local
  counts = allgather(np.int64(len(local)))
  padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  every = allgather(padded)
  return np.concatenate([every[p, :int(c)] for p, c in enumerate(counts)])


def gather_strings(local: Sequence[str]) -> list[str]:
  """``gather_rows`` for strings (ids): UTF-8 bytes in a fixed-width array."""
  if process_count() == 1:
    return list(local)
  encoded = [s.encode() for s in local]
  width = int(allgather(np.int64(max(map(len, encoded), default=0))).max())
  arr = np.zeros((len(encoded), max(width, 1)), np.uint8)
  for i, b in enumerate(encoded):
    arr[i, :len(b)] = np.frombuffer(b, np.uint8)
  return [bytes(row).rstrip(b'\0').decode() for row in gather_rows(arr)]


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The elementwise sum of every process's ``x`` (float64 stays float64), on every process."""
  return allgather(x).sum(axis=0)


def shard_rows(arrays: Sequence[np.ndarray], the_mesh=None) -> tuple[list, int]:
  """This process's rows of each array → global arrays with rows split over ``the_mesh``.

  Every process contributes the same number of rows (the largest count, rounded
  up to its local devices): callers mark padding with a weight-0 row. Returns
  (global arrays, rows per process).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  the_mesh = mesh() if the_mesh is None else the_mesh
  n = len(arrays[0])
  per_device = -(-int(allgather(np.int64(n)).max()) // jax.local_device_count())
  rows = max(1, per_device) * jax.local_device_count()
  out = []
  for a in arrays:
    a = np.asarray(a)
    padded = np.zeros((rows,) + a.shape[1:], a.dtype)
    padded[:n] = a
    spec = PartitionSpec(AXIS, *([None] * (a.ndim - 1)))
    out.append(jax.make_array_from_process_local_data(NamedSharding(the_mesh, spec), padded))
  return out, rows


def replicated(x):
  """A fully replicated global array's value as numpy, on every process."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), x)
