"""The LLaMA family (LLaMA-2/3, SmolLM2, Mistral-style GQA, and Qwen2/2.5/3, which are LLaMA
plus q/k/v biases or q/k norms) in Flax linen: its config and decoder, built from the shared
layers. Layers are stacked with `nn.scan` (one compiled block, a leading `layers` axis)."""

from __future__ import annotations

import dataclasses
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

# HF model_type -> (the model_type we export, architecture options). Mistral is exported as
# LLaMA, as it always was (its exported config then carries no sliding window).
HF_MODEL_TYPES = {
    "llama": ("llama", {}),
    "mistral": ("llama", {}),
    "qwen2": ("qwen2", {"qkv_bias": True}),  # biases on q, k, v; none on o
    "qwen3": ("qwen3", {"qk_norm": True}),  # per-head q/k RMSNorm, plain w·x weights
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a LLaMA-family model."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # (("rope_type", "linear"), ("factor", 2.0), ...) as a hashable tuple of items.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  dtype: str = "float32"  # activations / matmul inputs
  param_dtype: str = "float32"  # stored weights
  remat: str = "none"  # layers.REMAT_POLICIES: none | dots | full (True/False: full/none)
  # Causal attention in query blocks of this many rows, each against only the keys up to its
  # end, so the masked upper triangle is mostly skipped (0 = one block: the full t×t square).
  attention_block: int = 128
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  model_type: str = "llama"  # what `to_hf` writes: llama, qwen2 or qwen3
  # Attention kernel (models/attention.py): auto | xla | splash | pallas_gpu | cudnn.
  attention: str = "auto"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of " f"num_kv_heads={self.num_kv_heads}"
      )
    if self.model_type not in _ARCHITECTURES:
      raise ValueError(f"model_type {self.model_type!r} is not one of {sorted(_ARCHITECTURES)}")
    attention.check_backend(self.attention)
    # One spelling from here on (True/False from older configs): layers.REMAT_POLICIES.
    object.__setattr__(self, "remat", remat_mode(self.remat))

  @property
  def layer_norm_params(self) -> int:
    """Norm weights of one block: two over d, and q/k norms over head_dim (Qwen3)."""
    return 2 * self.hidden_size + 2 * self.head_dim * self.qk_norm

  @property
  def layer_bias_params(self) -> int:
    """Bias weights of one block: q, k and v (Qwen2)."""
    return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim * self.qkv_bias

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from a HF `config.json` dict."""
    model_type = hf.get("model_type") or "llama"
    if model_type not in HF_MODEL_TYPES:
      raise ValueError(
          f"unsupported architecture: model_type={model_type!r} "
          f"architectures={hf.get('architectures')}"
      )
    # Refused, not ignored: each would change the logits.
    for key in ("use_sliding_window", "attention_bias", "mlp_bias"):
      if hf.get(key):
        raise ValueError(f"{model_type}: {key}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{model_type}: hidden_act={hf['hidden_act']!r} is not supported")
    exported_type, options = HF_MODEL_TYPES[model_type]
    heads = hf["num_attention_heads"]
    # transformers >= 5 writes rope_parameters; older files rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
      scaling = None
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        model_type=exported_type,
        **options,
        **overrides,
    )

  @classmethod
  def from_gguf(cls, source, **overrides) -> "LlamaConfig":
    """From the metadata of a GGUF file (`checkpoints.gguf.GGUFSource`); llama.cpp's llama,
    qwen2 and qwen3 architectures."""
    arch = source.field("general.architecture")
    f = lambda k, d=None: source.field(f"{arch}.{k}", d)
    heads = f("attention.head_count")
    d = f("embedding_length")
    scaling = None
    if f("rope.scaling.type") not in (None, "none"):
      scaling = (("factor", f("rope.scaling.factor")), ("rope_type", f("rope.scaling.type")))
    exported_type, options = HF_MODEL_TYPES[arch]
    return cls(
        vocab_size=f("vocab_size") or len(source.field("tokenizer.ggml.tokens")),
        hidden_size=d,
        intermediate_size=f("feed_forward_length"),
        num_layers=f("block_count"),
        num_heads=heads,
        num_kv_heads=f("attention.head_count_kv", heads),
        # Qwen3 states head_dim (≠ d / heads) as the key length.
        head_dim=f("attention.key_length") or f("rope.dimension_count", d // heads),
        rms_norm_eps=f("attention.layer_norm_rms_epsilon"),
        rope_theta=f("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings="lm_head.weight" not in source.keys(),
        max_position_embeddings=f("context_length", 4096),
        model_type=exported_type,
        **options,
        **overrides,
    )

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture."""
    return {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,  # Qwen2's q/k/v biases are implied by its model_type
        "mlp_bias": False,
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }


class Block(nn.Module):
  """Pre-norm decoder block; a scan body, so it carries `x` and outputs its layer's (k, v)
  when `collect_kv`."""

  cfg: LlamaConfig
  collect_kv: bool = False

  def setup(self):
    norm = lambda: RMSNorm(self.cfg.rms_norm_eps, self.cfg.dtype, self.cfg.param_dtype)
    attn = Attention(self.cfg, qk_norm=self.cfg.qk_norm, qkv_bias=self.cfg.qkv_bias)
    self.attn_norm, self.attn = norm(), attn
    self.mlp_norm, self.mlp = norm(), Mlp(self.cfg)

  def __call__(self, x, sin, cos, mask, prefix_kv, readout=None):
    """`readout` [b, s]: compute only these rows (the last layer, `run_layers`)."""
    return block_step(self, x, sin, cos, mask, prefix_kv, readout)

  def _layer(self, x, sin, cos, mask, prefix_kv, readout=None):
    attn, kv = self.attn(self.attn_norm(x), sin, cos, mask, prefix_kv, queries=readout)
    if readout is None:
      x = x + attn
      return x + self.mlp(self.mlp_norm(x)), kv
    rows = jnp.take_along_axis(x, readout[..., None], axis=1) + attn
    rows = rows + self.mlp(self.mlp_norm(rows))
    return x.at[jnp.arange(x.shape[0])[:, None], readout].set(rows), kv


