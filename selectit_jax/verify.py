"""Checks every host of a run before it scores, on all processes at once.

    python -m selectit_jax.verify --config=configs/llama2_70b.py:v5p-64 \
        --constraints=launch/constraints.txt --processes=8

Each process checks Python and every package pinned in the constraints file (libtpu on TPU,
the CUDA plugin on GPU, which this venv cannot have), that `--processes` processes joined,
that the devices are of the kind and count the config names (memory.device,
memory.num_devices) and fit its mesh, and that a collective across all of them completes.
It prints one `verify:` line per process; any problem ends every process with an `error:`
line naming the processes that failed (exit 2). launch/tpu_pod.sh and
launch/slurm_gpu.sbatch run it on every host before `score`.
"""

from __future__ import annotations

import importlib.metadata as md
import socket
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.errors import UserError
from selectit_jax.parallel import devices as devices_lib
from selectit_jax.parallel import distributed
from selectit_jax.parallel import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Scoring config file.", lock_config=True)
_CONSTRAINTS = flags.DEFINE_string(
    "constraints", "launch/constraints.txt", "Pinned stack (written by launch/lock.py)."
)
_PROCESSES = flags.DEFINE_integer("processes", 0, "Processes the run must have (0: any).")

REQUIRED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
PLATFORM_PACKAGES = {"tpu": ("libtpu",), "gpu": ("jax-cuda12-plugin", "jax-cuda12-pjrt")}
SHOWN = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint")


def read_constraints(path: str) -> tuple[str | None, dict[str, str]]:
  """(the pinned Python 'X.Y' or None, {package: version}) from a launch/lock.py file."""
  python, pins = None, {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("# python=="):
        python = line.removeprefix("# python==")
      elif line and not line.startswith("#"):
        name, sep, version = line.partition("==")
        if not sep:
          raise UserError(f"{path}: {line!r} is not NAME==VERSION")
        pins[name.strip()] = version.strip()
  return python, pins


def installed(name: str) -> str | None:
  try:
    return md.version(name)
  except md.PackageNotFoundError:
    return None


def stack_problems(python, pins, platform, version=installed, python_version=None) -> list[str]:
  """What differs from the pins: every pinned package that is installed must have its
  version; the core and the platform's packages must be installed."""
  problems = []
  have_python = ".".join(map(str, (python_version or sys.version_info)[:3]))
  if python and not (have_python + ".").startswith(python + "."):
    problems.append(f"python {have_python}, pinned {python}")
  needed = REQUIRED + PLATFORM_PACKAGES.get(platform, ())
  for name, pinned in pins.items():
    have = version(name)
    if have is None:
      if name in needed:
        problems.append(f"{name} is not installed (pinned {pinned})")
    elif have != pinned:
      problems.append(f"{name} {have} installed, pinned {pinned}")
  return problems


def device_problems(config, device, process_count: int, device_count: int, processes: int):
  """Processes, device kind and count against the flag and the config."""
  problems = []
  if processes and process_count != processes:
    problems.append(f"{process_count} processes joined, the run needs {processes}")
  want, found = config.memory.device.lower(), devices_lib.detect(device)
  if want and want != found:
    problems.append(f"{found} devices ({device.device_kind}), the config's memory.device={want}")
  if config.memory.num_devices and config.memory.num_devices != device_count:
    problems.append(
        f"{device_count} devices, the config's memory.num_devices={config.memory.num_devices}"
    )
  try:
    sharding.mesh_shape(config.mesh, device_count)
  except ValueError as e:
    problems.append(str(e))
  return problems


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  distributed.initialize(config)  # before any other JAX call
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  python, pins = read_constraints(_CONSTRAINTS.value)
  local = jax.local_devices()
  platform = local[0].platform
  problems = stack_problems(python, pins, platform)
  problems += device_problems(
      config, local[0], jax.process_count(), jax.device_count(), _PROCESSES.value
  )
  me = f"process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}"
  versions = ", ".join(f"{n} {v}" for n in SHOWN if (v := installed(n)))
  print(
      f"verify: {me}: python {sys.version.split()[0]}, {versions}; {platform} "
      f"{local[0].device_kind}, {len(local)} local / {jax.device_count()} devices",
      flush=True,
  )
  # The collective proves the hosts reach each other, and tells each process which
  # others failed, so all of them stop here, not in the first step of `score`.
  failed = np.asarray(multihost_utils.process_allgather(np.int32(bool(problems)))).reshape(-1)
  if problems:
    raise UserError(f"{me}: " + "; ".join(problems) + f" (pins: {_CONSTRAINTS.value})")
  if failed.any():
    raise UserError(f"{me} passed, but process(es) {np.flatnonzero(failed).tolist()} did not")
  print(f"verify: {me}: ok", flush=True)


if __name__ == "__main__":
  cli.run_main(main)
