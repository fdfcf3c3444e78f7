"""The one cost model: parameter counts and FLOPs of a decoder config, used by the bucket
fitter, the memory planner, the trainer's MFU and the benchmarks.

Three FLOP counts, for three questions:
- `row_flops`: what the scoring step executes for one padded row (blocked attention as it
  runs, masked pairs included): the cost the plan minimises.
- `forward_flops`: model FLOPs of forward passes over texts (2·θ per token plus causal
  attention, no padding): the useful work, the same for every method compared.
- `train_flops_per_token`: PaLM's 6·N + 12·L·H·Q·T (forward + backward).
"""

from __future__ import annotations

import numpy as np


def layer_matmul_params(cfg) -> int:
  """Weights of one decoder block's matmuls (q, k, v, o and the gated MLP)."""
  d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return d * hd * (2 * h + 2 * kv) + 3 * d * cfg.intermediate_size


def matmul_params(cfg) -> int:
  """Weights of the decoder blocks' matmuls: what every token goes through."""
  return cfg.num_layers * layer_matmul_params(cfg)


def num_params(cfg) -> int:
  """Parameter count θ implied by the architecture (embeddings counted once if tied)."""
  d = cfg.hidden_size
  head = 0 if cfg.tie_word_embeddings else d * cfg.vocab_size
  # Two norms per block (LLaMA), or the family's own count (Gemma 3: four, and q/k norms).
  norms = getattr(cfg, "layer_norm_params", 2 * d)
  norms += getattr(cfg, "layer_bias_params", 0)  # Qwen2's q/k/v biases
  return matmul_params(cfg) + cfg.num_layers * norms + cfg.vocab_size * d + d + head


def _layer_windows(cfg) -> list[int | None]:
  """Per layer: its sliding attention window, or None for full causal attention."""
  local = getattr(cfg, "local_layers", (False,) * cfg.num_layers)
  return [cfg.sliding_window if is_local else None for is_local in local]


def _causal_pairs(lengths: np.ndarray, window: int | None) -> np.ndarray:
  """(query, key) pairs a causal text of each length attends, keys within `window` back."""
  if window is None:
    return lengths * (lengths + 1) / 2
  w = np.minimum(lengths, window)
  return w * (w + 1) / 2 + (lengths - w) * window


def row_flops(cfg, length: int, prefix: int = 0) -> int:
  """Matmul FLOPs of one row of `length` tokens through the blocks as the attention runs
  them: every weight once per token, and each query block against all keys up to its end,
  the `prefix` cached ones included (masked pairs cost the same as real ones)."""
  block = cfg.attention_block or length
  pairs = sum(
      min(block, length - start) * (prefix + min(start + block, length))
      for start in range(0, length, block)
  )
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs
  return 2 * matmul_params(cfg) * length + attention


def forward_flops(cfg, lengths, theta: int) -> float:
  """Model FLOPs of forward passes over texts of these lengths: 2·θ·L plus the causal QKᵀ
  and PV, L(L+1)/2 pairs (keys within the window on sliding-window layers; padding and
  skipped head rows are not counted)."""
  lengths = np.asarray(lengths, np.float64)
  pairs = sum(_causal_pairs(lengths, w) for w in _layer_windows(cfg))
  attention = 4 * cfg.num_heads * cfg.head_dim * pairs
  return float(np.sum(2.0 * theta * lengths + attention))


def executed_flops(cfg, padded_lengths, head_rows_per_text, prefix_lengths=0) -> float:
  """Matmul FLOPs a method actually runs: `row_flops` per padded row and the head on
  `head_rows_per_text` rows (1: last token only; L: every position)."""
  lengths, prefixes = np.broadcast_arrays(padded_lengths, prefix_lengths)
  body = sum(row_flops(cfg, int(n), int(p)) for n, p in zip(lengths, prefixes))
  return float(body + 2.0 * cfg.hidden_size * cfg.vocab_size * np.sum(head_rows_per_text))


def train_flops_per_token(cfg, seq_len: int) -> float:
  """PaLM appendix B: 6·N + 12·L·H·Q·T, N = matmul params incl. the head (a tied embedding
  counts once, as the head); attention over the full row, remat not counted."""
  head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
  n = num_params(cfg) - head
  return 6.0 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
