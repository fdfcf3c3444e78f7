"""Per-device memory of a scoring or training step, and whether it fits a device.

Everything is abstract (shapes, never arrays): `plan` runs on one host of a pod and must not
open an accelerator. Parts, per device:
  params      each device's block of every weight (fsdp × tensor sharded, data replicated);
  gathered    one layer's weights in the compute dtype, gathered over fsdp (two: XLA
              prefetches the next);
  scoring     the layer carry, rotary tables and mask, the read-out logits, and the larger
              of the attention as it runs (every query block's fp32 scores, costs.py) and
              the MLP (`costs.scoring_activation_bytes`);
  training    fp32 master weights, AdamW's two moments, gradients (accumulator + micro-batch),
              saved residuals (all layers, or each layer's input under remat) and one
              layer's backward (`costs.train_activation_bytes`);
  fragmentation  10 % of the temporaries (XLA's arena holes).
tests/test_memory.py holds the estimates to within 25 % of `compiled.memory_analysis()`.
A run must fit within `headroom` (default 90 %) of what the device lets a program use
(`devices.capacity`).
"""

from __future__ import annotations

import dataclasses
import functools
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
from selectit_jax.models.layers import remat_mode
from selectit_jax.training import loss as loss_lib

# XLA packs a step's temporaries into one arena by lifetime; buffers of unequal sizes and
# lifetimes leave holes, so the arena exceeds the live peak: 0-40 % on XLA:CPU for the
# rating and training steps of tests/test_memory.py. Charged on everything but the
# arguments (weights, optimizer state, inputs), which XLA allocates apart.
FRAGMENTATION = 0.10
_ARGUMENTS = ("params", "optimizer", "inputs")


def _with_fragmentation(parts: dict[str, int]) -> dict[str, int]:
  temps = sum(v for k, v in parts.items() if k not in _ARGUMENTS)
  return dict(parts, fragmentation=int(FRAGMENTATION * temps))


@dataclasses.dataclass
class Estimate:
  """Bytes per device by part (`parts`, in table order) for `rows_per_device` rows of
  `length` tokens."""

  parts: dict[str, int]
  rows_per_device: int
  length: int

  @property
  def params(self) -> int:
    return self.parts["params"]

  @property
  def total(self) -> int:
    return sum(self.parts.values())


