"""The one map from a checkpoint's architecture to a model family: its config class, its
decoder module, and the names it is known by in HF `config.json` and GGUF metadata.
Everything else (loaders, sharding, planner, engine, trainer) asks here instead of
branching on an architecture name."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from selectit_jax.models import gemma3
from selectit_jax.models import llama
from selectit_jax.models.layers import Prefix
from selectit_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  config_class: type  # from_hf(dict), from_gguf(source), to_hf()
  module: type  # the flax decoder: module(cfg, **kw)
  hf_model_types: tuple[str, ...]  # config.json "model_type"
  gguf_archs: tuple[str, ...]  # GGUF "general.architecture"
  param_table: Callable  # cfg -> [hf.ParamSpec]: our tree <-> HF tensor names
  gguf_layer_names: dict[str, str]  # GGUF blk.N.<name> -> HF model.layers.N.<name>
  gguf_tensor: Callable  # (hf name, dequantized array, source) -> HF values


FAMILIES = (
    Family(
        "llama",
        llama.LlamaConfig,
        llama.Llama,
        tuple(llama.HF_MODEL_TYPES),  # LLaMA, Mistral, Qwen2/2.5, Qwen3
        ("llama", "qwen2", "qwen3"),
        llama.param_table,
        llama.GGUF_LAYER_NAMES,
        llama.gguf_tensor,
    ),
    Family(
        "gemma3",
        gemma3.Gemma3Config,
        gemma3.Gemma3,
        ("gemma3_text", "gemma3"),
        ("gemma3",),
        gemma3.param_table,
        gemma3.GGUF_LAYER_NAMES,
        gemma3.gguf_tensor,
    ),
)


def for_config(cfg) -> Family:
  """The family of a config instance."""
  for family in FAMILIES:
    if isinstance(cfg, family.config_class):
      return family
  raise TypeError(f"no model family for config type {type(cfg).__name__}")


def for_hf(hf: dict[str, Any]) -> Family:
  """The family of a HF config.json dict (by model_type)."""
  model_type = hf.get("model_type") or (
      "llama" if any("Llama" in a for a in hf.get("architectures") or []) else ""
  )
  for family in FAMILIES:
    if model_type in family.hf_model_types:
      return family
  known = sorted(t for f in FAMILIES for t in f.hf_model_types)
  raise ValueError(
      f"unsupported architecture: model_type={model_type!r} "
      f"architectures={hf.get('architectures')}; supported: {known}"
  )


def for_gguf(arch: str) -> Family:
  for family in FAMILIES:
    if arch in family.gguf_archs:
      return family
  known = sorted(a for f in FAMILIES for a in f.gguf_archs)
  raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {known}")


def build(cfg, **kwargs) -> nn.Module:
  """The decoder module of a config's family."""
  return for_config(cfg).module(cfg, **kwargs)


def prefix_prefill(cfg, param_sharding, mesh) -> Callable:
  """(params, tokens [n, p], valid [n, p] bool) -> the `Prefix` of those rows (keys and values
  of each row's valid positions, counted from 0), jit'd once and replicated over `mesh`: the
  shared prompt prefixes of the scoring engine and of the decoder, a few short rows."""
  model = build(cfg, collect_kv=True)
  replicated = sharding.replicated(mesh)

  def prefill(params, tokens, valid):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    _, (k, v) = model.apply({"params": params}, tokens, positions, valid.astype(jnp.int32))
    return Prefix(k, v, valid)

  jitted = jax.jit(
      prefill, in_shardings=(param_sharding, replicated, replicated), out_shardings=replicated
  )

  def run(params, tokens, valid):
    with sharding.activate(mesh, sharding.REPLICATED_ROWS_RULES):
      return jitted(params, tokens, valid)

  run.jitted = jitted  # to lower it under the same rules (tests/test_lowering.py)
  return run


def config_from_hf(hf: dict[str, Any], **overrides):
  """A family config from a HF config.json dict."""
  return for_hf(hf).config_class.from_hf(hf, **overrides)
