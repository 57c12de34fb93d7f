"""Start N JAX processes of one command on this host, as a multi-host run would.

    python -m vim_jax.launch --processes 2 -- python train.py --config configs/digits.py --workdir W
    python -m vim_jax.launch --processes 2 --devices-per-process 2 -- python eval.py --workdir W

Each process gets the coordinator address (a free local port), the process count and its id
in ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, which
``train.py`` and ``eval.py`` read (``vim_jax.parallel.distributed``). Their output is forwarded line
by line with a ``[pI]`` prefix. If one process fails, the others are stopped (SIGTERM, then
SIGKILL after ``--grace`` seconds) and the launcher exits non-zero naming it. SIGTERM, SIGINT
(Ctrl-C) or SIGHUP to the launcher reaches every process as SIGTERM (training saves a
checkpoint and stops); if the launcher dies without cleaning up (SIGKILL), the kernel sends
each process SIGTERM (Linux ``PR_SET_PDEATHSIG``), so none is left running unsupervised.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from vim_jax.parallel.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(stream, prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(prefix + line.decode(errors="replace"))
            sys.stdout.flush()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _env(i: int, n: int, address: str, devices: int) -> dict:
    env = {**os.environ, ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(i)}
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(command: list[str], processes: int, *, devices_per_process: int = 0,
           grace: float = 10.0, port: int = 0) -> int:
    """Runs ``command`` as ``processes`` JAX processes; returns 0 if all of them exit 0,
    else the first failure's code (128 + signal for a killed process)."""
    address = f"127.0.0.1:{port or _free_port()}"
    lock = threading.Lock()
    # Every process is started before any thread: preexec_fn is unsafe once threads run.
    procs = [subprocess.Popen(command, env=_env(i, processes, address, devices_per_process),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=_die_with_parent) for i in range(processes)]
    for i, p in enumerate(procs):
        print(f"[launch] process {i}/{processes}: pid {p.pid}, coordinator {address}", flush=True)
    threads = [threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", lock), daemon=True)
               for i, p in enumerate(procs)]
    for t in threads:
        t.start()

    received = []  # the handler only records: the loop below relays (no locks in a handler)

    def relay(signum, frame):
        received.append(signum)

    old = {s: signal.signal(s, relay) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            while received:
                name = signal.Signals(received.pop()).name
                with lock:
                    print(f"[launch] {name}: SIGTERM to every process", flush=True)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0) and failed is None:
                    failed = i
            if failed is not None:
                break
            time.sleep(0.1)
        else:
            failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
        if failed is not None:
            with lock:
                print(f"[launch] process {failed} (pid {procs[failed].pid}) "
                      f"{_describe(procs[failed].returncode)}: stopping the others", flush=True)
            _stop(procs, grace)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if any(p.poll() is None for p in procs):  # the launcher itself is going down
            _stop(procs, grace)
        for t in threads:
            t.join(timeout=5)
    if failed is None:
        return 0
    code = procs[failed].returncode
    return 128 - code if code < 0 else code


def _killpg(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass


def _stop(procs, grace: float) -> None:
    """SIGTERM to every process group (each process and what it started), SIGKILL to the
    groups of those still alive after ``grace`` seconds and to any leftovers of the rest."""
    for p in procs:
        _killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _killpg(p.pid, signal.SIGKILL)
        p.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vim_jax.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, required=True, help="how many processes to start")
    p.add_argument("--devices-per-process", type=int, default=0,
                   help="CPU devices each process simulates (XLA_FLAGS); 0 leaves it alone")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping processes")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --, e.g. -- python train.py --config ... --workdir ...")
    if args.processes < 1:
        p.error(f"--processes={args.processes} must be >= 1")
    return launch(command, args.processes, devices_per_process=args.devices_per_process,
                  grace=args.grace, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
