"""The one place where logical axis names meet the device mesh."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights: FSDP over `embed`, Megatron-style tensor parallelism
# over heads / mlp / vocab. Activations: batch over data×fsdp, heads and mlp over tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
)


# A handful of rows that need not divide the batch axes (prefix prefills): run them replicated.
REPLICATED_ROWS_RULES = (("activation_batch", None),) + LOGICAL_AXIS_RULES


@contextlib.contextmanager
def activate(mesh: Mesh, rules: tuple[tuple[str, Any], ...] = LOGICAL_AXIS_RULES):
  """The mesh and axis rules every jit'd model call runs under. `jax.set_mesh`, not
  `with mesh:`: flax's with_logical_constraint reads the abstract mesh, which `with mesh:`
  leaves empty, so the activation constraints would silently do nothing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one axis may be -1 (all remaining devices)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
          f"divisible by {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"{num_devices} are present"
    )
  return tuple(sizes)


def row_shards(mesh_sizes) -> int:
  """Devices a batch's rows are split over: data×fsdp (`activation_batch`)."""
  return int(mesh_sizes["data"]) * int(mesh_sizes["fsdp"])


def effective_batch_size(batch_size: int, mesh_sizes) -> int:
  """engine.batch_size is global; a run on more row shards than it divides rounds it up to
  the next multiple of data×fsdp (never down: fewer rows per step would change no result,
  but a larger batch may not fit, which the memory check then says), so one config runs on
  one CPU device, 8 fake devices and a pod alike."""
  shards = row_shards(mesh_sizes)
  return -(-int(batch_size) // shards) * shards


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """All (global) devices as a (data, fsdp, tensor) mesh. On TPU the device order follows
  the physical torus (mesh_utils), so `tensor` neighbours share the fastest links; elsewhere,
  and whenever that fails, devices keep JAX's order (process-major: each process holds a
  contiguous block of the batch rows)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  grid = None
  if devices[0].platform == "tpu":
    try:
      from jax.experimental import mesh_utils  # noqa: PLC0415

      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = None
  if grid is None:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh):
  """NamedShardings for a tree of logical PartitionSpecs (or boxed abstract params)."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def param_shardings(abstract_params, mesh: Mesh):
  """NamedShardings of every param; fails naming the tensor whose size does not divide."""
  shardings = logical_to_sharding(abstract_params, mesh)
  shapes = nn.unbox(abstract_params)
  for (path, sds), sh in zip(
      jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings)
  ):
    check_divisible(jax.tree_util.keystr(path), sds.shape, sh)
  return shardings


def check_divisible(name: str, shape, sharding: NamedSharding) -> None:
  shard_shape(name, shape, sharding.spec, dict(sharding.mesh.shape))


def shard_shape(name: str, shape, spec, mesh_sizes: dict[str, int]) -> tuple[int, ...]:
  """Per-device block of `shape` under a mesh-axis PartitionSpec, given only the axis sizes
  (so the memory planner works for meshes this machine does not have)."""
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    if axes is None:
      out.append(dim)
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh_sizes[a] for a in axes)
    if dim % size:
      raise ValueError(
          f"{name}: dimension {dim} of shape {tuple(shape)} is not divisible by "
          f"mesh axes {axes} of size {size}; choose a mesh whose sizes divide it"
      )
    out.append(dim // size)
  return tuple(out)


def mesh_specs(abstract_params):
  """Mesh-axis PartitionSpecs of a boxed abstract param tree (no devices needed)."""
  specs = nn.get_partition_spec(abstract_params)
  return jax.tree.map(
      lambda s: nn.logical_to_mesh_axes(s, LOGICAL_AXIS_RULES),
      specs,
      is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over data×fsdp, everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_array(x: np.ndarray, sharding_: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full; each process places
  only the blocks of its own devices (works for one process and for pods alike)."""
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])
