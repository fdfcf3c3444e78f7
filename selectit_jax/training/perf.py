"""MFU: model FLOPs (`costs.train_flops_per_token`) over the devices' peak (`devices`, or a
measured matmul on CPU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from selectit_jax.models import costs
from selectit_jax.models.llama import LlamaConfig
from selectit_jax.parallel import devices


def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a square matmul on the default device (a CPU's practical peak)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops_per_device(override: float = 0.0, device=None) -> float:
  """The configured peak, else the table by device kind, else (CPU, unknown) measured."""
  if override:
    return float(override)
  peak = devices.peak_flops((device or jax.devices()[0]).device_kind)
  return peak if peak is not None else measure_matmul_flops()


def mfu(
    tokens_per_second: float,
    cfg: LlamaConfig,
    seq_len: int,
    peak_per_device: float,
    num_devices: int,
) -> float:
  return (
      tokens_per_second
      * costs.train_flops_per_token(cfg, seq_len)
      / (peak_per_device * num_devices)
  )
