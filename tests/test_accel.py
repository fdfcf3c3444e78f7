"""Accelerator defaults and the accelerator benchmark, on CPU: model.dtype 'auto' per
platform, and bench/bench_accel.py end to end at a tiny shape."""

import types

import jax
import pytest

from selectit_jax.parallel import devices
from selectit_jax.parallel import memory


@pytest.mark.parametrize(
    "platform, want", [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")]
)
def test_auto_dtype_resolves_per_platform(monkeypatch, platform, want):
  from configs import common

  config = common.score_config()
  assert (config.model.dtype, config.model.param_dtype) == ("auto", "auto")
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(platform=platform)])
  got = devices.resolve_dtypes(config)  # the platform of jax.devices()[0]
  assert (got.model.dtype, got.model.param_dtype) == (want, want)
  assert config.model.dtype == "auto"  # a resolved copy; the caller's config is kept
  config.model.dtype = config.model.param_dtype = "float32"  # explicit wins everywhere
  assert devices.resolve_dtypes(config).model.dtype == "float32"


def test_plan_resolves_auto_for_the_configured_device():
  """`plan` on this CPU for a TPU or GPU slice sizes bf16 weights; for this machine fp32."""
  from configs import llama2_7b

  for preset, want in (("v5e-8", "bfloat16"), ("h100x8", "bfloat16"), ("cpu", "float32")):
    config = llama2_7b.get_config(preset)
    config.model.dtype = config.model.param_dtype = "auto"
    cfg = memory.arch(config)
    assert (cfg.dtype, cfg.param_dtype) == (want, want), preset


@pytest.mark.slow  # a subprocess (absl flags of its own)
def test_bench_accel_runs_on_cpu_at_a_tiny_shape():
  """The accelerator benchmark end to end on this CPU: our engine, both torch rows and the
  training step, each with a throughput, and the table a GPU run prints."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
      sys.executable,
      os.path.join(root, "bench", "bench_accel.py"),
      "--shapes=tiny",
      "--num_texts=10",
      "--seconds=0.2",
      "--max_tokens=128",
      "--max_shapes=1",
      "--nosubprocess",
  ]
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=True)
  rows = [l for l in out.stdout.splitlines() if l.startswith("| tiny |")]
  methods = [r.split(" | ")[1].split(" (")[0] for r in rows]
  assert methods == ["ours", "torch released", "torch careful", "ours train step"], out.stdout
  for row in rows:
    tokens_s, mfu = row.split(" | ")[2:4]
    assert float(tokens_s) > 0 and mfu == "-"  # no peak FLOP/s for a CPU in the device table
  assert "ours (attention xla) = " in out.stdout and "× torch careful" in out.stdout


@pytest.mark.slow  # subprocesses
def test_bench_accel_reruns_a_failing_kernel_with_the_jnp_attention():
  """A GPU run is borrowed once: a child whose attention kernel fails is run again with xla,
  and the row says why (here cuDNN, which this CPU refuses)."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "bench", "bench_accel.py"), "--shapes=tiny"]
  cmd += ["--num_texts=10", "--seconds=0.2", "--max_tokens=128", "--max_shapes=1"]
  cmd += ["--skip_torch", "--skip_train", "--attention=cudnn"]
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
  rows = [l for l in out.stdout.splitlines() if l.startswith("| tiny |")]
  assert len(rows) == 1 and "attention xla" in rows[0], out.stdout
  assert float(rows[0].split(" | ")[2]) > 0
  assert (
      "--attention=cudnn failed (exit 2: error: " in rows[0] and "runs on gpu, not cpu" in rows[0]
  )
