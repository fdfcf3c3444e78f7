"""Shared pieces of the benchmarks: FLOP counting, roofline, machine description.

Peak FLOP/s per accelerator (for MFU) are in selectit_jax/training/perf.py.

FLOPs are *model* FLOPs, counted the same way for every method so that GFLOP/s, % of
roofline and MFU compare like for like (and are proportional to tokens/s):

  per text of L tokens:  2·θ·L  +  attention
  attention           =  num_layers · 4 · num_heads · head_dim · L(L+1)/2

θ is the parameter count (tied embeddings once), 2·θ per token is the forward of every
weight matrix once (the head included, as a next-token model does); the attention term is the
causal QKᵀ and PV (the masked upper triangle is not useful work). Padding and the head rows a
method skips or recomputes are *not* counted: a method gets no credit for wasted work and no
penalty for work it avoids. `executed_flops` gives the work each method actually does.
"""
from __future__ import annotations

import os
import platform
import resource
import time

import numpy as np

def model_flops(lengths, num_params: int, cfg) -> float:
  """Model FLOPs of forward passes over texts of these lengths (see the module docstring)."""
  lengths = np.asarray(lengths, np.float64)
  attn = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * lengths * (lengths + 1) / 2
  return float(np.sum(2.0 * num_params * lengths + attn))


def executed_flops(padded_lengths, cfg, head_rows_per_text, prefix_lengths=0) -> float:
  """Matmul FLOPs a method actually runs: `cfg.row_flops` per (padded) row (every block
  weight at every position; attention in `cfg.attention_block` query blocks, 0 = the full L²
  square, plus each query against its row's `prefix_lengths` cached keys) and the head on
  `head_rows_per_text` rows (1: last token only; L: every position). Our last layer runs at
  the read-out tokens only but is counted in full (≤ 1/num_layers of the blocks' work)."""
  lengths, prefixes = np.broadcast_arrays(padded_lengths, prefix_lengths)
  body = sum(cfg.row_flops(int(n), int(p)) for n, p in zip(lengths, prefixes))
  return float(body + 2.0 * cfg.hidden_size * cfg.vocab_size * np.sum(head_rows_per_text))


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
    out[n] = 2 * n ** 3 / min(times) / 1e9  # best: contention only slows a run
  return {"gflops": max(out.values()), "by_size": out,
          "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count()}


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
  return (f"{cpu} ({flags}), {os.cpu_count()} cores visible{mem}; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, Python {platform.python_version()}")
