"""The chunked vocabulary loss (training/loss.py) equals the whole-logits cross-entropy, in
value and in its gradients, with and without Gemma's logit cap."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from selectit_jax.errors import UserError
from selectit_jax.training import loss as loss_lib


def _reference(hidden, head, targets, weights, softcap):
  z = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
  if softcap is not None:
    z = jnp.tanh(z / softcap) * softcap
  logz = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * weights)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("length,chunk", [(24, 8), (24, 24), (20, 7)])
@pytest.mark.parametrize("groups", [0, 1, 2])
def test_chunked_loss_and_gradients_equal_the_whole_logits(softcap, length, chunk, groups):
  rng = np.random.default_rng(0)
  b, d, v = 4, 16, 384  # 3 blocks of the blocked logsumexp
  hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(d, v)) / 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
  weights = rng.integers(0, 2, (b, length)).astype(np.float32)  # response tokens only
  weights[-1] = 0  # a row without targets (a group of them when groups = 2)
  weights[-2, length // 2 :] = 0.5  # a weight that is neither 0 nor 1
  weights = jnp.asarray(weights)
  c = loss_lib.chunk_size(length, chunk)
  assert length % c == 0 and c <= chunk
  ours = lambda h, w: loss_lib.nll_sum(h, w, targets, weights, c, softcap, groups)
  ref = lambda h, w: _reference(h, w, targets, weights, softcap)
  np.testing.assert_allclose(ours(hidden, head), ref(hidden, head), rtol=1e-6)
  # Under jit and a scaled cotangent (the step divides by the token count afterwards).
  scaled = lambda f: jax.jit(jax.grad(lambda h, w: 0.5 * f(h, w), argnums=(0, 1)))
  for g, g_ref in zip(scaled(ours)(hidden, head), scaled(ref)(hidden, head)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v", [384, 50])  # blocks of 128; a vocabulary they do not divide
def test_blocked_logsumexp_equals_jax(v):
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 5, v)).astype(np.float32) * 30
  z[0, :, -100:] += 80  # blocks whose maxima are far apart
  z[1, 2] = -1e30  # a row of masked-like logits
  np.testing.assert_allclose(
      loss_lib._logsumexp(jnp.asarray(z)), jax.nn.logsumexp(jnp.asarray(z), axis=-1), rtol=1e-6
  )


def test_chunk_size_divides_the_row():
  assert [loss_lib.chunk_size(512, c) for c in (128, 0, 1000, 100)] == [128, 512, 512, 64]
  assert loss_lib.chunk_size(520, 128) == 104


def test_configured_chunk_refuses_a_negative_size():
  cfg = ml_collections.ConfigDict
  assert loss_lib.configured_chunk(cfg({})) == loss_lib.DEFAULT_CHUNK
  assert [loss_lib.configured_chunk(cfg(dict(loss_chunk=c))) for c in (0, 64)] == [0, 64]
  with pytest.raises(UserError, match=r"train.loss_chunk=-3; expected"):
    loss_lib.configured_chunk(cfg(dict(loss_chunk=-3)))


def test_unweighted_chunks_are_skipped():
  """With groups, chunks holding no weighted position never run the head: a NaN hidden
  state at an unweighted position would otherwise reach the loss and the gradients."""
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 16, 8, 20
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  weights = np.zeros((b, t), np.float32)
  weights[:, :5] = 1  # 10 of 32 positions: the last two of the sorted run's 4 chunks are empty
  hidden[1, 12] = np.nan
  args = (jnp.asarray(rng.normal(size=(d, v)), jnp.float32), jnp.zeros((b, t), jnp.int32))
  f = lambda h, groups: loss_lib.nll_sum(h, args[0], args[1], jnp.asarray(weights), 4, None, groups)
  skipped, grads = jax.value_and_grad(f)(jnp.asarray(hidden), 1)
  assert np.isfinite(skipped) and np.isfinite(grads).all()
  assert not np.isfinite(f(jnp.asarray(hidden), 0))
