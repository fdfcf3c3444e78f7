"""The Gemma 3 text family (Gemma 3 270M, 1B and the text half of the larger ones) in Flax
linen, built from the shared layers: query/key RMSNorm, norms before and after both the
attention and the MLP, GeGLU, embeddings scaled by sqrt(d), and sliding-window ("local")
layers interleaved with global ones, each kind with its own rotary base.

Layers are stacked with `nn.scan` as in `llama.py`; a per-layer flag picks the local or global
rotary table and mask, so the param tree keeps one leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from selectit_jax.models import attention
from selectit_jax.models.layers import (
    remat_mode,
    Attention,
    Mlp,
    Prefix,
    RMSNorm,
    block_step,
    decoder_params,
    final_states,
    layer_mask,
    rope_inv_freq,
    run_layers,
    vocab_head,
    vocab_logits,
)

LOCAL, GLOBAL = "sliding_attention", "full_attention"  # HF's layer_types names


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Architecture and numerics of a Gemma 3 text model (defaults: HF Gemma3TextConfig)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0  # global layers
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # global layers only, as HF
  rope_local_base_freq: float = 10_000.0  # sliding-window layers
  sliding_window: int = 4096
  sliding_window_pattern: int = 6  # every 6th layer global, when no layer_types
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: int = 256  # HF's config types it int
  final_logit_softcapping: float | None = None
  hidden_act: str = "gelu_pytorch_tanh"
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # layers.REMAT_POLICIES: none | dots | full (True/False: full/none)
  attention_block: int = 128
  # Attention kernel (models/attention.py): auto | xla | splash | pallas_gpu | cudnn; the
  # kernels do not apply the sliding window (auto: jnp where it can hide keys).
  attention: str = "auto"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of " f"num_kv_heads={self.num_kv_heads}"
      )
    if self.layer_types is not None and len(self.layer_types) != self.num_layers:
      raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
    # One spelling from here on (True/False from older configs): layers.REMAT_POLICIES.
    object.__setattr__(self, "remat", remat_mode(self.remat))
    attention.check_backend(self.attention)

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: sliding-window attention (HF's default: all but every `pattern`-th)."""
    types = self.layer_types or tuple(
        LOCAL if (i + 1) % self.sliding_window_pattern else GLOBAL for i in range(self.num_layers)
    )
    return tuple(t == LOCAL for t in types)

  @property
  def layer_norm_params(self) -> int:
    """Norm weights of one block: four over d, query and key norms over head_dim."""
    return 4 * self.hidden_size + 2 * self.head_dim

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "Gemma3Config":
    """From a HF `config.json` dict (gemma3_text, or gemma3 with a text_config)."""
    hf = hf.get("text_config") or hf
    if hf.get("attn_logit_softcapping") is not None:
      raise ValueError("Gemma 3 attention logit softcapping is not supported")
    # transformers ≥ 5 writes rope_parameters per layer type; older files rope_theta,
    # rope_local_base_freq and rope_scaling (global layers only).
    rope = hf.get("rope_parameters") or {}
    full, local = rope.get(GLOBAL) or {}, rope.get(LOCAL) or {}
    scaling = hf.get("rope_scaling") or {k: v for k, v in full.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
      scaling = None
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        rope_local_base_freq=local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)),
        sliding_window=hf.get("sliding_window") or 4096,
        sliding_window_pattern=hf.get("sliding_window_pattern") or 6,
        layer_types=tuple(hf["layer_types"]) if hf.get("layer_types") else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        **overrides,
    )

  @classmethod
  def from_gguf(cls, source, **overrides) -> "Gemma3Config":
    """From GGUF metadata, read as transformers' GGUF loader does: keys it does not map
    (the local rotary base, the layer pattern, query_pre_attn_scalar) keep HF's defaults."""
    f = lambda k, d=None: source.field(f"gemma3.{k}", d)
    heads = f("attention.head_count")
    head_dim = f("attention.key_length") or f("embedding_length") // heads
    return cls(
        vocab_size=f("vocab_size") or len(source.field("tokenizer.ggml.tokens")),
        hidden_size=f("embedding_length"),
        intermediate_size=f("feed_forward_length"),
        num_layers=f("block_count"),
        num_heads=heads,
        num_kv_heads=f("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=f("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=f("rope.freq_base", 1_000_000.0),
        sliding_window=f("attention.sliding_window", 4096),
        tie_word_embeddings="lm_head.weight" not in source.keys(),
        max_position_embeddings=f("context_length", 32768),
        **overrides,
    )

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (transformers ≥ 5 rope layout)."""
    full = {"rope_type": "default", **dict(self.rope_scaling or ()), "rope_theta": self.rope_theta}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": {
            GLOBAL: full,
            LOCAL: {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
        },
        "sliding_window": self.sliding_window,
        "sliding_window_pattern": self.sliding_window_pattern,
        "layer_types": [LOCAL if local else GLOBAL for local in self.local_layers],
        "query_pre_attn_scalar": self.query_pre_attn_scalar,
        "final_logit_softcapping": self.final_logit_softcapping,
        "attn_logit_softcapping": None,
        "hidden_activation": self.hidden_act,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "attention_bias": False,
        "torch_dtype": "float32",
    }


class Block(nn.Module):
  """Gemma 3 block: x + post_norm(attn(pre_norm(x))), then the same around the MLP. A scan
  body like llama.Block; `is_local` (per scanned layer) picks the rotary table and mask."""

  cfg: Gemma3Config
  collect_kv: bool = False

  def setup(self):
    c = self.cfg
    norm = lambda: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    self.attn_norm, self.post_attn_norm = norm(), norm()
    self.attn = Attention(c, qk_norm=True, scale=c.query_pre_attn_scalar**-0.5)
    self.mlp_norm, self.post_mlp_norm = norm(), norm()
    self.mlp = Mlp(c, activation=c.hidden_act)

  def __call__(self, x, sin_2bth, cos_2bth, mask_2, prefix_kv, is_local, readout=None):
    # Index 1: local (sliding-window) tables, 0: global.
    which = is_local.astype(jnp.int32)
    sin, cos = sin_2bth[which], cos_2bth[which]
    if isinstance(mask_2, attention.Segments):  # kernels: one mask, the window a flag
      mask = mask_2._replace(local=is_local)
    else:
      mask = mask_2[which]
    return block_step(self, x, sin, cos, mask, prefix_kv, readout)

  def _layer(self, x, sin, cos, mask, prefix_kv, readout=None):
    attn, kv = self.attn(self.attn_norm(x), sin, cos, mask, prefix_kv, queries=readout)
    rows = x if readout is None else jnp.take_along_axis(x, readout[..., None], axis=1)
    rows = rows + self.post_attn_norm(attn)
    rows = rows + self.post_mlp_norm(self.mlp(self.mlp_norm(rows)))
    if readout is None:
      return rows, kv
    return x.at[jnp.arange(x.shape[0])[:, None], readout].set(rows), kv


class Gemma3(nn.Module):
  """Decoder returning final (normed) hidden states, called as `llama.Llama`."""

  cfg: Gemma3Config
  collect_kv: bool = False

  def setup(self):
    decoder_params(self, Block, layer_flags=1)

  def __call__(
      self, tokens_bt, positions_bt, segment_ids_bt, prefix: Prefix | None = None, readout=None
  ):
    """As `Llama.__call__`; sliding-window layers see keys less than `sliding_window`
    positions back, cached prefix keys (positions 0..p-1) included."""
    c = self.cfg
    # HF multiplies by sqrt(d) in the embedding's dtype.
    x = jnp.take(self.embedding, tokens_bt, axis=0).astype(c.dtype)
    x = x * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    local_cfg = dataclasses.replace(c, rope_theta=c.rope_local_base_freq, rope_scaling=None)
    freqs = jnp.stack(
        [positions_bt[..., None].astype(jnp.float32) * rope_inv_freq(cfg) for cfg in (c, local_cfg)]
    )
    masks, prefix_kv = layer_mask(c, segment_ids_bt, positions_bt, prefix)
    if not isinstance(masks, attention.Segments):  # dense: [global, local]
      k_positions = positions_bt
      if prefix is not None:
        k_positions = attention.prefix_positions(positions_bt, prefix.valid)
      window = attention.sliding_window(masks, positions_bt, k_positions, c.sliding_window)
      masks = jnp.stack([masks, window])
    is_local = jnp.asarray(np.asarray(c.local_layers))
    x, kv = run_layers(
        self, Block, x, jnp.sin(freqs), jnp.cos(freqs), masks, prefix_kv, (is_local,), readout
    )
    return final_states(self, x, kv, readout)

  def logits(self, hidden_xd):
    """Vocabulary logits [..., vocab] in fp32 (tanh-capped when the config says so)."""
    out = vocab_logits(self, hidden_xd)
    cap = self.cfg.final_logit_softcapping
    return out if cap is None else jnp.tanh(out / cap) * cap

  def head(self):
    """The head weight [d, vocab] in the compute dtype (training/loss.py applies it)."""
    return vocab_head(self)


# ------------------------------------------------------------------ checkpoint layouts

_L = "model.layers.{i}."

# GGUF tensor blk.N.<name>.weight -> HF model.layers.N.<name>.weight (llama.cpp's gemma3).
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_tensor(hf_name: str, w: np.ndarray, source) -> np.ndarray:
  """A dequantized GGUF tensor in HF's values: llama.cpp stores Gemma's norm weights as
  1 + w; HF keeps w (transformers' GGUF loader subtracts 1 the same way). No rotary
  permutation: llama.cpp's gemma3 converter leaves Q/K rows in HF's half-split order."""
  return w - np.float32(1) if hf_name.endswith("norm.weight") else w


def param_table(cfg: Gemma3Config):
  """Our param paths and their HF tensors; RMSNorm scales are HF's weight + 1."""
  from selectit_jax.checkpoints import hf  # the loaders import this module

  q, k = hf.in_proj("num_heads"), hf.in_proj("num_kv_heads")
  norm = lambda path, name: hf.ParamSpec(path + ("scale",), name, *hf.PLUS_ONE)
  table = [
      hf.ParamSpec(("embedding",), "model.embed_tokens.weight", *hf.SAME),
      norm(("layers", "attn_norm"), _L + "input_layernorm.weight"),
      hf.ParamSpec(("layers", "attn", "q"), _L + "self_attn.q_proj.weight", *q),
      hf.ParamSpec(("layers", "attn", "k"), _L + "self_attn.k_proj.weight", *k),
      hf.ParamSpec(("layers", "attn", "v"), _L + "self_attn.v_proj.weight", *k),
      hf.ParamSpec(("layers", "attn", "o"), _L + "self_attn.o_proj.weight", *hf.O_PROJ),
      norm(("layers", "attn", "q_norm"), _L + "self_attn.q_norm.weight"),
      norm(("layers", "attn", "k_norm"), _L + "self_attn.k_norm.weight"),
      norm(("layers", "post_attn_norm"), _L + "post_attention_layernorm.weight"),
      norm(("layers", "mlp_norm"), _L + "pre_feedforward_layernorm.weight"),
      hf.ParamSpec(("layers", "mlp", "gate"), _L + "mlp.gate_proj.weight", *hf.TRANSPOSE),
      hf.ParamSpec(("layers", "mlp", "up"), _L + "mlp.up_proj.weight", *hf.TRANSPOSE),
      hf.ParamSpec(("layers", "mlp", "down"), _L + "mlp.down_proj.weight", *hf.TRANSPOSE),
      norm(("layers", "post_mlp_norm"), _L + "post_feedforward_layernorm.weight"),
      norm(("final_norm",), "model.norm.weight"),
  ]
  if not cfg.tie_word_embeddings:
    table.append(hf.ParamSpec(("lm_head",), "lm_head.weight", *hf.TRANSPOSE))
  return table
