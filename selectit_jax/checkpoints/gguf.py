"""GGUF files (llama.cpp): config from metadata, tensors dequantized under HF names.

The family (registry, by `general.architecture`) names the tensors, reads the config and
undoes llama.cpp's changes to the values (LLaMA's Q/K row permutation, Gemma's 1 + w norms).
"""

from __future__ import annotations

import functools
import os
import re

import gguf
import numpy as np

from selectit_jax.models import registry
from selectit_jax.models.layers import DecoderConfig

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")  # Qwen2 has q/k/v biases


def _hf_name(name: str, layer_names: dict[str, str]) -> str | None:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _LAYER_RE.fullmatch(name)
  if m and m.group(2) in layer_names:
    return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
  return None


class _Reader(gguf.GGUFReader):
  """`gguf.GGUFReader` reading its fields through a plain-ndarray view of the file's memmap.

  The reader slices the file once or more per metadata value (Gemma 3's 262k-token
  vocabulary: ~1M slices), and a `np.memmap` slice costs ~4x an ndarray's in `__getitem__`
  and `__array_finalize__`: 11 s -> 3 s to open Gemma 3 on 2 cores. Same bytes, same views
  (the ndarray's base is the memmap, so tensors stay paged in lazily)."""

  def _get(self, offset, dtype, count=1, override_order=None):
    plain = self.__dict__.get("_plain")
    if plain is None:
      plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
    dtype, count = np.dtype(dtype), int(count)
    arr = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
    order = self.byte_order if override_order is None else override_order
    return arr.view(arr.dtype.newbyteorder(order))


def reader(path: str) -> gguf.GGUFReader:
  """The file's parsed reader, shared within a process: parsing the metadata is most of the
  time it takes to open a GGUF (Gemma 3's 262k-token vocabulary: ~3 s on 2 cores), and a
  run opens it twice, for the weights and for the tokenizer."""
  st = os.stat(path)
  return _reader(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
  del mtime_ns, size  # in the cache key: a rewritten file is read again
  return _Reader(path)


class GGUFSource:
  """Tensors of a GGUF file, dequantized to fp32, HF names and layout."""

  def __init__(self, path: str):
    self.path = path
    self.reader = reader(path)
    arch = self.field("general.architecture")
    try:
      self.family = registry.for_gguf(arch)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    self._tensors = {}
    for t in self.reader.tensors:
      hf = _hf_name(t.name, self.family.gguf_layer_names)
      if hf is None:
        raise ValueError(f"{path}: unknown GGUF tensor {t.name!r}")
      self._tensors[hf] = t

  def field(self, key: str, default=None):
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  def config(self, **overrides) -> DecoderConfig:
    return self.family.config_class.from_gguf(self, **overrides)

  def keys(self) -> set[str]:
    return set(self._tensors)

  def get(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise KeyError(f"{self.path}: no tensor for {name!r}")
    t = self._tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    return self.family.gguf_tensor(name, w, self)
