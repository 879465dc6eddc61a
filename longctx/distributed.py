"""Multi-host runs: start `jax.distributed` and keep every host in step.

One process runs per host; each sees its local devices, and together they see
the global mesh. Start them all with the same command plus where to meet:

    longctx train RECIPE --coordinator 10.0.0.1:1234 --num-processes 4 --process-id I
    LONGCTX_COORDINATOR=10.0.0.1:1234 LONGCTX_NUM_PROCESSES=4 LONGCTX_PROCESS_ID=I longctx train RECIPE
    longctx train RECIPE --distributed       # TPU pod slices, SLURM, Open MPI: JAX detects all three

What a multi-host run does differently (see `training/loop.py`):
  * each process reads only its own lanes (`Trainer.local_lane_range`) and
    `Trainer.put_batch` builds the global batch from the process-local rows;
  * every process saves and restores the same orbax checkpoint (a shared run
    dir); the data position saved with it is gathered from all processes
    (`gather_lane_state`), so each can cut out its own lanes on resume;
  * evaluation runs until every process has run out of held-out documents
    (`synchronized`), since each step is one collective program;
  * only process 0 prints, logs metrics, writes config.json, plots and
    TensorBoard events.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from longctx.errors import DistributedError

ENV_COORDINATOR = "LONGCTX_COORDINATOR"
ENV_NUM_PROCESSES = "LONGCTX_NUM_PROCESSES"
ENV_PROCESS_ID = "LONGCTX_PROCESS_ID"
ENV_TIMEOUT = "LONGCTX_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def _from_env(value, env: str, flag: str):
  """(value, where it came from) with the env var as fallback."""
  if value is not None:
    return value, flag
  raw = os.environ.get(env)
  if raw is None or raw.strip() == "":
    return None, env
  return raw.strip(), env


def _as_int(value, where: str, *, minimum: int) -> int:
  try:
    out = int(value)
    if isinstance(value, float) and out != value:
      raise ValueError
  except (TypeError, ValueError):
    raise DistributedError(f"{where}={value!r} is not an integer") from None
  if out < minimum:
    raise DistributedError(f"{where}={out} must be >= {minimum}")
  return out


def parse_coordinator(text: str, where: str = "coordinator") -> tuple[str, int]:
  """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port)."""
  host, sep, port = str(text).rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"{where}={text!r} is not HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:1234)")
  return host, int(port)


def _wait_for_coordinator(host: str, port: int, *, timeout_s: float, process_id: int) -> None:
  """Block until a TCP connection to the coordinator succeeds (JAX aborts the process if it never does)."""
  deadline = time.monotonic() + timeout_s
  reason = "no answer"
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
        return
    except socket.gaierror as e:
      raise DistributedError(f"coordinator host {host!r} does not resolve ({e.strerror}); "
                             "pass the address of process 0's host") from None
    except OSError as e:
      reason = e.strerror or type(e).__name__
    if time.monotonic() >= deadline:
      raise DistributedError(
          f"process {process_id} could not reach the coordinator {host}:{port} within {timeout_s:g} s ({reason}); "
          "start process 0 (the coordinator) too, check the host and port, or raise "
          f"{ENV_TIMEOUT}")
    time.sleep(0.2)


def _check_port_free(port: int) -> None:
  """Process 0 hosts the coordinator service on `port` (all interfaces)."""
  for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 on this host: try IPv4
    try:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      sock.bind(address)
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(f"port {port} is already in use on this host, so process 0 cannot host the "
                               "coordinator there; pick another --coordinator port") from None
    finally:
      sock.close()


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False, timeout_s: float | None = None) -> bool:
  """Start `jax.distributed` for a multi-process run; call before any other JAX work.

  Each argument falls back to its env var (`LONGCTX_COORDINATOR`,
  `LONGCTX_NUM_PROCESSES`, `LONGCTX_PROCESS_ID`). Then:
    * all three known, `num_processes > 1`: join the run at `coordinator`
      ('HOST:PORT', process 0's host; process 0 serves it);
    * `num_processes == 1`, or nothing given and `auto=False`: a single-process
      run, nothing to do;
    * nothing given and `auto=True`: `jax.distributed.initialize()` detects the
      cluster (Cloud TPU pod slices, SLURM, Open MPI) by itself.
  On CPU, cross-process collectives go through gloo (the setting only affects
  the CPU backend). Calling it again once initialized does nothing.

  Args:
    timeout_s: how long to wait for the coordinator and the other processes
      (default `LONGCTX_INIT_TIMEOUT` or 300 s).
  Returns:
    True when this process is part of a multi-process run.
  Raises:
    DistributedError: a bad value, an unreachable coordinator, a busy port, no
      cluster found with `auto`, or JAX already in use (one line each).
  """
  import jax

  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator, c_from = _from_env(coordinator, ENV_COORDINATOR, "coordinator")
  num_processes, n_from = _from_env(num_processes, ENV_NUM_PROCESSES, "num_processes")
  process_id, p_from = _from_env(process_id, ENV_PROCESS_ID, "process_id")
  timeout, t_from = _from_env(timeout_s, ENV_TIMEOUT, "timeout_s")
  timeout = DEFAULT_TIMEOUT_S if timeout is None else float(_as_float(timeout, t_from))

  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if num_processes is not None:
    num_processes = _as_int(num_processes, n_from, minimum=1)
  if process_id is not None:
    process_id = _as_int(process_id, p_from, minimum=0)
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise DistributedError(f"{p_from}={process_id} must be below {n_from}={num_processes} "
                           f"(process ids are 0..{num_processes - 1})")
  if num_processes == 1:
    return False  # one process: nothing to coordinate
  if all(v is None for v in given.values()):
    if not auto:
      return False
    return _initialize_jax(jax, timeout=timeout, where="--distributed (auto-detect)")
  missing = [k for k, v in given.items() if v is None]
  if missing:
    names = {"coordinator": f"--coordinator / {ENV_COORDINATOR}", "num_processes":
             f"--num-processes / {ENV_NUM_PROCESSES}", "process_id": f"--process-id / {ENV_PROCESS_ID}"}
    raise DistributedError(f"a multi-process run needs the coordinator, the number of processes and this "
                           f"process's id; missing: {', '.join(names[k] for k in missing)}")
  host, port = parse_coordinator(coordinator, c_from)
  if process_id == 0:
    _check_port_free(port)
  else:
    _wait_for_coordinator(host, port, timeout_s=timeout, process_id=process_id)
  return _initialize_jax(jax, timeout=timeout, where=f"process {process_id} of {num_processes} at {host}:{port}",
                         coordinator_address=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                         num_processes=num_processes, process_id=process_id)


def _as_float(value, where: str) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{where}={value!r} is not a number of seconds") from None
  if not out > 0:
    raise DistributedError(f"{where}={value!r} must be > 0 seconds")
  return out


def _initialize_jax(jax, *, timeout: float, where: str, **kwargs) -> bool:
  from jax._src import xla_bridge  # no public way to ask whether JAX has started its backends

  if xla_bridge.backends_are_initialized():
    raise DistributedError("JAX is already in use in this process (devices or arrays were created), so it cannot "
                           "join a multi-process run; call longctx.distributed.initialize() first")
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(initialization_timeout=max(1, int(timeout)), **kwargs)
  except ValueError as e:  # auto-detection found nothing, or JAX rejected a value
    if not kwargs:
      raise DistributedError("--distributed found no TPU pod, SLURM or Open MPI environment to join; on other "
                             "clusters pass --coordinator HOST:PORT --num-processes N --process-id I") from None
    raise DistributedError(f"{where}: {str(e).splitlines()[0]}") from None
  except RuntimeError as e:
    raise DistributedError(f"{where}: {str(e).splitlines()[0]}") from None
  return jax.process_count() > 1


# ------------------------------------------------------------------------ keeping processes in step


def process_count() -> int:
  import jax

  return jax.process_count()


def is_host0() -> bool:
  import jax

  return jax.process_index() == 0


def assert_same(value: str, what: str) -> None:
  """Raise if the processes of the run disagree on `value` (e.g. the run dir or the config)."""
  import zlib

  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  digest = np.array([zlib.crc32(value.encode()) & 0x7FFFFFFF], np.int32)
  digests = multihost_utils.process_allgather(digest).reshape(-1)
  if not np.all(digests == digests[0]):
    others = [i for i, d in enumerate(digests) if d != digests[0]]
    raise DistributedError(f"the processes disagree on {what} (process 0 vs {others}); start every process with "
                           "the same recipe, overrides and --run-dir (a directory all hosts share)")


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
  """Every process raises if any of them failed a step it did alone (process 0 locking the run dir, say):
  the one that failed raises its own error, the others a DistributedError naming `what`."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.array([error is not None], np.int32)).reshape(-1)
    if error is None and np.any(failed):
      raise DistributedError(f"process {int(np.argmax(failed))} failed to {what} (see its error line)")
  if error is not None:
    raise error


def sum_over_processes(value: int) -> int:
  """The sum of a host-side count over the processes of the run (itself with one process)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return int(value)
  return int(np.sum(multihost_utils.process_allgather(np.array([value], np.int32))))


def gather_lane_state(state: dict) -> dict:
  """The data position of every lane, from each process's `LaneBatcher.state_dict()` of its own lanes.

  Returns a state dict of the same form covering lanes [0, num_lanes), which
  `LaneBatcher.load_state_dict` accepts for any sub-range: a resumed process
  cuts out its own lanes, however many processes the resumed run has.
  """
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return state
  num_lanes, (lo, hi) = state["num_lanes"], state["lanes"]
  local = np.asarray(state["positions"], np.int64).reshape(hi - lo, 2)
  if local.size and (local.max() >= 2**31 or local.min() < 0):
    raise DistributedError("a lane's data position does not fit in int32; cannot gather it across processes")
  table = np.full((num_lanes, 3), -1, np.int32)  # [owned, k, offset] per lane
  table[lo:hi, 0], table[lo:hi, 1:] = 1, local
  tables = multihost_utils.process_allgather(table)  # [processes, num_lanes, 3]
  positions = []
  for lane in range(num_lanes):
    owners = tables[tables[:, lane, 0] == 1, lane, 1:]
    if len(owners) == 0:
      raise DistributedError(f"no process read lane {lane}; the mesh's lanes are not covered by the processes")
    if np.any(owners != owners[0]):
      raise DistributedError(f"processes that share lane {lane} disagree on its data position {owners.tolist()}")
    positions.append([int(owners[0][0]), int(owners[0][1])])
  return {**state, "lanes": [0, num_lanes], "positions": positions}


def synchronized(batches: Iterable[dict], *, pad_batch: Callable[[], dict]) -> Iterator[dict]:
  """Iterate process-local batches until *every* process has run out.

  Each step of a multi-process run is one program over all devices, so all
  processes must run the same number of steps. A process whose own lanes are
  exhausted first yields `pad_batch()` (loss mask 0) until the last one is
  done. A single process just iterates `batches`.
  """
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    yield from batches
    return
  it, done = iter(batches), False
  while True:
    batch = None if done else next(it, None)
    done = batch is None
    alive = multihost_utils.process_allgather(np.array([not done], np.int32))
    if not np.any(alive):
      return
    yield pad_batch() if batch is None else batch


__all__ = ["initialize", "DistributedError", "parse_coordinator", "process_count", "is_host0", "assert_same",
           "gather_lane_state", "synchronized", "raise_if_any_failed", "sum_over_processes", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID",
           "ENV_TIMEOUT"]
