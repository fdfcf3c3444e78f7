"""Loading LLaMA weights (HF safetensors or GGUF) into our param tree, optionally sharded."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selectit_jax.checkpoints import hf
from selectit_jax.checkpoints.fingerprints import fingerprint
from selectit_jax.parallel import sharding
from selectit_jax.models import registry
from selectit_jax.models.layers import DecoderConfig


@dataclasses.dataclass
class LoadedModel:
  config: DecoderConfig
  params: Any
  source_path: str
  fingerprint: str  # content hash of the weight files; part of every stored score's key

  @property
  def num_params(self) -> int:
    """θ of Eq. 5: the parameters of the loaded tree (tied embeddings counted once)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))


def tensor_source(path: str) -> tuple[hf.TensorSource, DecoderConfig]:
  """The tensor source and architecture of a GGUF file or HF checkpoint directory."""
  if os.path.isdir(path):
    return hf.SafetensorsSource(path), hf.read_hf_config(path)
  if path.endswith(".gguf"):
    # Imported here: the gguf wheel is needed for GGUF files only (bench_accel's random
    # weights run where it is not installed).
    from selectit_jax.checkpoints import gguf as gguf_lib  # noqa: PLC0415

    source = gguf_lib.GGUFSource(path)
    return source, source.config()
  raise ValueError(f"{path}: not a HF checkpoint directory or a .gguf file")


def param_shapes(cfg: DecoderConfig):
  """Abstract param tree (shapes, dtypes, logical-axis metadata) without allocating."""
  model = registry.build(cfg)
  # Abstract inputs too: a concrete array here would initialise a backend (`plan` must not).
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, t, t + 1), tokens)


def load_params(cfg: DecoderConfig, source: hf.TensorSource, shardings=None, workers: int = 0):
  """Reads every leaf from `source`, `workers` leaves at a time (0: up to 8, by the CPU
  count; both sources read memory-mapped files, so reads are independent); with `shardings`
  (a tree of `jax.sharding.Sharding` matching the params), each device's block is read on its
  own, so no process materialises more than the blocks its devices own plus one HF tensor
  per worker."""
  hf.check_complete(cfg, source)
  abstract = nn.unbox(param_shapes(cfg))["params"]
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))

  def read(spec):
    node = abstract
    for k in spec.path:
      node = node[k]
    shape = tuple(node.shape)
    leaf_sharding = _leaf(shardings, spec.path) if shardings is not None else None
    if leaf_sharding is None:
      return jax.device_put(hf.read_param(spec, source, cfg, shape, dtype))
    return jax.make_array_from_callback(
        shape,
        leaf_sharding,
        lambda index: hf.read_param(spec, source, cfg, shape, dtype, index),
    )

  specs = list(hf.param_table(cfg))
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    values = list(pool.map(read, specs))  # in order; a failed read raises here
  params = {}
  for spec, value in zip(specs, values):
    _set(params, spec.path, value)
  return params


def load_model(path: str, mesh=None, **config_overrides) -> LoadedModel:
  """Loads a GGUF file or HF checkpoint directory (config overrides: dtype, param_dtype...),
  placed on `mesh` by the logical-axis rules when one is given."""
  source, cfg = tensor_source(path)
  if config_overrides:
    cfg = dataclasses.replace(cfg, **config_overrides)
  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(param_shapes(cfg)["params"], mesh)
  params = load_params(cfg, source, shardings)
  return LoadedModel(cfg, params, path, fingerprint(path))


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