def _bytes(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def param_bytes(cfg: DecoderConfig, mesh_sizes: dict[str, int], dtype=None) -> int:
  """Bytes of one device's block of every weight (in `dtype`, default the config's
  param_dtype). Raises the sharding module's error when a weight does not divide the mesh."""
  sizes = tuple(int(mesh_sizes[a]) for a in sharding.MESH_AXES)
  return _param_bytes(cfg, sizes, str(jnp.dtype(dtype or cfg.param_dtype)))


@functools.lru_cache(maxsize=64)
def _param_bytes(cfg: DecoderConfig, sizes: tuple[int, ...], dtype: str) -> int:
  # The jnp attention path for the shapes (they are the same for every kernel): choosing a
  # kernel asks jax for the platform, which would start a backend (`plan` must not).
  if hasattr(cfg, "attention"):
    cfg = dataclasses.replace(cfg, attention="xla")
  abstract = checkpoints.param_shapes(cfg)["params"]
  specs = sharding.mesh_specs(abstract)
  mesh_sizes = dict(zip(sharding.MESH_AXES, sizes))
  total = 0
  flat_shapes = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
  for (path, sds), spec in zip(
      flat_shapes,
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
  ):
    block = sharding.shard_shape(jax.tree_util.keystr(path), sds.shape, spec, mesh_sizes)
    total += math.prod(block) * _bytes(dtype)
  return total


def fused_attention(cfg: DecoderConfig, device: str, num_keys: int) -> bool:
  """Whether the step runs a flash kernel on `device` (no scores materialised): the config's
  `attention` as models/attention.py resolves it there (auto: splash on a TPU, Pallas on a
  GPU, jnp on a CPU), except where Gemma's sliding window can hide keys (the jnp path)."""
  name = getattr(cfg, "attention", "xla")
  if device == "cpu" or name == "xla":
    return False
  window = getattr(cfg, "sliding_window", None)
  local = any(getattr(cfg, "local_layers", ()))
  return not (local and window is not None and num_keys > window)


def rows_per_device(batch_size: int, mesh_sizes: dict[str, int], what="engine.batch_size") -> int:
  shards = sharding.row_shards(mesh_sizes)
  if batch_size % shards:
    raise ValueError(f"{what}={batch_size} is not a multiple of the mesh's data×fsdp={shards}")
  return batch_size // shards


def gathered_bytes(cfg: DecoderConfig, mesh_sizes: dict[str, int]) -> int:
  """One layer's weights in the compute dtype, all-gathered over fsdp (still split over
  tensor); two live at once (XLA prefetches the next). Without fsdp the cast copy is the
  only extra, when the dtypes differ."""
  if mesh_sizes["fsdp"] == 1 and _bytes(cfg.param_dtype) == _bytes(cfg.dtype):
    return 0
  return 2 * costs.layer_matmul_params(cfg) // mesh_sizes["tensor"] * _bytes(cfg.dtype)


def estimate(
    cfg: DecoderConfig,
    mesh_sizes: dict[str, int],
    batch_size: int,
    length: int,
    segments: int = 1,
    prefix: int = 0,
    prompts: int = 1,
    fused: bool = False,
) -> Estimate:
  """Per-device bytes of one rating step of [batch_size, length] on a mesh of these sizes,
  rows continuing a cached prefix of `prefix` tokens (one per prompt, replicated).
  Raises the sharding module's error when a weight does not divide the mesh."""
  b = rows_per_device(batch_size, mesh_sizes)
  tp = mesh_sizes["tensor"]
  acts = costs.scoring_activation_bytes(cfg, b, length, prefix, segments, tp, fused)
  # The step's arguments besides the weights: tokens, segments, positions [b, t] int32,
  # the read-out index [b, segments] and the prefix table (k, v per layer and prompt).
  kv = max(cfg.num_kv_heads // tp, 1)
  table = 2 * cfg.num_layers * prompts * kv * prefix * cfg.head_dim * _bytes(cfg.dtype)
  inputs = 4 * b * (3 * length + segments + 1) + table + prompts * prefix
  parts = dict(
      params=param_bytes(cfg, mesh_sizes),
      gathered=gathered_bytes(cfg, mesh_sizes),
      inputs=inputs,
      activations=acts["carry"] + acts["head"],
      layer=acts["layer"],
  )
  return Estimate(_with_fragmentation(parts), b, length)


def train_estimate(
    cfg: DecoderConfig,
    mesh_sizes: dict[str, int],
    micro_batch_size: int,
    length: int,
    accumulation: int = 1,
    remat: bool | None = None,
    fused: bool = False,
    loss_chunk: int = loss_lib.DEFAULT_CHUNK,
) -> Estimate:
  """Per-device bytes of one training step (`training/step.make_train_step`): fp32 master
  weights, AdamW's two moments and the gradients sharded like the params (FSDP over
  `embed`, tensor over heads/mlp/vocab); the gradient accumulator and one micro-batch's
  gradients; one layer's weights cast (and gathered over fsdp) to the compute dtype, and the
  head's; the global batch's token arrays; one micro-batch's activations."""
  rows = rows_per_device(micro_batch_size, mesh_sizes, "train.micro_batch_size")
  tp = mesh_sizes["tensor"]
  params = param_bytes(cfg, mesh_sizes)
  moments = 2 * param_bytes(cfg, mesh_sizes, jnp.float32)
  grads = param_bytes(cfg, mesh_sizes, jnp.float32)
  chunk = loss_lib.chunk_size(length, loss_chunk)
  acts = costs.train_activation_bytes(cfg, rows, length, tp, remat, fused, chunk)
  layer_copies = gathered_bytes(cfg, mesh_sizes)
  if remat_mode(cfg.remat if remat is None else remat) == "none":
    # no remat: the backward reads every layer's cast/gathered weights, kept from the forward
    acts["saved"] += max(cfg.num_layers - 2, 0) * layer_copies // 2  # 2 are in `gathered`
  head_cast = cfg.hidden_size * cfg.vocab_size // tp * _bytes(cfg.dtype)
  if not layer_copies:
    head_cast = 0  # neither gathered nor cast: the head multiplies the stored weights
  parts = dict(
      params=params,
      optimizer=moments,
      gradients=grads * (2 if accumulation > 1 else 1),
      gathered=layer_copies + head_cast,
      inputs=5 * 4 * accumulation * rows * length,
      saved=acts["saved"] + acts["shared"],
      backward=max(acts["backward"], acts["head"]),
  )
  return Estimate(_with_fragmentation(parts), rows, length)


def arch(config, model_path: str = "") -> DecoderConfig:
  """The architecture: the checkpoint's own when it is here, else config.model.arch (HF
  config.json fields), so runs can be planned before the weights are downloaded. dtypes
  'auto' resolve for config.memory.device's platform when it is set, else this backend's."""
  device = (config.get("memory") or {}).get("device", "")
  config = devices.resolve_dtypes(config, devices.platform_of(device) if device else None)
  overrides = dict(
      dtype=config.model.dtype,
      param_dtype=config.model.param_dtype,
      attention=(config.get("engine") or config.model).get("attention", "auto"),
  )
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


def largest_rows(fits_with, limit: int = 4096) -> int:
  """The most rows per device (a power of two up to `limit`) for which `fits_with(rows)`
  holds; 0 if not even one row fits."""
  rows = 0
  while rows < limit and fits_with(max(2 * rows, 1)):
    rows = max(2 * rows, 1)
  return rows


# Table labels of the estimate's parts.
_LABELS = {
    "params": "parameters",
    "optimizer": "AdamW moments (fp32, 2 per weight)",
    "gradients": "gradients (fp32; accumulator + micro-batch)",
    "gathered": "gathered weights (one layer x2: fsdp all-gather / dtype cast)",
    "inputs": "inputs (token arrays, prefix cache)",
    "activations": "activations (layer carry, rotary tables, mask, read-out logits)",
    "layer": "layer working set (the attention or the MLP, the larger)",
    "saved": "saved for the backward (per layer; with remat only its input)",
    "backward": "backward working set (one layer, or the loss's vocabulary chunk)",
    "fragmentation": f"allocator fragmentation ({FRAGMENTATION:.0%} of temporaries)",
}


def report(
    est: Estimate,
    cfg: DecoderConfig,
    mesh_sizes: dict[str, int],
    what: str,
    device: str,
    local_devices: int = 1,
    headroom: float = 0.9,
) -> tuple[bool, list[str]]:
  """(fits, lines): the estimate's table against the device's usable memory; `what`
  describes the step (batch, length, tokens)."""
  cap, desc = devices.capacity(device, local_devices)
  budget = int(cap * headroom)
  fits = est.total <= budget
  g = lambda x: f"{x / devices.GiB:8.2f} GiB"
  lines = [
      f"model: {costs.num_params(cfg) / 1e9:.2f}B params, {cfg.param_dtype} weights, "
      f"{cfg.dtype} activations" + (f", remat {cfg.remat}" if cfg.remat != "none" else ""),
      f"mesh: data={mesh_sizes['data']} fsdp={mesh_sizes['fsdp']} tensor={mesh_sizes['tensor']} "
      f"({math.prod(mesh_sizes.values())} devices); {what}",
  ]
  lines += [f"  {g(v)}  {_LABELS[k]}" for k, v in est.parts.items() if v]
  lines.append(
      f"  {g(est.total)}  total per device, of {g(cap)} usable on {desc} "
      f"(budget {headroom:.0%}: {g(budget)}) -> {'fits' if fits else 'DOES NOT FIT'}"
  )
  return fits, lines


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
  """(fits, lines) for the worst-case rating step; lines say what to change when it does
  not fit. Rows are planned at the longest bucket with no cached prefix: a row and its
  prompt's shared prefix together never exceed max_tokens, so this bounds both."""
  fused = fused_attention(cfg, device, length)
  est = estimate(cfg, mesh_sizes, batch_size, length, segments, fused=fused)
  what = (
      f"batch {batch_size} ({est.rows_per_device} rows/device) x length {length}: "
      f"{batch_size * length:,} tokens per step; attention: "
      + ("flash kernel" if fused else "jnp query blocks")
  )
  fits, lines = report(est, cfg, mesh_sizes, what, device, local_devices, headroom)
  budget = int(devices.capacity(device, local_devices)[0] * headroom)
  shards = sharding.row_shards(mesh_sizes)
  rows = largest_rows(
      lambda r: estimate(cfg, mesh_sizes, r * shards, length, segments, fused=fused).total <= budget
  )
  if rows:
    lines.append(
        f"  largest batch that fits: {rows} rows/device = engine.batch_size {rows * shards}"
    )
  if not fits:
    lines += ["  to fit: " + s for s in advice(est, budget, mesh_sizes, batch_size)]
  return fits, lines


def advice(
    est: Estimate,
    budget: int,
    mesh_sizes: dict[str, int],
    batch_size: int,
    knobs: tuple[str, str] = ("engine.batch_size", "engine.max_tokens"),
) -> list[str]:
  """What to change: the sharding when the weights (and optimizer state) crowd the device,
  the batch or length (`knobs`: their config names) when the activations do."""
  out = []
  fixed = est.params + est.parts.get("gathered", 0) + est.parts.get("optimizer", 0)
  if fixed > budget * 0.7:
    need = math.ceil(fixed / max(budget * 0.6, 1))
    out.append(
        f"shard the weights further: raise mesh.fsdp (and/or mesh.tensor) so "
        f"fsdp*tensor >= {need * mesh_sizes['fsdp'] * mesh_sizes['tensor']}, taking the "
        f"devices from mesh.data, or use more/larger devices; bf16 weights "
        f"(model.param_dtype) halve fp32 ones"
    )
  if 0 < budget - fixed < est.total - fixed:
    out.append(
        f"lower {knobs[0]} (now {batch_size}, {est.rows_per_device} rows per device) or "
        f"{knobs[1]} (now {est.length}; the attention scores grow with its square)"
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


def _mesh_and_device(config) -> tuple[dict[str, int], str, int]:
  """(mesh sizes, device name, devices sharing one host's RAM) from the config alone: a
  -1 axis takes memory.num_devices, else the devices here (CPU: `plan` never opens an
  accelerator)."""
  mem = config.get("memory") or {}
  num_devices = mem.get("num_devices") or jax.device_count()
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  device = mem.get("device") or devices.detect(jax.devices()[0])
  local = 1 if device != "cpu" else jax.local_device_count()
  return sizes, device, local


def plan_config(config) -> tuple[bool, list[str]]:
  """The planner command: a scoring config's mesh, batch and longest bucket on its device,
  or (a config with a `train` section) one training step's."""
  if "train" in config:
    return plan_train_config(config)
  cfg = arch(config)
  sizes, device, local = _mesh_and_device(config)
  batch_size = sharding.effective_batch_size(config.engine.batch_size, sizes)
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


def plan_train_config(config) -> tuple[bool, list[str]]:
  """One training step (train.batch_size rows = accumulation x micro_batch_size, of
  data.max_length tokens) on the config's mesh and device."""
  cfg = arch(config)
  if config.model.get("remat") is not None:
    cfg = dataclasses.replace(cfg, remat=config.model.remat)
  sizes, device, local = _mesh_and_device(config)
  t = config.train
  batch, micro, length = int(t.batch_size), int(t.micro_batch_size), int(config.data.max_length)
  if batch % micro:
    raise ValueError(
        f"train.batch_size={batch} is not a multiple of train.micro_batch_size={micro}"
    )
  fused = fused_attention(cfg, device, length)
  chunk = loss_lib.configured_chunk(t)
  est = train_estimate(cfg, sizes, micro, length, batch // micro, fused=fused, loss_chunk=chunk)
  what = (
      f"batch {batch} = {batch // micro} x micro {micro} ({est.rows_per_device} rows/device) "
      f"x length {length}: {batch * length:,} tokens per step; attention: "
      + ("flash kernel" if fused else "jnp query blocks")
  )
  mem = config.get("memory") or {}
  headroom = mem.get("headroom", 0.9)
  fits, lines = report(est, cfg, sizes, what, device, local, headroom)
  budget = int(devices.capacity(device, local)[0] * headroom)
  shards = sharding.row_shards(sizes)
  rows = largest_rows(
      lambda r: train_estimate(
          cfg, sizes, r * shards, length, batch // micro, fused=fused, loss_chunk=chunk
      ).total
      <= budget
  )
  if rows:
    lines.append(
        f"  largest micro-batch that fits: {rows} rows/device = train.micro_batch_size "
        f"{rows * shards}"
    )
  if not fits:
    knobs = ("train.micro_batch_size", "data.max_length")
    tips = advice(est, budget, sizes, micro, knobs)
    if cfg.remat != "full":
      tips.append(
          "model.remat=full keeps one [rows, T, d] input per layer instead of its residuals"
      )
    lines += ["  to fit: " + tip for tip in tips]
  return fits, lines


def batch_note(configured: int, effective: int, mesh_sizes) -> str:
  return (
      f"note: engine.batch_size={configured} rounded up to {effective}, a multiple of the "
      f"mesh's data×fsdp={sharding.row_shards(mesh_sizes)} (batch_size is global)"
  )
