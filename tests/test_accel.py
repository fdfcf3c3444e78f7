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
