"""Layers shared by the decoder families: RMSNorm, rotary embeddings, grouped-query attention
in query blocks (packed segments, a cached prefix, read-out rows; optional query/key norms and
sliding-window masks), the gated MLP (SwiGLU or GeGLU).

Parameters and activations carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `layers`); parallel/sharding.py maps them onto a device mesh. Rotary
embeddings use HF's half-split layout, so HF safetensors load unpermuted.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from selectit_jax.models import attention
from selectit_jax.models.attention import attention_mask
from selectit_jax.errors import UserError

# Any family's config dataclass: these layers read hidden_size, head counts, head_dim, eps,
# rope settings, dtypes, attention_block and attention (the kernel) from it.
DecoderConfig = Any


def rope_inv_freq(cfg: DecoderConfig) -> jax.Array:
  """Rotary inverse frequencies [head_dim/2], with HF's `rope_scaling` variants."""
  hd = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if not cfg.rope_scaling:
    return inv_freq
  s = dict(cfg.rope_scaling)
  kind = s.get("rope_type", s.get("type"))
  if kind in (None, "default"):
    return inv_freq
  if kind == "linear":
    return inv_freq / s["factor"]
  if kind == "llama3":
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return jnp.where(
        wavelen > old_len / low,
        inv_freq / factor,
        jnp.where(wavelen < old_len / high, inv_freq, mid),
    )
  raise ValueError(f"unsupported rope_scaling type {kind!r}")


