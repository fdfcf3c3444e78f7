"""Pod readiness: steps that run on one worker never touch the accelerator, hosts that would
score different inputs are refused, and one config runs on any device count."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a command's main as `python -m` would, then prints which JAX backends exist.
_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
  code = e.code
from jax._src import xla_bridge
print("BACKENDS", sorted(xla_bridge._backends), flush=True)
sys.exit(code)
"""


def test_plan_never_initialises_the_accelerator():
  """On one worker of a multi-host slice, a TPU backend waits for the other hosts: `plan`
  must neither ask for one (JAX_PLATFORMS=tpu would fail here, there is no libtpu) nor
  create any array (no backend at all when the config names the device and the count)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="tpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE, "selectit_jax.plan", "--config=configs/llama2_70b.py:v5p-64"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "-> fits" in out
  assert "BACKENDS []" in out, out[-3000:]
