"""Attention backends behind `layers.Attention`, chosen by the config's `attention` field:

- `xla`: plain jnp in query blocks against a dense mask (`attend`); CPU's path.
- `splash`: Pallas splash attention (TPU), the MQA kernel vmapped over kv heads (GQA).
- `pallas_gpu`: Pallas Triton flash attention (GPU), kv heads repeated to the query heads.
- `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- `auto`: splash on TPU, pallas_gpu on GPU, xla elsewhere.

The kernels take a row's own keys with a causal segment mask (packed texts). The shared
rating-prompt prefix, visible to every packed text of a row, is no segment mask: the prefix
keys (only their valid mask) and the own keys are attended separately, each by a plain
kernel, and the two partial results merged exactly by their log-sum-exp (`merge`). On CPU
the Pallas kernels run in interpret mode (tests); cuDNN runs on a GPU only.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from selectit_jax.errors import UserError

# Finite, so fully masked rows (padding) give a uniform softmax instead of NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)
# The jnp attention's backward residuals besides q, k, v (its output and the softmax's max and
# sum: [t, head_dim] and [t], small), named so a remat policy can keep them (layers.py).
SOFTMAX_RESIDUALS = "attention_softmax"

BACKENDS = ("auto", "xla", "splash", "pallas_gpu", "cudnn")
_AUTO = {"tpu": "splash", "gpu": "pallas_gpu"}
# Where each kernel runs; "cpu" = Pallas interpret mode (slow; for tests).
_PLATFORMS = {"splash": ("tpu", "cpu"), "pallas_gpu": ("gpu", "cpu"), "cudnn": ("gpu",)}


class Segments(NamedTuple):
  """The mask as the kernels take it, in place of a dense one: segment ids [b, t] (1.. per
  packed text, 0 = padding), positions [b, t] (after the prefix: sliding windows), the
  prefix's valid keys [b, p] (None: no prefix) and, for Gemma, whether this scanned layer is
  a sliding-window one (a traced bool; None: no window)."""

  segment_ids: jax.Array
  positions: jax.Array
  prefix_valid: jax.Array | None = None
  local: jax.Array | None = None


def check_backend(name: str) -> str:
  if name not in BACKENDS:
    raise UserError(f"engine.attention={name!r} is not one of {', '.join(BACKENDS)}")
  return name


def resolve(name: str) -> str:
  """The backend `name` means on this platform (`auto` chosen by it); a kernel that cannot
  run here is refused. `xla` needs no platform: asking jax for one starts a backend, which
  `plan` (abstract shapes, one host of a pod) must not."""
  if check_backend(name) == "xla":
    return name
  platform = jax.default_backend()
  if name == "auto":
    return _AUTO.get(platform, "xla")
  if platform not in _PLATFORMS[name]:
    raise UserError(
        f"engine.attention={name} runs on {' or '.join(_PLATFORMS[name])}, not {platform}; "
        "use auto or xla"
    )
  return name


# ------------------------------------------------------------------------- dense masks


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """Causal mask within equal, non-zero segment ids: [b, 1, 1, t, s] bool.

  Right-padded scoring batches use segment 1 for tokens and 0 for padding;
  packed training batches use one id per packed sample.
  """
  t = segment_ids_bt.shape[1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  real = (segment_ids_bt != 0)[:, None, :]
  return (causal[None] & same & real)[:, None, None]


def sliding_window(mask, q_positions_bt, k_positions_bs, window: int):
  """`mask` [b, 1, 1, t, s] further limited to keys less than `window` positions back
  (HF: kv_idx > q_idx - window). Positions, not indices: cached prefix keys and packed
  segments count by where they sit in their own text."""
  near = q_positions_bt[:, :, None] - k_positions_bs[:, None, :] < window
  return mask & near[:, None, None]


def prefix_positions(positions_bt, valid_bp):
  """Key positions [b, p + t]: the prefix's 0..p-1, then the row's own."""
  p = valid_bp.shape[-1]
  own = jnp.broadcast_to(jnp.arange(p, dtype=positions_bt.dtype), valid_bp.shape)
  return jnp.concatenate([own, positions_bt], axis=-1)


def dense_mask(m: Segments, window: int | None) -> jax.Array:
  """The dense mask [b, 1, 1, t, p + t] that `m` stands for (the xla path's)."""
  mask = attention_mask(m.segment_ids)
  k_positions = m.positions
  if m.prefix_valid is not None:
    seen = jnp.broadcast_to(
        m.prefix_valid[:, None, None, None, :], mask.shape[:-1] + m.prefix_valid.shape[-1:]
    )
    mask = jnp.concatenate([seen, mask], axis=-1)
    k_positions = prefix_positions(m.positions, m.prefix_valid)
  if window is not None and m.local is not None:
    mask = jnp.where(m.local, sliding_window(mask, m.positions, k_positions, window), mask)
  return mask


def window_binds(window: int | None, m: Segments, num_keys: int) -> bool:
  """Whether a sliding window can hide a key here: only when keys reach `window` positions
  back (static shapes; prefix and own positions together are < p + t)."""
  return window is not None and m.local is not None and num_keys > window


def kernel_for(name: str, m: Segments, window: int | None, num_keys: int) -> str | None:
  """The kernel backend for config value `name` on rows of `num_keys` keys (prefix + own),
  or None: the dense jnp path. A sliding window that can hide keys is something the kernels
  here do not apply: `auto` then takes the jnp path, a named kernel is refused."""
  backend = resolve(name)
  if backend == "xla":
    return None
  if window_binds(window, m, num_keys):
    if name == "auto":
      return None
    raise UserError(
        f"engine.attention={name} does not apply Gemma's sliding window ({window} positions), "
        f"which hides keys in rows of {num_keys} (prefix + text); use auto or xla, or "
        f"engine.max_tokens ≤ {window} minus the prompt"
    )
  return backend


# ------------------------------------------------------------------- the jnp (xla) path


def attend(q_bkgth, k_bksh, v_bksh, mask, scale):
  """Softmax attention in fp32 with normalisation after PV: the [t, s] scores are read
  three times (max, exp+sum, PV), not five, and the division touches [t, head_dim] only."""
  return partial_attend(q_bkgth, k_bksh, v_bksh, mask, scale)[0]


def _logits(q_bkgth, k_bksh, mask, scale):
  logits = jnp.einsum("bkgth,bksh->bkgts", q_bkgth, k_bksh, preferred_element_type=jnp.float32)
  return jnp.where(mask, logits * scale, MASK_VALUE)


def _partial_attend_fwd(q_bkgth, k_bksh, v_bksh, mask, scale):
  logits = _logits(q_bkgth, k_bksh, mask, scale)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  unnorm = jnp.exp(logits - peak)
  out = jnp.einsum(
      "bkgts,bksh->bkgth", unnorm.astype(v_bksh.dtype), v_bksh, preferred_element_type=jnp.float32
  )
  total = jnp.sum(unnorm, axis=-1, keepdims=True)
  out, peak, total = (checkpoint_name(a, SOFTMAX_RESIDUALS) for a in (out / total, peak, total))
  return (out, (peak + jnp.log(total))[..., 0]), (q_bkgth, k_bksh, v_bksh, mask, out, peak, total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def partial_attend(q_bkgth, k_bksh, v_bksh, mask, scale):
  """`attend` and the log-sum-exp of the scaled, masked logits [b, kv, g, t] (fully
  masked rows: ≈ MASK_VALUE, so `merge` gives them no weight).

  Its backward is FlashAttention's: it keeps q, k, v, the output and the softmax's max and
  sum, and recomputes the probabilities from them, so no [t, s] array a layer is stored for
  the backward pass (autodiff stored three)."""
  return _partial_attend_fwd(q_bkgth, k_bksh, v_bksh, mask, scale)[0]


def _partial_attend_bwd(scale, res, cotangents):
  q, k, v, mask, out, peak, total = res
  d_out, d_lse = cotangents
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  probs = jnp.exp(_logits(q, k, mask, scale) - peak) / total
  # d logits = p ⊙ (dp − rowsum(dO ⊙ O) + d_lse); masked entries have p = 0 (the where).
  d_probs = f32("bkgth,bksh->bkgts", d_out.astype(v.dtype), v)
  row = jnp.sum(d_out * out, axis=-1, keepdims=True) - d_lse[..., None]
  d_logits = jnp.where(mask, probs * (d_probs - row) * scale, 0.0)
  # The small operand first, so XLA:CPU transposes it, not the [t, s] one.
  dv = f32("bkgth,bkgts->bksh", d_out.astype(v.dtype), probs.astype(v.dtype))
  dk = f32("bkgth,bkgts->bksh", q, d_logits.astype(q.dtype))
  dq = f32("bkgts,bksh->bkgth", d_logits.astype(k.dtype), k)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


partial_attend.defvjp(_partial_attend_fwd, _partial_attend_bwd)


def merge(out_a, lse_a, out_b, lse_b):
  """Softmax attention over the union of two disjoint key sets from each set's own
  (output, log-sum-exp): exact, weights exp(lse_i - lse)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  weight = lambda x: jnp.exp(x - lse)[..., None]
  return out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b), lse


def _xla_own(q, k, v, segment_ids, scale, interpret, residuals):
  del interpret
  out, lse = partial_attend(q, k, v, attention_mask(segment_ids), scale)
  return (out, lse) if residuals else out


def _xla_prefix(q, k, v, valid, scale, interpret):
  del interpret
  return partial_attend(q, k, v, valid[:, None, None, None, :], scale)


# ------------------------------------------------------------ Pallas Triton (pallas_gpu)


def _pad_to(x, length: int, axis: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _gpu_length(n: int) -> int:
  """Triton's block lengths are powers of two (≥ 16); past 128 the length is cut in 128s."""
  return max(16, 1 << (n - 1).bit_length()) if n <= 128 else -(-n // 128) * 128


def _gpu_blocks():
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  return gpu_attention.BlockSizes(
      block_q=128, block_k=128, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32
  )


def _gpu_call(q, k, v, segment_ids, scale, causal, interpret, residuals):
  """q [b, kv, g, t, hd], k and v [b, kv, s, hd] (t, s already Triton lengths) -> out
  [b, kv, g, t, hd] and, with `residuals`, lse [b, kv, g, t] (the kernel's is base 2)."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  b, kv, g, t, hd = q.shape
  heads_major = lambda x: x.reshape(b, kv * g, -1, x.shape[-1]).transpose(0, 2, 1, 3)
  result = gpu_attention.mha(
      heads_major(q),
      *(heads_major(jnp.repeat(x[:, :, None], g, axis=2)) for x in (k, v)),
      segment_ids,
      sm_scale=scale,
      causal=causal,
      block_sizes=_gpu_blocks(),
      interpret=interpret,
      return_residuals=residuals,
  )
  out, lse = result if residuals else (result, None)
  out = out.transpose(0, 2, 1, 3).reshape(b, kv, g, t, -1)
  if lse is None:
    return out
  return out, lse.reshape(b, kv, g, t) * math.log(2.0)


def _gpu_own(q, k, v, segment_ids, scale, interpret, residuals):
  t = q.shape[3]
  n = _gpu_length(t)
  q, k, v = (_pad_to(x, n, axis=-2) for x in (q, k, v))
  result = _gpu_call(q, k, v, _pad_to(segment_ids, n, 1), scale, True, interpret, residuals)
  if not residuals:
    return result[:, :, :, :t]
  return result[0][:, :, :, :t], result[1][..., :t]


def _gpu_prefix(q, k, v, valid, scale, interpret):
  """The Triton kernel masks by segment ids shared by queries and keys (same length) only,
  so invalid prefix keys are hidden by a bias in one extra head dimension: q·[k, bias] with
  q's extra component 1."""
  t, hd = q.shape[3], q.shape[4]
  n, m = _gpu_length(t), _gpu_length(k.shape[2])
  # Scaled logits of -1e5: no weight next to any real key, and the lse of a row with no
  # valid key gets none in the merge. (Near the dtype's max the kernel's interpret mode
  # gives inf/NaN; fp16 is capped at half its max.)
  hide = jnp.asarray(max(-1e5 / scale, -0.5 * float(jnp.finfo(k.dtype).max)), k.dtype)
  bias = jnp.where(_pad_to(valid, m, 1, False), jnp.zeros((), k.dtype), hide)
  q = jnp.concatenate([q, jnp.ones(q.shape[:-1] + (1,), q.dtype)], axis=-1)
  k = jnp.concatenate(
      [_pad_to(k, m, -2), jnp.broadcast_to(bias[:, None, :, None], k.shape[:2] + (m, 1))], -1
  )
  v = jnp.concatenate([_pad_to(v, m, -2), jnp.zeros(k.shape, v.dtype)[..., :1]], axis=-1)
  out, lse = _gpu_call(_pad_to(q, n, -2), k, v, None, scale, False, interpret, True)
  return out[:, :, :, :t, :hd], lse[..., :t]


# -------------------------------------------------------------------- splash (TPU)


def _splash_block(n: int) -> int:
  return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_call(mask_2d, q, k, v, q_segments, kv_segments, scale, interpret, residuals):
  """The MQA splash kernel per (row, kv head): q [b, kv, g, t, hd] with t, s multiples of
  128. Returns out [b, kv, g, t, hd] and, with `residuals`, lse [b, kv, g, t]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  g, t, s = q.shape[2], q.shape[3], k.shape[2]
  bq, bkv = _splash_block(t), _splash_block(s)
  blocks = sk.BlockSizes(
      block_q=bq,
      block_kv=bkv,
      block_kv_compute=bkv,
      block_q_dkv=bq,
      block_kv_dkv=bkv,
      block_kv_dkv_compute=bkv,
      block_q_dq=bq,
      block_kv_dq=bkv,
  )
  kernel = sk.make_splash_mqa_single_device(
      sm.MultiHeadMask([mask_2d] * g),
      block_sizes=blocks,
      save_residuals=residuals,
      interpret=interpret,
  )
  per_head = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sk.SegmentIds(qs, ks))
  per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None, None))
  # Splash has no score scale: the queries carry it.
  result = jax.vmap(per_row)(q * jnp.asarray(scale, q.dtype), k, v, q_segments, kv_segments)
  return (result[0], result[1][0]) if residuals else result


def _splash_own(q, k, v, segment_ids, scale, interpret, residuals):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  t = q.shape[3]
  n = -(-t // 128) * 128
  q, k, v = (_pad_to(x, n, axis=-2) for x in (q, k, v))
  segment_ids = _pad_to(segment_ids, n, 1)
  result = _splash_call(
      sm.CausalMask((n, n)), q, k, v, segment_ids, segment_ids, scale, interpret, residuals
  )
  if not residuals:
    return result[:, :, :, :t]
  return result[0][:, :, :, :t], result[1][..., :t]


def _splash_prefix(q, k, v, valid, scale, interpret):
  """No mask but the valid keys: kv segment ids 1 (valid) or 0 against queries' 1."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  t = q.shape[3]
  n, m = -(-t // 128) * 128, -(-k.shape[2] // 128) * 128
  q = _pad_to(q, n, -2)
  k, v = (_pad_to(x, m, -2) for x in (k, v))
  kv_segments = _pad_to(valid, m, 1, False).astype(jnp.int32)
  q_segments = jnp.ones((q.shape[0], n), jnp.int32)
  out, lse = _splash_call(
      sm.FullMask((n, m)), q, k, v, q_segments, kv_segments, scale, interpret, True
  )
  return out[:, :, :, :t], lse[..., :t]


# ------------------------------------------------------------------- cuDNN (and its xla twin)


def _bthd(q):
  b, kv, g, t, hd = q.shape
  return q.reshape(b, kv * g, t, hd).transpose(0, 2, 1, 3)


def _from_bthd(out, kv):
  b, t, h, hd = out.shape
  return out.transpose(0, 2, 1, 3).reshape(b, kv, h // kv, t, hd)


def _from_btn(lse, kv):
  b, t, h = lse.shape
  return lse.transpose(0, 2, 1).reshape(b, kv, h // kv, t).astype(jnp.float32)


def _dpa_own(q, k, v, segment_ids, scale, implementation, residuals):
  """`jax.nn.dot_product_attention`: causal plus the segments as a [b, 1, t, t] mask.
  GQA is native (query head n uses kv head n // g)."""
  kv = k.shape[1]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  result = jax.nn.dot_product_attention(
      _bthd(q),
      k.transpose(0, 2, 1, 3),
      v.transpose(0, 2, 1, 3),
      mask=same,
      scale=scale,
      is_causal=True,
      implementation=implementation,
      return_residual=residuals,
  )
  if not residuals:
    return _from_bthd(result, kv)
  return _from_bthd(result[0], kv), _from_btn(result[1], kv)


def _dpa_prefix(q, k, v, valid, scale, implementation):
  """The valid prefix keys are a leading run: key lengths, no mask array. A row with no
  valid key gets lse MASK_VALUE (no weight in the merge) whatever the kernel returns."""
  kv = k.shape[1]
  lengths = valid.sum(-1, dtype=jnp.int32)
  out, lse = jax.nn.dot_product_attention(
      _bthd(q),
      k.transpose(0, 2, 1, 3),
      v.transpose(0, 2, 1, 3),
      scale=scale,
      key_value_seq_lengths=lengths,
      implementation=implementation,
      return_residual=True,
  )
  some = (lengths > 0)[:, None, None, None]
  out = jnp.where(some[..., None], _from_bthd(out, kv), 0.0)
  return out, jnp.where(some, _from_btn(lse, kv), MASK_VALUE)


def _cudnn_checked(fn):
  @functools.wraps(fn)
  def run(q, *args):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise UserError(
          f"engine.attention=cudnn needs model.dtype bfloat16 or float16, not {q.dtype} "
          "(cuDNN flash attention has no fp32 kernel); use pallas_gpu or xla"
      )
    try:
      return fn(q, *args)
    except NotImplementedError as e:  # jax's check of what this GPU's cuDNN runs (head dim…)
      raise UserError(f"engine.attention=cudnn: {str(e).rstrip('.')}; use pallas_gpu or xla") from e

  return run


# (own half: q, k, v, segment ids, scale, interpret, residuals; prefix half: q, k, v, valid,
# scale, interpret) per backend; "dot_product_xla" is cuDNN's call with implementation="xla",
# so the cuDNN wiring (masks, layouts, lse) is testable on CPU.
_HALVES = {
    "xla": (_xla_own, _xla_prefix),
    "pallas_gpu": (_gpu_own, _gpu_prefix),
    "splash": (_splash_own, _splash_prefix),
    "cudnn": (
        _cudnn_checked(lambda q, k, v, s, scale, _, r: _dpa_own(q, k, v, s, scale, "cudnn", r)),
        _cudnn_checked(
            lambda q, k, v, valid, scale, _: _dpa_prefix(q, k, v, valid, scale, "cudnn")
        ),
    ),
    "dot_product_xla": (
        lambda q, k, v, s, scale, _, r: _dpa_own(q, k, v, s, scale, "xla", r),
        lambda q, k, v, valid, scale, _: _dpa_prefix(q, k, v, valid, scale, "xla"),
    ),
}


def split_attention(backend, q, k, v, prefix_k, prefix_v, segment_ids, valid, scale, interpret):
  """Prefix keys and own keys attended separately by `backend`'s kernels and merged by
  log-sum-exp: out [b, kv, g, t, hd] fp32. With the jnp halves (`xla`) this is differentiable
  as it stands; the library kernels return no gradient for their lse, so their merged path
  takes its backward from the jnp halves (`_merged_kernels`)."""
  if backend == "xla":
    return _merged(backend, scale, interpret, q, k, v, prefix_k, prefix_v, segment_ids, valid)
  return _merged_kernels(backend, scale, interpret, q, k, v, prefix_k, prefix_v, segment_ids, valid)


def _merged(backend, scale, interpret, q, k, v, prefix_k, prefix_v, segment_ids, valid):
  own, prefix = _HALVES[backend]
  out_p, lse_p = prefix(q, prefix_k, prefix_v, valid, scale, interpret)
  out_o, lse_o = own(q, k, v, segment_ids, scale, interpret, True)
  return merge(out_p, lse_p, out_o, lse_o)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _merged_kernels(backend, scale, interpret, q, k, v, prefix_k, prefix_v, segment_ids, valid):
  return _merged(backend, scale, interpret, q, k, v, prefix_k, prefix_v, segment_ids, valid)


def _merged_kernels_fwd(backend, scale, interpret, *args):
  return _merged(backend, scale, interpret, *args), args


def _merged_kernels_bwd(backend, scale, interpret, args, cotangent):
  del backend
  *floats, segment_ids, valid = args
  reference = lambda *f: _merged("xla", scale, interpret, *f, segment_ids, valid)
  return jax.vjp(reference, *floats)[1](cotangent) + (None, None)


_merged_kernels.defvjp(_merged_kernels_fwd, _merged_kernels_bwd)


def interpreted() -> bool:
  """Whether the Pallas kernels run in interpret mode: on CPU (tests), where they have no
  native lowering. tests/test_lowering.py sets it false to lower the steps for TPU and GPU."""
  return jax.default_backend() == "cpu"


def fused(backend, q, own_kv, prefix_kv, m: Segments, scale):
  """Attention of q [b, kv, g, t, hd] over the row's own keys (causal within segments)
  and, when given, the prefix keys [b, kv, p, hd] (all valid ones): out [b, kv, g, t, hd].
  Without a prefix a single kernel call, with the kernel's own backward."""
  interpret = interpreted()
  k, v = own_kv
  if prefix_kv is None or prefix_kv[0].shape[2] == 0:
    own = lambda q, k, v, s: _HALVES[backend][0](q, k, v, s, scale, interpret, False)
    return _per_shard(own, q, k, v, m.segment_ids)
  prefix_k, prefix_v = (x.astype(k.dtype) for x in prefix_kv)
  both = lambda *a: split_attention(backend, *a, scale, interpret)
  return _per_shard(both, q, k, v, prefix_k, prefix_v, m.segment_ids, m.prefix_valid)


def _per_shard(fn, *args):
  """`fn` on each device's rows and kv heads of the mesh in context (`sharding.activate`:
  the mesh and the axis rules for activation_batch, activation_heads), as the Pallas kernels
  need: XLA cannot partition a Mosaic or Triton call. Arguments are [b, kv, ...] or [b, ...]."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  batch, heads = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
  spec = lambda x: P(batch, heads) if x.ndim >= 4 else P(batch)
  return jax.shard_map(
      fn, mesh=mesh, in_specs=tuple(map(spec, args)), out_specs=P(batch, heads), check_vma=False
  )(*args)
