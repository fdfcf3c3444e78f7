"""Attention backends (models/attention.py) against the jnp path on CPU: the Pallas kernels in
interpret mode, cuDNN's wiring through its xla twin; packed, prefixed, GQA rows."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selectit_jax import checkpoints
from selectit_jax import errors
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.models import attention
from selectit_jax.models import gemma3
from selectit_jax.models import layers
from selectit_jax.models import llama
from selectit_jax.parallel import sharding
from selectit_jax.scoring import batching
from tests import test_engine

B, KV, G, T, P, HD = 2, 2, 2, 24, 8, 16
SCALE = HD**-0.5
# The Pallas kernels here: interpreted on CPU, natively on their own platform.
KERNELS = [k for k in ("pallas_gpu", "splash") if jax.default_backend() in attention._PLATFORMS[k]]


def _rows():
  """Two rows: three packed texts then padding, and one text; prefixes of 5 and 0 keys."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, KV, G, T, HD)).astype(np.float32)
  k, v = (rng.normal(size=(B, KV, T, HD)).astype(np.float32) for _ in range(2))
  pk, pv = (rng.normal(size=(B, KV, P, HD)).astype(np.float32) for _ in range(2))
  segments = np.zeros((B, T), np.int32)
  segments[0, :7], segments[0, 7:15], segments[0, 15:20] = 1, 2, 3
  segments[1, :T] = 1
  valid = np.zeros((B, P), bool)
  valid[0, :5] = True
  return tuple(map(jnp.asarray, (q, k, v, pk, pv, segments, valid)))


@jax.jit
def _dense(q, k, v, pk, pv, segments, valid):
  m = attention.Segments(segments, jnp.zeros_like(segments), valid)
  kk, vv = jnp.concatenate([pk, k], 2), jnp.concatenate([pv, v], 2)
  return attention.attend(q, kk, vv, attention.dense_mask(m, None), SCALE)


@functools.partial(jax.jit, static_argnums=0)
def _fused(backend, q, k, v, pk, pv, segments, valid):
  m = attention.Segments(segments, jnp.zeros_like(segments), valid)
  return attention.fused(backend, q, (k, v), (pk, pv), m, SCALE)


def _real(x, segments):
  return np.asarray(x)[np.broadcast_to(np.asarray(segments)[:, None, None] != 0, x.shape[:4])]


@pytest.mark.parametrize("backend", ["xla", "dot_product_xla"] + KERNELS)
def test_prefix_and_own_keys_merged_by_lse_match_the_dense_path(backend):
  """`xla` is the merge with jnp halves; `dot_product_xla` is cuDNN's call (masks, key
  lengths, layouts) with implementation="xla"; the Pallas kernels run interpreted."""
  rows = _rows()
  want = _dense(*rows)
  got = _fused(backend, *rows)
  np.testing.assert_allclose(_real(got, rows[5]), _real(want, rows[5]), atol=2e-6, rtol=1e-5)
  if backend in ("pallas_gpu", "splash"):  # own keys alone: in the engine's prefill
    return
  # The merge is needed: own keys alone miss the prefix of row 0.
  alone = _fused(backend, *rows[:3], rows[3][:, :, :0], rows[4][:, :, :0], rows[5], rows[6][:, :0])
  assert np.abs(_real(alone, rows[5]) - _real(want, rows[5])).max() > 1e-2
  np.testing.assert_allclose(  # row 1 has no prefix keys: the same
      np.asarray(alone)[1], np.asarray(want)[1], atol=2e-6, rtol=1e-5
  )


def test_gradients_match_the_dense_path():
  """Through the merge (xla: autodiff of the lse; the kernels: the custom backward) and
  through the kernels' own backward (no prefix: one kernel call), on real rows."""
  q, k, v, pk, pv, segments, valid = _rows()
  real = jnp.asarray(segments != 0)[:, None, None, :, None]
  weights = jax.random.normal(jax.random.key(1), q.shape)
  grad = lambda f: jax.jit(
      jax.grad(lambda *a: jnp.sum(jnp.where(real, f(*a), 0) * weights), argnums=(0, 1, 2))
  )(q, k, v)
  no_prefix = attention.Segments(segments, segments)
  want = {
      True: grad(lambda q, k, v: _dense(q, k, v, pk, pv, segments, valid)),
      False: grad(lambda q, k, v: _dense(q, k, v, pk, pv, segments, jnp.zeros_like(valid))),
  }
  # (splash's own backward is left to its library's tests: interpreted it costs ~4 s more.)
  cases = (("xla", True), ("pallas_gpu", True), ("pallas_gpu", False))
  for name, prefixed in (c for c in cases if c[0] in ["xla"] + KERNELS):
    if prefixed:
      got = grad(lambda q, k, v: _fused(name, q, k, v, pk, pv, segments, valid))
    else:
      got = grad(lambda q, k, v: attention.fused(name, q, (k, v), None, no_prefix, SCALE))
    for g, w in zip(got, want[prefixed]):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
  return checkpoints.load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)