def apply_rope(x_bnth: jax.Array, sin_bth: jax.Array, cos_bth: jax.Array) -> jax.Array:
  """Half-split rotation (HF `rotate_half`) of head-major [b, heads, t, hd], in fp32."""
  x = x_bnth.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin, cos = sin_bth[:, None], cos_bth[:, None]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bnth.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) · scale. Gemma's (1 + w) is the same with scale = 1 + w (the loaders add 1)."""

  eps: float
  dtype: Any
  param_dtype: Any
  axis: str = "embed"  # logical axis of the normed dimension ("head_dim" for q/k norms)

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _weight(module: nn.Module, name: str, shape, axes, fan_in: int):
  init = nn.initializers.normal(stddev=fan_in**-0.5)
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, module.cfg.param_dtype)
  return w.astype(module.cfg.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention (num_kv_heads ≤ num_heads), softmax in fp32.

  The q/k/v/o projections are plain [b·t, d] matmuls over token-major rows; heads are
  head-major ([b, heads, t, hd]) between them, so the score and value matmuls of every
  query block read contiguous rows (on CPU ~25 % faster attention than slicing token-major
  blocks and transposing each). The layout changes sit next to elementwise work (the
  rotation, the softmax's division) that XLA fuses them into; projecting straight into
  head-major made every projection's backward a strided matmul (CPU training step 2-3 %
  slower).

  `qk_norm`: RMSNorm over head_dim on queries and keys before the rotation (Gemma 3,
  Qwen3); `qkv_bias`: biases on the q, k, v projections, none on o (Qwen2);
  `scale`: the score scale (default head_dim^-0.5; Gemma: query_pre_attn_scalar^-0.5).
  """

  cfg: DecoderConfig
  qk_norm: bool = False
  qkv_bias: bool = False
  scale: float | None = None

  @nn.compact
  def __call__(self, x_btd, sin, cos, mask, prefix_kv=None, queries=None):
    """`prefix_kv`: keys and values [b, kv, p, hd] of earlier positions (already rotated)
    that every row attends to first; `mask` is then [b, 1, 1, t, p + t]: the jnp path. Or
    `mask` is an `attention.Segments`: the config's attention kernel where it applies
    (`attention.kernel_for`), else the dense mask it stands for. `queries` [b, s]:
    only these positions query (output [b, s, d]); all t still give keys and values.
    Returns the output and this call's own (k, v)."""
    c = self.cfg
    d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    wq = _weight(self, "q", (d, h, hd), ("embed", "heads", "head_dim"), d)
    wk = _weight(self, "k", (d, kv, hd), ("embed", "kv_heads", "head_dim"), d)
    wv = _weight(self, "v", (d, kv, hd), ("embed", "kv_heads", "head_dim"), d)
    wo = _weight(self, "o", (h, hd, d), ("heads", "head_dim", "embed"), h * hd)
    scale = self.scale or hd**-0.5
    project = {n: _projection(self, n, w) for n, w in (("q", wq), ("k", wk), ("v", wv))}
    q_norm = k_norm = lambda x: x
    if self.qk_norm:
      q_norm, k_norm = (
          RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, "head_dim", name=n)
          for n in ("q_norm", "k_norm")
      )
    k = apply_rope(k_norm(project["k"](x_btd)), sin, cos)
    v = project["v"](x_btd)
    own_kv = (k, v)
    kernel = None
    if isinstance(mask, attention.Segments):  # the models' choice when a kernel may run
      window = getattr(c, "sliding_window", None)
      num_keys = x_btd.shape[1] + (0 if prefix_kv is None else prefix_kv[0].shape[2])
      kernel = attention.kernel_for(c.attention, mask, window, num_keys)
      if kernel is None or queries is not None:  # read-out rows: a few queries, jnp
        kernel, mask = None, attention.dense_mask(mask, window)
    prefix_k = prefix_v = None
    if prefix_kv is not None and prefix_kv[0].shape[2] and kernel is None:
      prefix_k, prefix_v = (cached.astype(new.dtype) for cached, new in zip(prefix_kv, own_kv))
    if queries is not None and prefix_k is not None:  # a few queries: one joint softmax
      k, v = (jnp.concatenate(pair, axis=2) for pair in ((prefix_k, k), (prefix_v, v)))
    if queries is not None:
      x_btd, sin, cos = (
          jnp.take_along_axis(a, queries[..., None], axis=1) for a in (x_btd, sin, cos)
      )
      mask = jnp.take_along_axis(mask, queries[:, None, None, :, None], axis=3)
    q = apply_rope(q_norm(project["q"](x_btd)), sin, cos)
    q = nn.with_logical_constraint(
        q, ("activation_batch", "activation_heads", "activation_length", None)
    )
    b, t = x_btd.shape[:2]
    # Query head n uses kv head n // (h // kv), as HF's repeat_kv.
    q = q.reshape(b, kv, h // kv, t, hd)
    if kernel is not None:
      out = attention.fused(kernel, q, own_kv, prefix_kv, mask, scale)
    elif queries is not None:  # anywhere in the row: one block against all keys
      out = attention.attend(q, k, v, mask, scale)
    else:
      # Causal: rows [start, end) attend to own keys [0, end) only; the mask handles the
      # rest (segments, padding, the diagonal block's upper half). Static slices, unrolled
      # in the scan body. Prefix keys (the rating prompt; the decoder's whole cache) are
      # attended on their own and merged by log-sum-exp, so they are never copied next to
      # the row's keys (a decode step would otherwise copy its cache in every layer).
      block, p = c.attention_block or t, mask.shape[-1] - t

      def rows(start):
        q_blk, m_blk = q[:, :, :, start : start + block], mask[..., start : start + block, :]
        end = start + block
        own = attention.partial_attend(
            q_blk, k[:, :, :end], v[:, :, :end], m_blk[..., p : p + end], scale
        )
        if prefix_k is None:
          return own[0]
        seen = attention.partial_attend(q_blk, prefix_k, prefix_v, m_blk[..., :p], scale)
        return attention.merge(*seen, *own)[0]

      out = jnp.concatenate([rows(start) for start in range(0, t, block)], axis=3)
    out = out.reshape(b, h, t, hd).astype(v.dtype)
    return jnp.einsum("btnh,nhd->btd", jnp.swapaxes(out, 1, 2), wo), own_kv


def _projection(module: Attention, name: str, w_dnh):
  """x [b, t, d] -> head-major [b, n, t, hd] through `w`, plus the bias `{name}_bias`
  [n, hd] when the module has q/k/v biases (created only then)."""
  bias = None
  if module.qkv_bias:
    axes = ("heads" if name == "q" else "kv_heads", "head_dim")
    init = nn.with_logical_partitioning(nn.initializers.zeros, axes)
    bias = module.param(f"{name}_bias", init, w_dnh.shape[1:], module.cfg.param_dtype)
    bias = bias.astype(module.cfg.dtype)

  def project(x_btd):
    out = jnp.einsum("btd,dnh->btnh", x_btd, w_dnh)
    return jnp.swapaxes(out if bias is None else out + bias, 1, 2)

  return project


# Gate activations of the gated MLP by HF `hidden_act` name.
_ACTIVATIONS = {
    "silu": nn.silu,
    # Gemma: GeGLU with the tanh approximation of GELU.
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(act, g, u):
  """act(g) ⊙ u whose backward keeps only g and u and recomputes act(g): autodiff kept three
  to four [rows, f] arrays a layer, and reading them back cost more than the recompute."""
  return act(g) * u


def _gated_fwd(act, g, u):
  return act(g) * u, (g, u)


def _gated_bwd(act, res, dh):
  g, u = res
  a, act_vjp = jax.vjp(act, g)
  return act_vjp(dh * u)[0], dh * a


_gated.defvjp(_gated_fwd, _gated_bwd)


class Mlp(nn.Module):
  """Gated feed-forward: act(x·gate) ⊙ (x·up) · down; SwiGLU by default."""

  cfg: DecoderConfig
  activation: str = "silu"

  @nn.compact
  def __call__(self, x_btd):
    c = self.cfg
    d, f = c.hidden_size, c.intermediate_size
    gate = _weight(self, "gate", (d, f), ("embed", "mlp"), d)
    up = _weight(self, "up", (d, f), ("embed", "mlp"), d)
    down = _weight(self, "down", (f, d), ("mlp", "embed"), f)
    # Rows flattened to 2-D: XLA:CPU turns the weight gradients of [b, t, ·] matmuls
    # (contracting b and t) into strided transposes that cost as much as the matmuls.
    x = x_btd.reshape(-1, d)
    hidden = _gated(_ACTIVATIONS[self.activation], x @ gate, x @ up)
    hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_mlp"))
    return (hidden @ down).reshape(x_btd.shape)


class Prefix(NamedTuple):
  """Keys and values of a shared prefix, computed once (`Llama(collect_kv=True)`) and
  attended to by every row: k, v [layers, b, kv_heads, p, head_dim]; valid [b, p] marks the
  real prefix positions of each row."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array


# ------------------------------------------------------------- decoder plumbing shared by
# the families: parameters around the layer stack, the prefix mask, the last-layer read-out.


# What each block keeps for the backward pass (`model.remat`): everything (none); the weight
# matmuls' outputs and the attention's softmax residuals, recomputing norms, rotations and the
# MLP's activation (dots: the CPU trainer's fastest, saves memory too; without the residuals
# the backward ran the attention's P·V again); only its input (full).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(attention.SOFTMAX_RESIDUALS),
    ),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_mode(value) -> str:
  """`model.remat` as one of REMAT_POLICIES (True and False, as older configs say: full, none)."""
  mode = {True: "full", False: "none", "true": "full", "false": "none"}.get(
      value.lower() if isinstance(value, str) else bool(value), value
  )
  if mode not in REMAT_POLICIES:
    raise UserError(f"model.remat={value!r} is not one of {sorted(REMAT_POLICIES)}")
  return mode


def decoder_params(module: nn.Module, block: type, layer_flags: int) -> None:
  """Sets `module.embedding`, `module.layers` (the block scanned over a leading `layers` axis;
  its call takes the carry x, then sin, cos and mask for every layer, the prefix's per-layer
  (k, v), and `layer_flags` per-layer arrays such as Gemma's is_local), `module.final_norm`
  and, untied, `module.lm_head`. Call from `setup`; run the stack with `run_layers`."""
  c = module.cfg
  module.embedding = module.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
      (c.vocab_size, c.hidden_size),
      c.param_dtype,
  )
  policy = REMAT_POLICIES[c.remat]
  block = block if policy is None else nn.remat(block, prevent_cse=False, policy=policy)
  module.layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * 3 + (0,) + (0,) * layer_flags,
      length=c.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(c, module.collect_kv, name="layers")
  module.final_norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
  if not c.tie_word_embeddings:
    module.lm_head = module.param(
        "lm_head",
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=c.hidden_size**-0.5), ("embed", "vocab")
        ),
        (c.hidden_size, c.vocab_size),
        c.param_dtype,
    )


def prefixed_mask(mask, prefix: Prefix | None):
  """(mask with the prefix's valid keys in front, prefix (k, v) or None): every real query
  sees the prefix, then the causal mask within its own segment."""
  if prefix is None:
    return mask, None
  seen = jnp.broadcast_to(
      prefix.valid[:, None, None, None, :], mask.shape[:-1] + prefix.valid.shape[-1:]
  )
  return jnp.concatenate([seen, mask], axis=-1), (prefix.k, prefix.v)


def layer_mask(cfg: DecoderConfig, segment_ids_bt, positions_bt, prefix: Prefix | None):
  """(mask, prefix (k, v) or None) for the layers: `prefixed_mask`'s dense mask on the jnp
  path, the `attention.Segments` it stands for when the config's attention is a kernel."""
  if attention.resolve(getattr(cfg, "attention", "xla")) == "xla":
    return prefixed_mask(attention_mask(segment_ids_bt), prefix)
  if prefix is None:
    return attention.Segments(segment_ids_bt, positions_bt), None
  return attention.Segments(segment_ids_bt, positions_bt, prefix.valid), (prefix.k, prefix.v)


def block_step(block: nn.Module, x, sin, cos, mask, prefix_kv, readout=None):
  """One layer: the block's `_layer` on every row, or, with `readout` [b, s], on those rows
  only (the others keep stale values)."""
  x, kv = block._layer(x, sin, cos, mask, prefix_kv, readout)  # pylint: disable=protected-access
  x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
  return x, (kv if block.collect_kv else None)


def run_layers(
    module: nn.Module, block: type, x, sin, cos, mask, prefix_kv, flags=(), readout=None
):
  """The layer stack (`decoder_params`) on x: (x, the layers' stacked (k, v) or None).

  With `readout` [b, s], layers 0..L-2 run in one scan over every row and the last layer
  runs after it at the read-out rows only, with its weights, prefix keys and `flags` indexed
  from the stacked tree. No conditional inside the loop: a `cond` there is a host round trip
  per layer on GPU and stops XLA overlapping the next layer's FSDP gather with this one.
  """
  if readout is None or module.is_initializing():
    return module.layers(x, sin, cos, mask, prefix_kv, *flags)
  stack = nn.meta.unbox(module.variables["params"]["layers"])
  num_layers = module.cfg.num_layers
  layer = block(module.cfg, module.collect_kv, parent=None)
  at = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), tree)

  def apply(i, x, **kw):
    # Indexed inside the loop body (no sliced copy of L-1 layers' weights).
    args = (x, sin, cos, mask, at(prefix_kv, i), *at(tuple(flags), i))
    return layer.apply({"params": at(stack, i)}, *args, **kw)

  x, kv = jax.lax.scan(lambda x, i: apply(i, x), x, jnp.arange(num_layers - 1))
  x, last_kv = apply(num_layers - 1, x, readout=readout)
  if module.collect_kv:
    kv = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), kv, last_kv)
  return x, kv


def final_states(module: nn.Module, x, kv, readout):
  """Normed final states (at the read-out positions when given), with the layers' (k, v)
  when the module collects them."""
  if readout is not None:
    x = jnp.take_along_axis(x, readout[..., None], axis=1)
  return (module.final_norm(x), kv) if module.collect_kv else module.final_norm(x)


def vocab_head(module: nn.Module):
  """The head weight [d, vocab] in the compute dtype (tied: the embedding's transpose)."""
  c = module.cfg
  return (module.embedding.T if c.tie_word_embeddings else module.lm_head).astype(c.dtype)


def vocab_logits(module: nn.Module, hidden_xd):
  """Vocabulary logits [..., vocab] in fp32 through the (tied or untied) head."""
  return jnp.einsum(
      "...d,dv->...v",
      hidden_xd.astype(module.cfg.dtype),
      vocab_head(module),
      preferred_element_type=jnp.float32,
  )
