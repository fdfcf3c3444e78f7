"""HF checkpoints: the layout converters of the families' name tables, safetensors reading
and writing.

Every loader presents its tensors under HF names in HF (torch `Linear`: [out, in]) layout;
each family's `param_table` (registry) turns them into our param tree. Tensors are read one at a time and written
straight into their slot of the stacked array, so a checkpoint is never held twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator, Protocol

import ml_dtypes
import numpy as np
import safetensors.numpy

from selectit_jax import fileio
from selectit_jax.models import registry
from selectit_jax.models.layers import DecoderConfig


class TensorSource(Protocol):
  """Tensors under HF names, HF layout, as numpy arrays."""

  def keys(self) -> set[str]:
    ...

  def get(self, name: str) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One param-tree leaf: its HF tensor name and the layout change between the two."""

  path: tuple[str, ...]
  hf_name: str  # `{i}` is the layer index for stacked params
  to_ours: Callable[[np.ndarray, DecoderConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, DecoderConfig], np.ndarray]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_name


def _same(w, c):
  return w


def _norm(index, shape):
  return tuple(slice(*sl.indices(dim)[:2]) for sl, dim in zip(index, shape))


# Block readers: our block index (per layer) -> (HF index, HF block -> our block), so a
# process reads from safetensors only the bytes of the blocks its devices own.
_same.hf_block = lambda idx, c: (idx, lambda w: w)


def _in_proj(heads_attr: str):
  """torch [heads*head_dim, d] <-> ours [d, heads, head_dim]."""

  def to_ours(w, c):
    return w.T.reshape(c.hidden_size, getattr(c, heads_attr), c.head_dim)

  def to_hf(w, c):
    return w.reshape(c.hidden_size, -1).T

  def hf_block(idx, c):
    d, n, h = idx
    if (h.start, h.stop) != (0, c.head_dim):
      return None
    rows = slice(n.start * c.head_dim, n.stop * c.head_dim)
    return (rows, d), lambda w: w.T.reshape(w.shape[1], -1, c.head_dim)

  to_ours.hf_block = hf_block
  return to_ours, to_hf


def _head_bias(heads_attr: str):
  """torch [heads*head_dim] <-> ours [heads, head_dim]."""
  return (
      lambda w, c: w.reshape(getattr(c, heads_attr), c.head_dim),
      lambda w, c: w.reshape(-1),
  )


def _o_to_ours(w, c):
  return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_to_hf(w, c):
  return w.reshape(-1, c.hidden_size).T


def _o_block(idx, c):
  n, h, d = idx
  if (h.start, h.stop) != (0, c.head_dim):
    return None
  cols = slice(n.start * c.head_dim, n.stop * c.head_dim)
  return (d, cols), lambda w: w.T.reshape(-1, c.head_dim, w.shape[0])


_o_to_ours.hf_block = _o_block


def _transpose(w, c):
  return w.T


_transpose.hf_block = lambda idx, c: (idx[::-1], lambda w: w.T)


def _plus_one(w, c):
  return w + 1


def _minus_one(w, c):
  return w - 1


_plus_one.hf_block = lambda idx, c: (idx, lambda w: w + 1)

# (to_ours, to_hf) pairs for the families' tables (ParamSpec(path, name, *pair)).
SAME = (_same, _same)
TRANSPOSE = (_transpose, _transpose)
O_PROJ = (_o_to_ours, _o_to_hf)
PLUS_ONE = (_plus_one, _minus_one)  # Gemma's RMSNorm weight w, our scale 1 + w
in_proj = _in_proj
head_bias = _head_bias  # q/k/v biases (Qwen2)


def param_table(cfg: DecoderConfig) -> list[ParamSpec]:
  """Our param paths and their HF tensors, for this architecture's family."""
  return registry.for_config(cfg).param_table(cfg)


def read_param(
    spec: ParamSpec,
    source: TensorSource,
    cfg: DecoderConfig,
    shape: tuple[int, ...],
    dtype,
    index: tuple[slice, ...] | None = None,
) -> np.ndarray:
  """The block `index` (default: all) of one leaf in our layout.

  Stacked leaves are read layer by layer, so at most one HF tensor is held beside the block.
  """
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
  if hasattr(source, "get_block") and hasattr(spec.to_ours, "hf_block"):
    out = _read_block(spec, source, cfg, shape, dtype, _norm(index, shape))
    if out is not None:
      return out
  if not spec.stacked:
    return _converted(spec, spec.hf_name, source, cfg, shape, dtype)[index]
  layers = range(*index[0].indices(shape[0]))
  out = None
  for j, i in enumerate(layers):
    name = spec.hf_name.format(i=i)
    block = _converted(spec, name, source, cfg, shape[1:], dtype)[index[1:]]
    if out is None:
      out = np.empty((len(layers),) + block.shape, dtype)
    out[j] = block
  return out