class Llama(nn.Module):
  """Decoder returning final (normed) hidden states; `logits` is a separate method.

  `collect_kv=True` also returns every layer's keys and values, stacked as in `Prefix`.
  """

  cfg: LlamaConfig
  collect_kv: bool = False

  def setup(self):
    decoder_params(self, Block, layer_flags=0)

  def __call__(
      self, tokens_bt, positions_bt, segment_ids_bt, prefix: Prefix | None = None, readout=None
  ):
    """Tokens after an optional `prefix` (positions continue from it; every real query sees
    the prefix's valid positions, then the causal mask within its segment). `readout` [b, s]:
    return only these positions' states [b, s, d], and run the last layer for them alone."""
    c = self.cfg
    x = jnp.take(self.embedding, tokens_bt, axis=0).astype(c.dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    freqs = positions_bt[..., None].astype(jnp.float32) * rope_inv_freq(c)
    mask, prefix_kv = layer_mask(c, segment_ids_bt, positions_bt, prefix)
    x, kv = run_layers(
        self, Block, x, jnp.sin(freqs), jnp.cos(freqs), mask, prefix_kv, readout=readout
    )
    return final_states(self, x, kv, readout)

  def logits(self, hidden_xd):
    """Vocabulary logits [..., vocab] in fp32, for the rows the caller chose."""
    return vocab_logits(self, hidden_xd)

  def head(self):
    """The head weight [d, vocab] in the compute dtype (training/loss.py applies it)."""
    return vocab_head(self)


# ------------------------------------------------------------------ checkpoint layouts

_L = "model.layers.{i}."

# GGUF tensor blk.N.<name>.weight -> HF model.layers.N.<name>.weight.
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: interleaved rotary pairs back to half-split rows."""
  out_dim = w.shape[0]
  return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor(hf_name: str, w: np.ndarray, source) -> np.ndarray:
  """A dequantized GGUF tensor in HF's layout: llama.cpp's converter permutes the Q/K rows
  of HF LLaMA checkpoints into its interleaved rotary layout; undone here. Its qwen2 and
  qwen3 converters keep HF's order (transformers' GGUF loader unpermutes llama only too)."""
  if source.field("general.architecture") != "llama":
    return w
  if hf_name.endswith("q_proj.weight"):
    return unpermute_rotary(w, source.field("llama.attention.head_count"))
  if hf_name.endswith("k_proj.weight"):
    return unpermute_rotary(w, source.field("llama.attention.head_count_kv"))
  return w


def param_table(cfg: LlamaConfig):
  """Our param paths and their HF tensors."""
  from selectit_jax.checkpoints import hf  # the loaders import this module

  q, k = hf.in_proj("num_heads"), hf.in_proj("num_kv_heads")
  table = [
      hf.ParamSpec(("embedding",), "model.embed_tokens.weight", *hf.SAME),
      hf.ParamSpec(("layers", "attn_norm", "scale"), _L + "input_layernorm.weight", *hf.SAME),
      hf.ParamSpec(("layers", "attn", "q"), _L + "self_attn.q_proj.weight", *q),
      hf.ParamSpec(("layers", "attn", "k"), _L + "self_attn.k_proj.weight", *k),
      hf.ParamSpec(("layers", "attn", "v"), _L + "self_attn.v_proj.weight", *k),
      hf.ParamSpec(("layers", "attn", "o"), _L + "self_attn.o_proj.weight", *hf.O_PROJ),
      hf.ParamSpec(
          ("layers", "mlp_norm", "scale"), _L + "post_attention_layernorm.weight", *hf.SAME
      ),
      hf.ParamSpec(("layers", "mlp", "gate"), _L + "mlp.gate_proj.weight", *hf.TRANSPOSE),
      hf.ParamSpec(("layers", "mlp", "up"), _L + "mlp.up_proj.weight", *hf.TRANSPOSE),
      hf.ParamSpec(("layers", "mlp", "down"), _L + "mlp.down_proj.weight", *hf.TRANSPOSE),
      hf.ParamSpec(("final_norm", "scale"), "model.norm.weight", *hf.SAME),
  ]
  attn = lambda leaf, name, pair: hf.ParamSpec(("layers", "attn") + leaf, _L + name, *pair)
  if cfg.qkv_bias:  # Qwen2
    q_bias, kv_bias = hf.head_bias("num_heads"), hf.head_bias("num_kv_heads")
    table += [
        attn(("q_bias",), "self_attn.q_proj.bias", q_bias),
        attn(("k_bias",), "self_attn.k_proj.bias", kv_bias),
        attn(("v_bias",), "self_attn.v_proj.bias", kv_bias),
    ]
  if cfg.qk_norm:  # Qwen3: plain w·x norm weights, loaded as they are (Gemma's are 1 + w)
    table += [
        attn(("q_norm", "scale"), "self_attn.q_norm.weight", hf.SAME),
        attn(("k_norm", "scale"), "self_attn.k_norm.weight", hf.SAME),
    ]
  if not cfg.tie_word_embeddings:
    table.append(hf.ParamSpec(("lm_head",), "lm_head.weight", *hf.TRANSPOSE))
  return table
