"""Sharded loading, forward and rating probabilities equal the single-device ones on CPU
(8 fake devices, conftest), for several (data, fsdp, tensor) meshes; divisibility errors;
the memory planner; jax.distributed settings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import write_tiny_checkpoint
from selectit_jax.models import costs
from selectit_jax import checkpoints
from selectit_jax.parallel import distributed
from selectit_jax.scoring import engine
from selectit_jax.parallel import memory
from selectit_jax.parallel import sharding
from selectit_jax.models.llama import Llama

MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (1, 8, 1), (2, 1, 4)]
BATCH, LENGTH = 8, 24


def _mesh(shape, devices=None):
  return sharding.make_mesh(
      ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), devices
  )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  # 4 kv heads so tensor=4 divides them; vocab 400, hidden 64 divide 8.
  d = str(tmp_path_factory.mktemp("tiny_tp4"))
  write_tiny_checkpoint(d, num_kv_heads=4, tokenizer=False, max_shard_bytes=1 << 16)
  return d


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, LENGTH + 1, size=BATCH).astype(np.int32)
  tokens = rng.integers(3, 400, size=(BATCH, LENGTH)).astype(np.int32)
  tokens[np.arange(LENGTH)[None] >= lengths[:, None]] = 0
  return tokens, lengths


def _forward(model, mesh, tokens, lengths):
  llama = Llama(model.config)

  def fwd(params, tokens_bt, lengths_b):
    b, t = tokens_bt.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return llama.apply(
        {"params": params}, tokens_bt, pos, (pos < lengths_b[:, None]).astype(jnp.int32)
    )

  bs = sharding.batch_sharding(mesh)
  with sharding.activate(mesh):
    out = jax.jit(
        fwd,
        in_shardings=(jax.tree.map(lambda x: x.sharding, model.params), bs, bs),
        out_shardings=bs,
    )(model.params, sharding.global_array(tokens, bs), sharding.global_array(lengths, bs))
  return np.asarray(out)


def test_activation_constraints_reach_the_program(ckpt, batch):
  """Under `sharding.activate` the models' with_logical_constraint calls become sharding
  constraints in the lowered program (under a bare `with mesh:` flax drops them)."""
  mesh = _mesh((2, 2, 2))
  model = checkpoints.load_model(ckpt, mesh)
  llama = Llama(model.config)

  def fwd(params, tokens_bt):
    pos = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
    return llama.apply({"params": params}, tokens_bt, pos, jnp.ones_like(tokens_bt))

  with sharding.activate(mesh):
    text = jax.jit(fwd).lower(model.params, batch[0]).as_text()
  constraints = [l for l in text.splitlines() if "sharding_constraint" in l or "@Sharding" in l]
  # Per layer: the residual stream, q, the mlp hidden (scanned once) plus the final norm's input.
  assert len(constraints) >= 4, constraints
  assert any('"data", "fsdp"' in l or "{devices=[4" in l for l in constraints), constraints[:3]


# Two prompts' shared prefixes of different lengths; rows alternate between them.
PREFIXES = (tuple(range(20, 27)), tuple(range(40, 52)))


def _probs(model, mesh, tokens, lengths):
  scorer = engine.Scorer(model.config, model.params, np.arange(10, 15), mesh, BATCH, PREFIXES)
  pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), tokens.shape)
  rows = np.arange(BATCH)
  return scorer(
      engine.BatchArrays(
          tokens,
          (pos < lengths[:, None]).astype(np.int32),
          pos,
          (rows % 2).astype(np.int32),
          (lengths - 1)[:, None],
          rows,
      )
  )


@pytest.fixture(scope="module")
def reference(ckpt, batch):
  mesh = _mesh((1, 1, 1), jax.devices()[:1])
  model = checkpoints.load_model(ckpt, mesh)
  return _forward(model, mesh, *batch), _probs(model, mesh, *batch)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_equals_single_device(ckpt, batch, reference, shape):
  mesh = _mesh(shape)
  model = checkpoints.load_model(ckpt, mesh)
  # Every param is really split as the rules say: its device blocks have the planned shape.
  specs = sharding.mesh_specs(checkpoints.param_shapes(model.config)["params"])
  for path_leaf, spec in zip(
      jax.tree_util.tree_flatten_with_path(model.params)[0],
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
  ):
    path, leaf = path_leaf
    want = sharding.shard_shape(str(path), leaf.shape, spec, dict(mesh.shape))
    assert all(s.data.shape == want for s in leaf.addressable_shards), (path, spec)
  hidden_ref, (probs_ref, lse_ref) = reference
  np.testing.assert_allclose(_forward(model, mesh, *batch), hidden_ref, atol=1e-5, rtol=1e-5)
  probs, lse = _probs(model, mesh, *batch)
  np.testing.assert_allclose(probs, probs_ref, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=1e-6)


def test_memory_estimate_matches_loaded_param_bytes(ckpt):
  mesh = _mesh((1, 2, 4))
  model = checkpoints.load_model(ckpt, mesh)
  per_device = {}
  for leaf in jax.tree.leaves(model.params):
    for s in leaf.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  est = memory.estimate(model.config, dict(mesh.shape), BATCH, LENGTH)
  assert set(per_device.values()) == {est.params}


def test_indivisible_mesh_is_a_clear_error(ckpt):
  with pytest.raises(ValueError, match=r"not divisible by mesh axes \('tensor',\) of size 8"):
    checkpoints.load_model(ckpt, _mesh((1, 1, 8)))  # 4 heads over tensor=8
  with pytest.raises(ValueError, match="needs 6 devices, 8 are present"):
    _mesh((3, 2, 1))
  model = checkpoints.load_model(ckpt, _mesh((2, 4, 1)))
  with pytest.raises(ValueError, match="not a multiple of the mesh's data×fsdp=8"):
    engine.Scorer(model.config, model.params, np.arange(5), _mesh((2, 4, 1)), 4)


@pytest.mark.parametrize(
    "size,slice_,fits",
    [
        ("7b", "v5e-8", True),
        ("13b", "v4-32", True),
        ("70b", "v5p-64", True),
        ("70b", "v5e-8", False),
    ],
)
def test_planner_llama2_presets(size, slice_, fits):
  import importlib

  config = importlib.import_module(f"configs.llama2_{size}").get_config(slice_)
  ok, lines = memory.plan_config(config)
  assert ok == fits, "\n".join(lines)
  assert ("DOES NOT FIT" in lines[-1] or "to fit" in "\n".join(lines)) != fits


def test_planner_llama2_70b_numbers():
  """Weights: 68.98e9 bf16 params over fsdp=8 on v5p-64 (data=4)."""
  from configs import llama2_70b

  config = llama2_70b.get_config("v5p-64")
  cfg = memory.arch(config)
  est = memory.estimate(cfg, dict(data=4, fsdp=8, tensor=1), 64, 2048)
  assert abs(est.params - costs.num_params(cfg) * 2 / 8) < 1e6
  with pytest.raises(ValueError, match="num_kv|not divisible"):
    memory.estimate(cfg, dict(data=1, fsdp=2, tensor=16), 64, 2048)  # 8 kv heads


def test_score_refuses_a_run_that_does_not_fit(ckpt):
  from configs import common

  config = common.score_config()
  config.model.path = ckpt
  config.engine.batch_size = 8
  config.engine.max_tokens = 1 << 16  # all blocks' fp32 scores ~[1, 4, 64k, 32k] on a "v5e"
  config.engine.attention = "xla"  # the jnp path's scores (a flash kernel keeps none)
  config.memory.device = "v5e"
  with pytest.raises(MemoryError, match="engine.max_tokens"):
    memory.check_config(config, ckpt, _mesh((8, 1, 1)))


def test_distributed_settings_from_config_then_env():
  env = {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "2",
  }
  cfg = ml_collections.ConfigDict(
      dict(initialize="auto", coordinator_address="", num_processes=-1, process_id=3)
  )
  assert distributed.settings(cfg, env) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
  )
  assert distributed.settings(cfg, {}) == dict(
      coordinator_address=None, num_processes=None, process_id=3
  )
  single = ml_collections.ConfigDict(
      dict(
          distributed=dict(
              initialize="auto", coordinator_address="", num_processes=-1, process_id=-1
          )
      )
  )
  assert distributed.initialize(single, environ={}) is False  # single host: no-op
  single.distributed.initialize = "never"
  assert distributed.initialize(single, environ=env) is False


def test_each_device_reads_only_its_block(ckpt, monkeypatch):
  from selectit_jax.checkpoints import hf

  reads = []
  monkeypatch.setattr(
      hf.SafetensorsSource, "get", lambda self, name: pytest.fail(f"whole tensor {name} read")
  )
  orig = hf.SafetensorsSource.get_block
  monkeypatch.setattr(
      hf.SafetensorsSource,
      "get_block",
      lambda self, name, index: reads.append(orig(self, name, index).size)
      or orig(self, name, index),
  )
  mesh = _mesh((1, 2, 4))
  model = checkpoints.load_model(ckpt, mesh)
  full = sum(x.size for x in jax.tree.leaves(model.params))
  assert max(reads) * 8 <= full  # no read bigger than one device's share of a leaf
  assert sum(reads) == sum(
      s.data.size for x in jax.tree.leaves(model.params) for s in x.addressable_shards
  )
