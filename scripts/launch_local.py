r"""Runs N processes of a JAX program on this machine as one multi-process job, on CPU devices.

    python scripts/launch_local.py -n 2 -d 4 -- train.py --config configs/cvvae.py:demo --workdir /tmp/run

Each process gets the environment `cvvae_jax.distributed.initialize()` reads (what a pod or cluster
scheduler would set): `JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`,
plus `JAX_PLATFORMS=cpu`, `XLA_FLAGS=--xla_force_host_platform_device_count=K` (K CPU devices per process,
so N * K devices in the global mesh) and `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo` (cross-process
collectives over TCP; gloo is also jax 0.10's default once `jax.distributed` is initialized). The persistent
compilation cache is off in these processes (`JAX_ENABLE_COMPILATION_CACHE=false`: on CPU its keys differ per
process, so only process 0 would hit it and the others would reach the first collective too late for gloo's 30 s
rendezvous) and process 0 compiles each program once for all of them (`JAX_SHARE_BINARY_BETWEEN_HOSTS=true`).

Every output line of process i is printed as `[p<i>] <line>`. The launcher
  * prints `launch: process <i> pid <pid>` for each process (tests use it to signal one process);
  * forwards SIGTERM / SIGINT it receives to every process (a preemption of the whole job);
  * when a process exits non-zero (or is killed), waits `--grace_s` for the others to stop on their own,
    then SIGKILLs them (a JAX job cannot go on without one of its processes: the others would block in
    the next collective until the coordination service's heartbeat timeout);
  * exits 0 when every process did, else with the first failure's code (128 + signal for a killed one).

A program path ending in `.py` runs under this Python; anything else is run as given.
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
from typing import Sequence

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, devices_per_process: int,
                coordinator: str) -> dict[str, str]:
  """The environment of process `process_id`: `base` plus the multi-process and CPU-device variables."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  flags.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join(flags),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "JAX_COORDINATOR_ADDRESS": coordinator,
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      # Process 0 compiles each multi-process program once and hands the binary to the others.
      "JAX_SHARE_BINARY_BETWEEN_HOSTS": "true",
      # No persistent compilation cache: on CPU its keys include each process's topology, so only process 0
      # (the one that writes it) ever hits, the others compile, and the first collective of the cached
      # program outlives gloo's 30 s rendezvous timeout ("Gloo context initialization failed").
      "JAX_ENABLE_COMPILATION_CACHE": "false",
      "CUDA_VISIBLE_DEVICES": "",
      "PYTHONUNBUFFERED": "1",
  })
  return env


def exit_code(returncode: int) -> int:
  """Popen's returncode (negative for a signal) -> a shell exit status (128 + signal)."""
  return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"killed by signal {-returncode}"
  return f"exit status {returncode}"


def _die_with_parent() -> None:
  """In the child before exec (Linux): SIGKILL it when the launcher dies, so no process outlives the job."""
  try:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", errors="replace").rstrip("\n")
    with lock:
      out.write(f"[p{index}] {line}\n")
      out.flush()
  stream.close()


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int, port: int | None = None,
           grace_s: float = 5.0, out=None) -> int:
  """Runs `command` as `num_processes` processes (see the module docstring); returns the job's exit status."""
  if num_processes < 1:
    raise ValueError(f"--num_processes: expected >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"--devices_per_process: expected >= 1, got {devices_per_process}")
  if not command:
    raise ValueError("expected a program to run after `--`, e.g. `-- train.py --config ...`")
  out = sys.stdout if out is None else out
  command = list(command)
  if command[0].endswith(".py"):
    command = [sys.executable, *command]
  coordinator = f"127.0.0.1:{port or free_port()}"
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []

  def signal_all(signum: int) -> None:
    for p in procs:
      if p.poll() is None:
        try:
          p.send_signal(signum)
        except ProcessLookupError:
          pass

  def forward(signum, frame):
    del frame
    with lock:
      out.write(f"launch: received {signal.Signals(signum).name}, forwarding it to every process\n")
      out.flush()
    signal_all(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i in range(num_processes):
      env = process_env(os.environ, process_id=i, num_processes=num_processes,
                        devices_per_process=devices_per_process, coordinator=coordinator)
      p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True,  # a terminal's Ctrl-C reaches it only when forwarded
                           preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
      procs.append(p)
      with lock:
        out.write(f"launch: process {i} pid {p.pid} ({num_processes} x {devices_per_process} CPU devices, "
                  f"coordinator {coordinator})\n")
        out.flush()
      t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
      t.start()
      pumps.append(t)

    failure: tuple[int, int] | None = None  # (process, returncode) of the first failure
    deadline = None
    while True:
      codes = [p.poll() for p in procs]
      if failure is None:
        for i, code in enumerate(codes):
          if code not in (None, 0):
            failure, deadline = (i, code), time.monotonic() + grace_s
            with lock:
              out.write(f"launch: process {i} failed ({describe(code)}); stopping the others in {grace_s:g}s\n")
              out.flush()
            break
      if all(c is not None for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        signal_all(signal.SIGKILL)
        deadline = None
      time.sleep(0.1)
    for t in pumps:
      t.join(timeout=5)
  except BaseException:
    signal_all(signal.SIGKILL)
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)

  with lock:
    for i, p in enumerate(procs):
      out.write(f"launch: process {i} {describe(p.returncode)}\n")
    out.flush()
  if failure is not None:
    return exit_code(failure[1])
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Example: python scripts/launch_local.py -n 2 -d 4 -- train.py "
                                          "--config configs/cvvae.py:demo --workdir /tmp/run")
  parser.add_argument("-n", "--num_processes", type=int, default=2, help="processes (default 2)")
  parser.add_argument("-d", "--devices_per_process", type=int, default=4,
                      help="CPU devices in each process (default 4)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--grace_s", type=float, default=5.0,
                      help="seconds the other processes get to stop after one fails, before SIGKILL")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- program [args...]")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                  port=args.port or None, grace_s=args.grace_s)
  except ValueError as e:
    parser.error(str(e))
    return 2


if __name__ == "__main__":
  sys.exit(main())
