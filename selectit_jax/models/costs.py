"""The one cost model: parameter counts and FLOPs of a decoder config, used by the bucket
fitter, the memory planner, the trainer's MFU and the benchmarks.

Three FLOP counts, for three questions:
- `row_flops`: what the scoring step executes for one padded row (blocked attention as it
  runs, masked pairs included): the cost the plan minimises.
- `forward_flops`: model FLOPs of forward passes over texts (2·θ per token plus causal
  attention, no padding): the useful work, the same for every method compared.
- `train_flops_per_token`: PaLM's 6·N + 12·L·H·Q·T (forward + backward).

And the bytes the memory planner (parallel/memory.py) charges for activations, per device
(`rows` rows of `length` tokens; heads, MLP and vocabulary split over `tensor`), from the
same query blocks the attention runs: `scoring_activation_bytes` (forward, read-out at the
last layer) and `train_activation_bytes` (forward + backward, with and without remat).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from selectit_jax.models.layers import remat_mode


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


def query_blocks(cfg, length: int, prefix: int = 0) -> list[tuple[int, int]]:
  """(query rows, keys) of each block the attention runs over a row of `length` tokens:
  blocks of `attention_block` rows, each against the `prefix` cached keys and its own keys
  up to the block's end (layers.Attention)."""
  block = cfg.attention_block or length
  return [
      (min(block, length - start), prefix + min(start + block, length))
      for start in range(0, length, block)
  ]


def row_flops(cfg, length: int, prefix: int = 0) -> int:
  """Matmul FLOPs of one row of `length` tokens through the blocks as the attention runs
  them: every weight once per token, and each query block against all keys up to its end,
  the `prefix` cached ones included (masked pairs cost the same as real ones)."""
  pairs = sum(n * keys for n, keys in query_blocks(cfg, length, prefix))
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


# ------------------------------------------------------------------ activation bytes


