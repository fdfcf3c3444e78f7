"""Per-device memory estimate of a scoring run, and whether it fits a device.

Forward only (no gradients), layers under `nn.scan`, so live memory per device is:
  params      each device's block of every weight (fsdp × tensor sharded, data replicated);
  gathered    one layer's weights all-gathered over fsdp (2 layers: XLA prefetches the next);
  activations the residual stream, q/k/v and the SwiGLU intermediates of one layer for the
              device's rows (batch / (data×fsdp)), heads and mlp split over tensor;
  attention   the [rows, heads/tensor, T, T] fp32 scores and probabilities plus the mask
              (plain attention materialises them: the term that grows with T²).
Rows are counted at the full `max_tokens`, which bounds a row plus its shared prompt prefix;
the prefixes' own keys/values (prompts × layers × ~50 tokens, replicated) are a few MB
(~40 MB for 70B with 5 prompts) and not counted. Estimates are upper-bound style; XLA reuses
buffers, but its own workspace is not counted, so a run must fit within `headroom` (default
90%) of the device.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.models import costs
from selectit_jax.parallel import devices
from selectit_jax.parallel import sharding
from selectit_jax.models import registry
from selectit_jax.models.layers import DecoderConfig


@dataclasses.dataclass
class Estimate:
  params: int
  gathered: int
  activations: int
  attention: int
  rows_per_device: int
  length: int

  @property
  def total(self) -> int:
    return self.params + self.gathered + self.activations + self.attention


def _bytes(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def estimate(
    cfg: DecoderConfig, mesh_sizes: dict[str, int], batch_size: int, length: int, segments: int = 1
) -> Estimate:
  """Per-device bytes for one rating step of [batch_size, length] on a mesh of these sizes.
  Raises the sharding module's error when a weight does not divide the mesh."""
  abstract = checkpoints.param_shapes(cfg)["params"]
  specs = sharding.mesh_specs(abstract)
  shapes = nn.unbox(abstract)
  pb, ab = _bytes(cfg.param_dtype), _bytes(cfg.dtype)
  params = 0
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, sds), spec in zip(
      flat_shapes,
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
  ):
    block = sharding.shard_shape(jax.tree_util.keystr(path), sds.shape, spec, mesh_sizes)
    params += math.prod(block) * pb
  tp, fsdp = mesh_sizes["tensor"], mesh_sizes["fsdp"]
  row_shards = mesh_sizes["data"] * fsdp
  if batch_size % row_shards:
    raise ValueError(
        f"engine.batch_size={batch_size} is not a multiple of the mesh's " f"data×fsdp={row_shards}"
    )
  b, t = batch_size // row_shards, length
  d, h, kv, hd, f = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.intermediate_size,
  )
  # One layer's weights in compute dtype, gathered over fsdp (still split over tensor);
  # two live at once. Without fsdp the cast copy is the only extra (when dtypes differ).
  layer = costs.layer_matmul_params(cfg) // tp
  gathered = 2 * layer * ab if (fsdp > 1 or pb != ab) else 0
  # Residual + normed + attention out + mlp out (d), q/k/v, gate/up/product (f), fp32 RoPE.
  per_token = (4 * d + (h + 2 * kv) * hd // tp + 3 * f // tp) * ab + 2 * (h + kv) * hd // tp * 4
  # + fp32 logits at each packed text's last token (`segments` per row).
  activations = b * t * per_token + b * segments * cfg.vocab_size // tp * 4 * 2
  # fp32 scores and masked scores, probabilities in the compute dtype, bool mask.
  attention = b * (h // tp) * t * t * (4 + 4 + ab) + b * t * t
  return Estimate(params, gathered, activations, attention, b, t)


def arch(config, model_path: str = "") -> DecoderConfig:
  """The architecture: the checkpoint's own when it is here, else config.model.arch (HF
  config.json fields), so runs can be planned before the weights are downloaded. dtypes
  'auto' resolve for config.memory.device's platform when it is set, else this backend's."""
  device = config.memory.get("device", "")
  config = devices.resolve_dtypes(config, devices.platform_of(device) if device else None)
  overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  path = model_path or config.model.path
  if not path and not config.model.get("arch"):
    path = assets.model_path(config.model)
  if path and os.path.exists(path):
    _, cfg = checkpoints.tensor_source(path)
    return dataclasses.replace(cfg, **overrides)
  if config.model.get("arch"):
    return registry.config_from_hf(config.model.arch.to_dict(), **overrides)
  raise ValueError(f"model path {path!r} does not exist and the config has no model.arch")


def max_length(config) -> int:
  """The longest bucket a run can compile: max_tokens rounded up to bucket_multiple."""
  m = config.engine.bucket_multiple
  return -(-config.engine.max_tokens // m) * m


def fit_lines(
    cfg: DecoderConfig,
    mesh_sizes: dict[str, int],
    batch_size: int,
    length: int,
    device: str,
    local_devices: int = 1,
    headroom: float = 0.9,
    segments: int = 1,
) -> tuple[bool, list[str]]:
  """(fits, lines) for the worst-case step; lines say what to change when it does not fit."""
  est = estimate(cfg, mesh_sizes, batch_size, length, segments)
  cap, desc = devices.capacity(device, local_devices)
  budget = int(cap * headroom)
  fits = est.total <= budget
  g = lambda x: f"{x / devices.GiB:8.2f} GiB"
  lines = [
      f"model: {costs.num_params(cfg) / 1e9:.2f}B params, {cfg.param_dtype} weights, "
      f"{cfg.dtype} activations",
      f"mesh: data={mesh_sizes['data']} fsdp={mesh_sizes['fsdp']} tensor={mesh_sizes['tensor']} "
      f"({math.prod(mesh_sizes.values())} devices); batch {batch_size} "
      f"({est.rows_per_device} rows/device) x length {length}",
      f"  parameters       {g(est.params)}",
      f"  gathered weights {g(est.gathered)}  (one layer x2, fsdp all-gather / dtype cast)",
      f"  activations      {g(est.activations)}",
      f"  attention        {g(est.attention)}  ([rows, heads/tensor, T, T] scores)",
      f"  total            {g(est.total)}  of {g(cap)} on {desc} "
      f"(budget {headroom:.0%}: {g(budget)}) -> {'fits' if fits else 'DOES NOT FIT'}",
  ]
  if not fits:
    lines += ["  to fit: " + s for s in advice(est, budget, mesh_sizes, batch_size)]
  return fits, lines


def advice(est: Estimate, budget: int, mesh_sizes: dict[str, int], batch_size: int) -> list[str]:
  out = []
  if est.params + est.gathered > budget * 0.7:
    need = math.ceil(est.params / max(budget * 0.6 - est.gathered, 1))
    out.append(
        f"shard the weights further: raise mesh.fsdp (and/or mesh.tensor) so "
        f"fsdp*tensor >= {need * mesh_sizes['fsdp'] * mesh_sizes['tensor']}, taking the "
        f"devices from mesh.data, or use more/larger devices; bf16 weights "
        f"(model.param_dtype) halve fp32 ones"
    )
  if 0 < budget - est.params - est.gathered < est.activations + est.attention:
    out.append(
        f"lower engine.batch_size (now {batch_size}, {est.rows_per_device} rows per "
        f"device) or engine.max_tokens (now {est.length}; attention grows with its "
        f"square)"
    )
  return out or ["use a device with more memory"]


def check_config(config, model_path: str, mesh) -> None:
  """The score command's pre-flight check: raises (config.memory.check) or warns when the
  configured batch and longest bucket will not fit the mesh's devices."""
  cfg = arch(config, model_path)
  # The batch the run will use (score rounds it up to a multiple of data×fsdp too).
  batch_size = sharding.effective_batch_size(config.engine.batch_size, dict(mesh.shape))
  device = config.memory.device or devices.detect(mesh.devices.flat[0])
  local = sum(d.process_index == mesh.devices.flat[0].process_index for d in mesh.devices.flat)
  fits, lines = fit_lines(
      cfg,
      dict(mesh.shape),
      batch_size,
      max_length(config),
      device,
      local,
      config.memory.headroom,
      config.engine.max_segments,
  )
  for line in lines:
    logging.info("memory: %s", line)
  if not fits:
    # The summary comes last: the command prints it as its `error:` line, the table above it.
    msg = "\n".join(lines) + f"\nthis run will not fit in the memory of {device}"
    if config.memory.check:
      raise MemoryError(msg + " (set --config.memory.check=False to run anyway)")
    logging.warning("%s", msg)


def plan_config(config) -> tuple[bool, list[str]]:
  """The planner command: the config's mesh, batch and longest bucket on its device."""
  cfg = arch(config)
  num_devices = config.memory.get("num_devices") or jax.device_count()
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  batch_size = sharding.effective_batch_size(config.engine.batch_size, sizes)
  device = config.memory.device or devices.detect(jax.devices()[0])
  local = 1 if device != "cpu" else jax.local_device_count()
  fits, lines = fit_lines(
      cfg,
      sizes,
      batch_size,
      max_length(config),
      device,
      local,
      config.memory.headroom,
      config.engine.max_segments,
  )
  if batch_size != config.engine.batch_size:
    lines.insert(0, batch_note(config.engine.batch_size, batch_size, sizes))
  return fits, lines


def batch_note(configured: int, effective: int, mesh_sizes) -> str:
  return (
      f"note: engine.batch_size={configured} rounded up to {effective}, a multiple of the "
      f"mesh's data×fsdp={sharding.row_shards(mesh_sizes)} (batch_size is global)"
  )