def _read_block(spec, source, cfg, shape, dtype, index):
  """Only the bytes of block `index`, or None when the layout cannot be sliced so."""
  inner, inner_shape = (index[1:], shape[1:]) if spec.stacked else (index, shape)
  plan = spec.to_ours.hf_block(inner, cfg)
  if plan is None:
    return None
  hf_index, finish = plan
  hf_shape = spec.to_hf(np.empty(inner_shape, np.uint8), cfg).shape  # pages never touched
  names = (
      [spec.hf_name.format(i=i) for i in range(*index[0].indices(shape[0]))]
      if spec.stacked
      else [spec.hf_name]
  )
  blocks = []
  for name in names:
    if tuple(source.shape(name)) != tuple(hf_shape):
      raise ValueError(
          f"tensor {name}: shape {tuple(source.shape(name))} does not fit the "
          f"config (expected {tuple(inner_shape)} in our layout)"
      )
    blocks.append(finish(source.get_block(name, hf_index)).astype(dtype, copy=False))
  return np.stack(blocks) if spec.stacked else blocks[0]


def _converted(spec, name, source, cfg, shape, dtype):
  """One HF tensor in our layout, failing with the tensor's name when it does not fit."""
  w = source.get(name)
  try:
    out = spec.to_ours(w, cfg)
  except ValueError:
    out = None
  if out is None or tuple(out.shape) != tuple(shape):
    raise ValueError(
        f"tensor {name}: shape {tuple(w.shape)} does not fit the config "
        f"(expected {tuple(shape)} in our layout)"
    )
  return out.astype(dtype, copy=False)


def check_complete(cfg: DecoderConfig, source: TensorSource) -> None:
  """Fails naming the first tensor the architecture needs and the checkpoint lacks."""
  keys = source.keys()
  for spec in param_table(cfg):
    names = (
        [spec.hf_name.format(i=i) for i in range(cfg.num_layers)]
        if spec.stacked
        else [spec.hf_name]
    )
    for name in names:
      if name not in keys:
        raise ValueError(f"checkpoint has no tensor {name!r} (needed by {'/'.join(spec.path)})")


# safetensors dtype codes -> numpy; bf16 through ml_dtypes (safetensors' numpy reader
# cannot return bf16, the dtype most LLaMA-family checkpoints ship in).
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
}


class SafetensorsSource:
  """A HF checkpoint directory: one `model.safetensors` or a sharded index.

  Tensors are memory-mapped from the files' headers, so a block read touches only its
  own pages and any dtype the format allows (bf16 included) loads.
  """

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(
          f"{directory}: no model.safetensors or " "model.safetensors.index.json"
      )
    self._entries = {}  # name -> (path, dtype, shape, byte offset)
    for fname in files:
      path = os.path.join(directory, fname)
      with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
      for name, entry in header.items():
        if name == "__metadata__":
          continue
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
          raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        self._entries[name] = (
            path,
            _SAFETENSORS_DTYPES[entry["dtype"]],
            tuple(entry["shape"]),
            8 + size + entry["data_offsets"][0],
        )

  def keys(self) -> set[str]:
    return set(self._entries)

  def _mapped(self, name: str) -> np.ndarray:
    if name not in self._entries:
      raise KeyError(f"checkpoint has no tensor {name!r}")
    path, dtype, shape, offset = self._entries[name]
    if not shape or 0 in shape:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

  def get(self, name: str) -> np.ndarray:
    return np.array(self._mapped(name))

  def shape(self, name: str) -> tuple[int, ...]:
    self._mapped(name)  # named KeyError for a missing tensor
    return self._entries[name][2]

  def get_block(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Reads only `index` of the tensor: the pages of the mapped file it covers."""
    return np.array(self._mapped(name)[index])


def read_hf_config(directory: str, **overrides) -> DecoderConfig:
  with open(os.path.join(directory, "config.json")) as f:
    return registry.config_from_hf(json.load(f), **overrides)


def hf_tensors(cfg: DecoderConfig, params, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """Our param tree as (HF name, HF-layout array of `dtype`), one tensor at a time (laid out
  in fp32, then cast: ml_dtypes.bfloat16 rounds to nearest even)."""
  for spec in param_table(cfg):
    leaf = params
    for key in spec.path:
      leaf = leaf[key]
    leaf = np.asarray(leaf, np.float32)
    if spec.stacked:
      for i in range(cfg.num_layers):
        yield spec.hf_name.format(i=i), np.ascontiguousarray(spec.to_hf(leaf[i], cfg), dtype)
    else:
      yield spec.hf_name, np.ascontiguousarray(spec.to_hf(leaf, cfg), dtype)


def save_hf(
    directory: str,
    cfg: DecoderConfig,
    params,
    max_shard_bytes: int = 2 << 30,
    dtype=np.float32,
    config_extra: dict | None = None,
) -> None:
  """Writes config.json (plus `config_extra`: token ids, torch_dtype) and (sharded)
  safetensors of `dtype` that `transformers` loads."""
  os.makedirs(directory, exist_ok=True)
  fileio.write_json(
      os.path.join(directory, "config.json"), {**cfg.to_hf(), **(config_extra or {})}, indent=2
  )
  shards, current, size = [], {}, 0
  for name, w in hf_tensors(cfg, params, dtype):
    if current and size + w.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = w
    size += w.nbytes
  shards.append(current)
  if len(shards) == 1:
    safetensors.numpy.save_file(
        shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
    )
    return
  weight_map = {}
  for n, shard in enumerate(shards):
    fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  fileio.write_json(
      os.path.join(directory, "model.safetensors.index.json"),
      {"metadata": {}, "weight_map": weight_map},
      indent=2,
  )
