"""The scoring loop: the read-out step has no conditional in its compiled code and gives the
full forward's states at the read-out rows (both families); `Scorer.rate` keeps the next
batch in flight; shards are written off the loop, in order, whole."""

import os
import re
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_config
from selectit_jax import checkpoints
from selectit_jax.models.gemma3 import GLOBAL, LOCAL, Gemma3, Gemma3Config
from selectit_jax.models.llama import Llama
from selectit_jax.parallel import sharding
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine
from selectit_jax.scoring import store as store_lib

# Gemma with its last layer local (window 6 < the 24-token rows): the read-out layer must
# still see the sliding window.
GEMMA = Gemma3Config(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    sliding_window=6,
    layer_types=(LOCAL, GLOBAL, LOCAL),
    query_pre_attn_scalar=16,
    max_position_embeddings=64,
)
MODELS = {"llama": lambda: Llama(tiny_config(num_layers=3)), "gemma3": lambda: Gemma3(GEMMA)}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_readout_step_has_no_conditional_and_matches_the_full_forward(family):
  model = MODELS[family]()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.cfg.vocab_size, (2, 24)).astype(np.int32)
  segments = np.array([[1] * 14 + [2] * 8 + [0] * 2, [1] * 24], np.int32)
  positions = np.array([list(range(14)) + list(range(8)) + [0] * 2, list(range(24))], np.int32)
  readout = np.array([[13, 21], [23, 9]], np.int32)
  # Random weights by shape (compiling `init` would cost more than the test).
  shapes = jax.eval_shape(model.init, jax.random.key(1), tokens, positions, segments)
  params = jax.tree.map(
      lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), nn.meta.unbox(shapes["params"])
  )
  step = jax.jit(lambda p, *a: model.apply({"params": p}, *a, readout=readout))
  lowered = step.lower(params, tokens, positions, segments)
  compiled = lowered.compile()
  # The layers still run as one loop, with no branch in it or anywhere else.
  assert re.search(r"\bwhile\(", compiled.as_text())
  assert not re.search(r"stablehlo\.(case|if)\b", lowered.as_text())
  assert "conditional(" not in compiled.as_text()
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens, positions, segments))
  np.testing.assert_allclose(
      compiled(params, tokens, positions, segments),
      np.take_along_axis(full, readout[..., None], axis=1),
      atol=1e-6,
      rtol=0,
  )


def _rows(n, start=0):
  return [
      dict(
          sample_id=f"s{i}",
          sample_index=i,
          content_hash=f"c{i}",
          model="m",
          num_params=1,
          prompt_index=0,
          prompt_hash="p",
          probs=[0.1 * (i % 5)] * 5,
          logsumexp=1.0,
          num_tokens=3,
      )
      for i in range(start, start + n)
  ]


def test_shard_writer_writes_off_the_loop_in_order_and_stops_after_a_failure(tmp_path):
  store = store_lib.ScoreStore(str(tmp_path / "ok"))
  release = threading.Event()
  write = store.write_shard
  store.write_shard = lambda rows: release.wait(30) and write(rows)
  with store_lib.ShardWriter(store) as writer:
    writer.submit(_rows(2))
    writer.submit(_rows(2, 2))  # returns while the first write still waits
    assert not store.shard_paths()
    release.set()
    writer.submit(_rows(1, 4))
  assert store.read_table().column("sample_index").to_pylist() == [0, 1, 2, 3, 4]

  # A failed write: nothing after it is written, and the error reaches the loop.
  store = store_lib.ScoreStore(str(tmp_path / "failed"))
  calls, write = [], store.write_shard

  def failing(rows):
    calls.append(len(rows))
    if len(calls) == 2:
      raise OSError("disk full")
    return write(rows)

  store.write_shard = failing
  with pytest.raises(OSError, match="disk full"):
    with store_lib.ShardWriter(store) as writer:
      for start in range(0, 8, 2):
        writer.submit(_rows(2, start))
  assert store.read_table().column("sample_index").to_pylist() == [0, 1]

  # The loop fails: what was queued (finished batches) is still written, whole.
  store = store_lib.ScoreStore(str(tmp_path / "interrupted"))
  with pytest.raises(KeyboardInterrupt):
    with store_lib.ShardWriter(store) as writer:
      writer.submit(_rows(3))
      raise KeyboardInterrupt
  assert store.read_table().num_rows == 3


def test_rate_dispatches_the_next_batch_before_reading_one_back(tiny_checkpoint):
  model = checkpoints.load_model(tiny_checkpoint)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  scorer = engine.Scorer(model.config, model.params, np.arange(10, 15), mesh, 2)
  item = lambda i, n: batching.WorkItem(i, f"r{i}", f"c{i}", 0, "h", np.arange(3, 3 + n) + i)
  batches = batching.plan_batches([item(i, 5 + i) for i in range(6)], 2, [16])
  events, dispatch, fetch = [], scorer.dispatch, scorer.fetch
  scorer.dispatch = lambda rows: events.append(("dispatch", rows.tokens[0, 0])) or dispatch(rows)
  scorer.fetch = lambda rows, out: events.append(("fetch", rows.tokens[0, 0])) or fetch(rows, out)
  rated = list(scorer.rate(batches))
  firsts = [b.rows[0][0].ids[0] for b in batches]
  assert events == [
      ("dispatch", firsts[0]),
      ("dispatch", firsts[1]),
      ("fetch", firsts[0]),
      ("dispatch", firsts[2]),
      ("fetch", firsts[1]),
      ("fetch", firsts[2]),
  ]
  # Each batch keeps its own results.
  for out in rated:
    probs, lse = scorer(engine.pad_batch(out.batch, 2, 1, 0))
    np.testing.assert_array_equal(out.probs, probs)
    np.testing.assert_array_equal(out.logsumexp, lse)


_CACHE_CHILD = """
import sys
import jax, jax.numpy as jnp
from selectit_jax.scoring import engine
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None
)
engine.use_compilation_cache(sys.argv[1])
print(float(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((32, 32)))), len(hits))
"""


@pytest.mark.slow  # two subprocesses
def test_compilation_cache_serves_a_second_process(tmp_path):
  """`engine.compilation_cache_dir` (set by the score main): a second process finds the
  first one's compiled program in the cache dir."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # cache even a tiny program
      PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  cache = str(tmp_path / "cache")
  run = lambda: subprocess.run(
      [sys.executable, "-c", _CACHE_CHILD, cache], env=env, capture_output=True, text=True
  )
  first = run()
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stdout.split()[1] == "0" and os.listdir(cache)
  second = run()
  value, hits = second.stdout.split()
  assert value == first.stdout.split()[0] and int(hits) >= 1, second.stderr[-2000:]
