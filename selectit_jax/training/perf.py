"""Training FLOPs per token and MFU.

FLOPs per trained token (PaLM appendix B, forward + backward = 3 x forward):
    6 * N  +  12 * L * H * Q * T
N = parameters in matmuls (all params except the embedding lookup; a tied embedding
counts once, as the LM head), L layers, H query heads, Q head_dim, T the row length
(attention is counted over the full row, causal masking not halved, as in PaLM).
Rematerialisation's extra forward is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from selectit_jax.models.llama import LlamaConfig

# Dense bf16 peak FLOP/s per device, by substring of jax's device_kind (lower case), first
# match wins: v5p reports "TPU v5", v5e "TPU v5 lite"; H100 is SXM (PCIe: 756e12).
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12), ("a10", 125e12),
    ("v6", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12), ("v3", 123e12), ("v2", 45e12),
)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else
                                      cfg.vocab_size * cfg.hidden_size)
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attention


def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a square matmul on the default device (a CPU's practical peak)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def peak_flops(device_kind: str) -> float | None:
  """Vendor dense bf16 peak of one device of this kind, or None (CPU, unknown)."""
  kind = device_kind.lower()
  return next((flops for key, flops in PEAK_FLOPS if key in kind), None)


def peak_flops_per_device(override: float = 0.0, device=None) -> float:
  """The configured peak, else the table by device kind, else (CPU, unknown) measured."""
  if override:
    return float(override)
  peak = peak_flops((device or jax.devices()[0]).device_kind)
  return peak if peak is not None else measure_matmul_flops()


def mfu(tokens_per_second: float, cfg: LlamaConfig, seq_len: int, peak_per_device: float,
        num_devices: int) -> float:
  return tokens_per_second * flops_per_token(cfg, seq_len) / (peak_per_device * num_devices)
