"""Shared pieces of the benchmarks: roofline, peak RSS, machine description.

FLOPs come from the one cost model, selectit_jax/models/costs.py: `forward_flops` (model
FLOPs, the same useful work for every method, so GFLOP/s, % of roofline and MFU compare like
for like; a method gets no credit for padding and no penalty for work it avoids) and
`executed_flops` (the work each method actually runs). Peaks: selectit_jax/parallel/devices.py.
"""

from __future__ import annotations

import os
import platform
import resource
import time


def peak_rss_mib() -> float:
  """Peak resident set size of this process since its exec (VmHWM; ru_maxrss would carry the
  forking parent's peak across fork+exec)."""
  try:
    with open("/proc/self/status") as f:
      return int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_roofline(sizes=(2048, 3072), repeats: int = 10) -> dict:
  """Best GFLOP/s of a jit'd fp32 n×n matmul over `sizes` and `repeats`."""
  import jax
  import jax.numpy as jnp

  out = {}
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    out[n] = 2 * n**3 / min(times) / 1e9  # best: contention only slows a run
  return {
      "gflops": max(out.values()),
      "by_size": out,
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
  }


def machine_description() -> str:
  """CPU model, cores, memory, and the library versions that matter for the numbers."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      fl = next((l for l in f if l.startswith("flags")), "").split()
    flags = ", ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in fl)
  except OSError:
    pass
  mem = ""
  try:
    with open("/proc/meminfo") as f:
      kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
    mem = f", {kib / 2**20:.0f} GiB RAM"
  except (OSError, StopIteration):
    pass
  import jax
  import torch
  import transformers

  return (
      f"{cpu} ({flags}), {os.cpu_count()} cores visible{mem}; "
      f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, Python {platform.python_version()}"
  )
