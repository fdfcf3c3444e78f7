"""GGUF files (llama.cpp): config from metadata, tensors dequantized under HF names.

llama.cpp's converter permutes the Q/K rows of HF checkpoints into its interleaved rotary
layout; we undo that so the tensors match HF's half-split layout used by our model.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from selectit_jax.models import registry
from selectit_jax.models.llama import LlamaConfig

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _hf_name(name: str) -> str | None:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _LAYER_RE.fullmatch(name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
  return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: interleaved rotary pairs back to half-split rows."""
  out_dim = w.shape[0]
  return (w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


class GGUFSource:
  """Tensors of a GGUF file, dequantized to fp32, HF names and layout."""

  def __init__(self, path: str):
    self.path = path
    self.reader = gguf.GGUFReader(path)
    arch = self.field("general.architecture")
    try:
      registry.for_gguf(arch)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    self._tensors = {}
    for t in self.reader.tensors:
      hf = _hf_name(t.name)
      if hf is None:
        raise ValueError(f"{path}: unknown GGUF tensor {t.name!r}")
      self._tensors[hf] = t

  def field(self, key: str, default=None):
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  def config(self, **overrides) -> LlamaConfig:
    f = lambda k, d=None: self.field(f"llama.{k}", d)
    heads = f("attention.head_count")
    d = f("embedding_length")
    scaling = None
    if f("rope.scaling.type") not in (None, "none"):
      scaling = (("factor", f("rope.scaling.factor")), ("rope_type", f("rope.scaling.type")))
    return LlamaConfig(
        vocab_size=f("vocab_size") or len(self.field("tokenizer.ggml.tokens")),
        hidden_size=d,
        intermediate_size=f("feed_forward_length"),
        num_layers=f("block_count"),
        num_heads=heads,
        num_kv_heads=f("attention.head_count_kv", heads),
        head_dim=f("rope.dimension_count", d // heads),
        rms_norm_eps=f("attention.layer_norm_rms_epsilon"),
        rope_theta=f("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings="lm_head.weight" not in self._tensors,
        max_position_embeddings=f("context_length", 4096),
        **overrides)

  def keys(self) -> set[str]:
    return set(self._tensors)

  def get(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise KeyError(f"{self.path}: no tensor for {name!r}")
    t = self._tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
      w = unpermute_rotary(w, self.field("llama.attention.head_count"))
    elif name.endswith("k_proj.weight"):
      w = unpermute_rotary(w, self.field("llama.attention.head_count_kv"))
    return w