def _itemsize(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def _sliding(cfg) -> bool:
  return any(getattr(cfg, "local_layers", ()))


def _per_device(cfg, tensor: int):
  """Heads, kv heads, MLP width and vocabulary of one `tensor` shard."""
  return (
      cfg.num_heads // tensor,
      max(cfg.num_kv_heads // tensor, 1),
      cfg.intermediate_size // tensor,
      cfg.vocab_size // tensor,
  )


def _shared_inputs(cfg, rows: int, length: int, prefix: int) -> int:
  """What every layer reads: the rotary sin/cos tables (fp32) and the boolean mask over
  [length, prefix + length]; Gemma 3 stacks a global and a sliding-window copy of each and
  selects one per layer (three live)."""
  copies = 3 if _sliding(cfg) else 1
  rope = 2 * rows * length * (cfg.head_dim // 2) * 4
  return copies * (rope + rows * length * (prefix + length))


def _attention_scores(cfg, rows: int, length: int, prefix: int, tensor: int) -> list[int]:
  """fp32 scores of each query block of one layer: [rows, heads, block rows, keys]."""
  h = cfg.num_heads // tensor
  return [rows * h * n * keys * 4 for n, keys in query_blocks(cfg, length, prefix)]


def scoring_activation_bytes(
    cfg,
    rows: int,
    length: int,
    prefix: int = 0,
    segments: int = 1,
    tensor: int = 1,
    fused: bool = False,
) -> dict[str, int]:
  """Peak activation bytes of one rating step on one device, by part.

  `layer`: the scanned layer's peak, the larger of its attention and its MLP. XLA issues
  every query block's QKᵀ before the softmaxes finish (the compiled schedule keeps all
  blocks' fp32 scores live), so the attention holds the scores of all blocks plus a second
  copy of the largest (its exp) — about half the [T, T] square, not the whole of it — with
  k, v and each block's key slice; the MLP its three [rows, T, mlp] intermediates. `carry`: the layer's input and output [rows, T, d] and what
  every layer reads (rotary tables, mask). `head`: fp32 logits (and their exp) at the
  read-out tokens only, `segments` per row; the last layer runs only those rows, so it
  never needs more than the others. `fused`: a flash kernel (splash, Pallas GPU, cuDNN;
  models/attention.py) never materialises scores: q, k, v, the fp32 output and the
  log-sum-exp per query (two of each, own keys and prefix, merged).
  """
  ab = _itemsize(cfg.dtype)
  d, hd = cfg.hidden_size, cfg.head_dim
  h, kv, f, v = _per_device(cfg, tensor)
  t, keys = length, prefix + length
  scores = _attention_scores(cfg, rows, t, prefix, tensor)
  key_slices = sum(rows * kv * k * hd * ab for _, k in query_blocks(cfg, t, prefix))
  # q is read block by block inside the score products, and the block outputs come after
  # the scores are spent: neither is live at the peak; k, v and their slices are.
  attention = sum(scores) + max(scores, default=0) + rows * 2 * kv * keys * hd * ab + key_slices
  if fused:
    attention = rows * ((h * t + 2 * kv * keys) * hd * ab + 2 * h * t * (hd + 1) * 4)
  mlp = rows * t * (d + 3 * f) * ab
  return dict(
      layer=max(attention, mlp),
      carry=2 * rows * t * d * ab + _shared_inputs(cfg, rows, t, prefix),
      head=2 * rows * segments * v * 4,
  )


def _layer_shape(cfg) -> tuple[int, bool]:
  """(norms over d per block, q/k norms): what sets how many [rows, T, ·] buffers a block's
  backward keeps. Families without a `qk_norm` flag (Gemma 3) always norm q and k."""
  norms = cfg.layer_norm_params // cfg.hidden_size
  return norms, bool(getattr(cfg, "qk_norm", True))


def train_activation_bytes(
    cfg,
    rows: int,
    length: int,
    tensor: int = 1,
    remat: bool | None = None,
    fused: bool = False,
    loss_chunk: int | None = None,
) -> dict[str, int]:
  """Peak activation bytes of one micro-batch's forward and backward on one device, by part
  (`training/step.loss_sums` under `jax.value_and_grad`, layers under `nn.scan`).

  `saved`: what the forward keeps for the backward. Without remat, every layer's residuals:
  per query block the softmax's fp32 max and sum (`attention.partial_attend` recomputes the
  scores in its backward; the layer's mask, where sliding windows make it per layer); per
  norm over d three [rows, T, d] buffers (fp32 inside) plus the two residual adds; the MLP's
  gate and up (its gated VJP's residuals) and their product (the down projection's input);
  q (three more with q/k norms), each block's q and fp32 output, k, v and each block's
  key/value slices. With remat `dots` the layer's input, the q, k, v, gate and up
  projections and the attention's fp32 output, max and sum; with `full` (`nn.remat` per
  layer) only each layer's input [rows, T, d], and its backward holds about half of one
  layer's residuals (compiled steps of tiny to 7B-shaped LLaMA layers: 0.81-0.89× of what XLA
  allocates without that term, 0.90-1.07× with it). Without remat in bf16, a CPU compile
  allocates ~14 % more than counted (0.86× on 7B-shaped layers; fp32: 0.91-1.07×): XLA:CPU
  keeps the stack's bf16 residuals upcast to fp32 (the key slices appear as f32[L, ...]
  buffers), while the residuals JAX saves match the count (`print_saved_residuals`, a wide
  tiny layer: 31.2 MiB against 28.6 + 1.5 cast weights). `backward`: one layer's
  backward in flight: without remat the recomputed fp32 probabilities, their gradients and
  the broadcast masks of all blocks plus fp32 MLP and stream gradients; with remat also the
  recomputed scores. `head`: the loss (training/loss.py) over `loss_chunk` positions at a
  time (None: whole rows): a chunk's fp32 logits and their gradient [rows, chunk, vocab],
  the fp32 head gradient [d, vocab] and the hidden states' gradient; live before the
  layers' backward starts, so the peak takes the larger of it and `backward`. `shared`:
  rotary tables and mask. `fused`: a flash kernel keeps no scores; its residuals are q, k,
  v, the output and the log-sum-exp, its backward the fp32 gradients of q, k and v (not
  checked against a compiled step here: the kernels compile on TPU and GPU only).
  """
  mode = remat_mode(cfg.remat if remat is None else remat)
  ab = _itemsize(cfg.dtype)
  d, hd, t = cfg.hidden_size, cfg.head_dim, length
  h, kv, f, v = _per_device(cfg, tensor)
  norms, qk_norm = _layer_shape(cfg)
  blocks = query_blocks(cfg, t)
  pairs = rows * h * sum(n * keys for n, keys in blocks)
  key_slices = rows * kv * sum(keys for _, keys in blocks) * hd
  fp32_stream = 3 * norms * 4 if ab == 4 else (3 * norms - 2) * 4  # two norm outputs in ab
  layer = (
      # attention.partial_attend keeps each query's softmax max and sum, not the scores
      pairs * _sliding(cfg)
      + rows * h * t * 8
      + rows * t * d * (fp32_stream + 2 * ab)
      + rows * t * f * 3 * ab
      + rows * h * t * hd * ((1 + 3 * qk_norm) * ab + 2 * 4 + 2 * ab)
      + (rows * kv * t * hd * 3 * qk_norm + 2 * key_slices) * ab
  )
  if fused:  # the scores' terms become the kernel's residuals and gradients
    kernel = rows * h * t * (hd * ab + 4) + 2 * rows * kv * t * hd * ab
    layer += kernel - pairs * _sliding(cfg) - rows * h * t * 8 - 2 * key_slices * ab
    pairs = 0
    kernel_grads = rows * (h + 2 * kv) * t * hd * 4
  else:
    kernel_grads = 0
  kept = layer  # a layer's residuals for the backward: without remat all of them
  if mode == "full":
    kept = rows * t * d * ab  # only the layer's input
  elif mode == "dots":  # layers.REMAT_POLICIES: the weight matmuls' outputs that the backward
    # reads (q, k, v, gate, up) and the jnp attention's output, max and sum; norms, rotary and
    # the gated activation are recomputed (a fused kernel's forward too: it is no matmul)
    softmax = 0 if fused else rows * h * t * (hd + 2) * 4
    kept = rows * t * (d + (h + 2 * kv) * hd + 2 * f) * ab + softmax
  saved = cfg.num_layers * kept
  if mode == "none":
    backward = pairs * (2 * 4 + 1) + rows * t * (f + 2 * d) * 4 + kernel_grads
  else:
    backward = pairs * (2 * 4 + 1) + rows * t * (4 * d + 2 * f) * 4 + kernel_grads
  if mode == "full":  # the layer's forward, recomputed, is partly live during its backward
    backward += layer // 2
  return dict(
      saved=saved,
      backward=backward,
      head=2 * rows * (loss_chunk or t) * v * 4 + d * v * 4 + rows * t * d * ab,
      shared=_shared_inputs(cfg, rows, t, 0),
  )
