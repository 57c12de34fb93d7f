"""Joining a multi-process (multi-host) JAX run: the coordinator, process count and id.

Three ways to say where a process belongs, in order of precedence:
- flags: ``--coordinator_address HOST:PORT --num_processes N --process_id I``;
- the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (what ``python -m vim_jax.launch`` sets);
- ``--distributed`` alone: ``jax.distributed.initialize()`` detects SLURM, Open MPI,
  Kubernetes (JobSet) or a cloud TPU slice.
"""

from __future__ import annotations

import os
from typing import Optional

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedError(RuntimeError):
    """This process cannot join the run; the message says which setting is wrong."""


def _int_env(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _wait_for_coordinator(host: str, port: int, timeout_s: float, who: str) -> None:
    """Polls the coordinator's port: jax aborts the whole process (a C++ check failure, not
    an exception) when it cannot register with the coordinator in time."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"{who} could not join the coordinator at {host}:{port} within {timeout_s} s "
                    f"({e.strerror or e}); is process 0 running, and is {host}:{port} reachable "
                    "from this host?") from None
            time.sleep(0.5)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False,
               timeout_s: int = 120) -> bool:
    """Joins the run the arguments (else the environment) describe; with none of them,
    joins an auto-detected cluster if ``auto``, or stays a single process. Returns whether
    this is a multi-process run. Fails within ``timeout_s`` when the coordinator cannot be
    reached, instead of waiting forever."""
    import jax

    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    n = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    i = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    given = {"coordinator address": address, "process count": n, "process id": i}
    if not any(v is not None for v in given.values()):
        if auto:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(initialization_timeout=timeout_s)
        return jax.process_count() > 1
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(
            f"a multi-process run needs the coordinator address, process count and process id; "
            f"missing: {', '.join(missing)} (flags --coordinator_address, --num_processes, "
            f"--process_id or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if n < 1:
        raise DistributedError(f"process count {n} must be >= 1")
    if not 0 <= i < n:
        raise DistributedError(f"process id {i} is outside 0..{n - 1} (process count {n})")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} must be HOST:PORT")
    if i != 0:
        _wait_for_coordinator(host, int(port), timeout_s, f"process {i} of {n}")
    # CPU collectives across processes (the CPU devices of a multi-process run) need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # jax raises XlaRuntimeError / RuntimeError with a long gRPC story
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if i == 0:
            raise DistributedError(
                f"process 0 (the coordinator, at {address}) did not hear from all {n} processes "
                f"within {timeout_s} s ({first}); are the others running with "
                f"--coordinator_address {address}?") from e
        raise DistributedError(
            f"process {i} of {n} could not join the coordinator at {address} within "
            f"{timeout_s} s ({first}); is process 0 running, and is {address} reachable from "
            f"this host?") from e
    return n > 1


def define_flags() -> None:
    """The command-line flags of train.py and eval.py for joining a multi-process run."""
    from absl import flags

    flags.DEFINE_bool("distributed", False, "Join the multi-process run jax.distributed.initialize() "
                      "detects (SLURM, Open MPI, Kubernetes, cloud TPU).")
    flags.DEFINE_string("coordinator_address", None, f"HOST:PORT of process 0 (else ${ENV_COORDINATOR}).")
    flags.DEFINE_integer("num_processes", None, f"Processes in the run (else ${ENV_NUM_PROCESSES}).")
    flags.DEFINE_integer("process_id", None, f"This process, 0..N-1 (else ${ENV_PROCESS_ID}).")
    flags.DEFINE_integer("init_timeout", 120, "Seconds to wait for every process to join.")


def initialize_from_flags(FLAGS) -> bool:
    """``initialize`` with the flags ``define_flags`` made; quiets the log of every process
    but 0 to warnings and errors (process 0 speaks for the run)."""
    import logging

    import jax

    multi = initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                       auto=FLAGS.distributed, timeout_s=FLAGS.init_timeout)
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return multi