def test_engine_probabilities_match_the_jnp_path(tiny):
  """The Scorer on packed rows (up to 4 texts) after the prompts' shared prefixes (three
  lengths in one batch), GQA: P("1".."5") within 1e-5 of the jnp path, each kernel."""
  model, tok = tiny
  items = test_engine._random_items(tok, 3)
  prefixes = batching.shared_prefixes(items)
  assert len({len(p) for p in prefixes}) == 3
  cfg = model.config
  assert cfg.num_kv_heads < cfg.num_heads
  results = {}
  for name in ["xla"] + KERNELS:
    kernel_model = dataclasses.replace(model, config=dataclasses.replace(cfg, attention=name))
    results[name], _ = test_engine._score(kernel_model, tok, items, 4, [256], prefixes, 4)
  for name in KERNELS:
    assert results[name].keys() == results["xla"].keys()
    for key, (p, lse) in results["xla"].items():
      np.testing.assert_allclose(results[name][key][0], p, atol=1e-5, rtol=0, err_msg=name)
      np.testing.assert_allclose(results[name][key][1], lse, atol=1e-4, rtol=0, err_msg=name)


def _gemma(window: int):
  return gemma3.Gemma3Config(
      vocab_size=50,
      hidden_size=32,
      intermediate_size=48,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      sliding_window=window,
      sliding_window_pattern=2,  # local, global
      query_pre_attn_scalar=24,  # Gemma's query scaling, not head_dim^-0.5
  )


@functools.cache
def _gemma_rows():
  """Two packed rows (t = 16) after prefixes of 6 and 3 of 8 keys; the model's weights."""
  segments = np.array([[1] * 5 + [2] * 9 + [0] * 2, [1] * 16], np.int32)
  positions = np.array([list(range(5)) + list(range(9)) + [0, 0], list(range(16))], np.int32)
  valid = np.arange(8)[None] < np.array([[6], [3]])
  positions = positions + valid.sum(-1, keepdims=True).astype(np.int32)
  tokens = np.random.default_rng(0).integers(0, 50, segments.shape).astype(np.int32)
  cfg = _gemma(8)
  kv = jax.random.normal(jax.random.key(2), (2, cfg.num_layers, 2, cfg.num_kv_heads, 8, 16))
  prefix = layers.Prefix(kv[0], kv[1], jnp.asarray(valid))
  params = jax.jit(gemma3.Gemma3(cfg).init)(jax.random.key(0), tokens, positions, segments)
  return params, (tokens, positions, segments, prefix)


@functools.cache
def _gemma_states(window, name):
  """Final states at the real tokens, the same weights whatever the window."""
  params, rows = _gemma_rows()
  model = gemma3.Gemma3(dataclasses.replace(_gemma(window), attention=name))
  out = jax.jit(model.apply)(params, *rows)
  return np.asarray(out)[rows[2] != 0]


@pytest.mark.skipif("pallas_gpu" not in KERNELS, reason="Triton: GPU or CPU interpret")
def test_gemma_window_is_applied_or_refused(monkeypatch):
  """Rows of 24 keys (prefix 8 + 16): a window of 32 hides none, the kernel runs and agrees
  (Gemma's query scaling too); a window of 8 does: a named kernel is refused with one clear
  error, auto takes the jnp path."""
  np.testing.assert_allclose(
      _gemma_states(32, "pallas_gpu"), _gemma_states(32, "xla"), atol=1e-5, rtol=1e-5
  )
  with pytest.raises(errors.UserError, match="sliding window"):
    _gemma_states(8, "pallas_gpu")
  # auto picks the kernel on this platform (on CPU: interpreted)
  monkeypatch.setattr(attention, "_AUTO", {jax.default_backend(): "pallas_gpu"})
  _, positions, segments, prefix = _gemma_rows()[1]
  m = attention.Segments(segments, positions, prefix.valid, jnp.asarray(True))
  assert attention.kernel_for("auto", m, 32, 24) == "pallas_gpu"
  assert attention.kernel_for("auto", m, 8, 24) is None
  assert attention.kernel_for("auto", m._replace(local=None), 8, 24) == "pallas_gpu"  # LLaMA
  np.testing.assert_allclose(_gemma_states(8, "auto"), _gemma_states(8, "xla"))
  assert np.abs(_gemma_states(8, "xla") - _gemma_states(32, "xla")).max() > 1e-3


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what CPU gets")
def test_backends_are_checked_by_name_and_platform():
  assert attention.resolve("auto") == "xla"  # CPU keeps the jnp path
  with pytest.raises(errors.UserError, match="engine.attention=cudnn runs on gpu"):
    attention.resolve("cudnn")
  with pytest.raises(errors.UserError, match="not one of"):
    llama.LlamaConfig(1, 8, 8, 1, 1, 1, 8, attention="flash")


@pytest.mark.skipif(len(jax.devices()) < 4 or "pallas_gpu" not in KERNELS, reason="4 devices")
def test_kernels_run_per_shard_of_the_mesh():
  """Pallas calls cannot be partitioned by XLA: on a mesh they run per (rows, kv heads)
  shard; data=2 × tensor=2 here, the same result as the dense path."""
  rows = _rows()
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2), jax.devices()[:4])
  call = lambda *a: _fused.__wrapped__("pallas_gpu", *a)
  with sharding.activate(mesh):
    assert "shard_map" in str(jax.make_jaxpr(call)(*rows))
    got = jax.jit(call)(*rows)
  np.testing.assert_allclose(_real(got, rows[5]), _real(_dense(*rows), rows[5]), atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on a GPU only")
def test_cudnn_matches_the_dense_path_on_a_gpu():
  """bf16 (cuDNN has no fp32 kernel) against the dense path on the same bf16 inputs."""
  rows = _rows()
  rows = tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in rows)
  want = _dense(*(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in rows))
  got = _fused("cudnn", *rows)
  np.testing.assert_allclose(_real(got, rows[5]), _real(want, rows[5]), atol=3e-2, rtol=3e-2)
