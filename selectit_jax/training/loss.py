"""The training loss: Σ weight · NLL of each target token, over the vocabulary in chunks.

The [rows, T, vocab] fp32 logits are never whole: the head runs on `chunk` positions of
every row at a time (a `lax.scan`), and under differentiation each chunk's gradients with
respect to the hidden states and the head weight are formed right there (a custom VJP, as
fused linear cross-entropy kernels do), so neither the logits nor the softmax are kept for
the backward. What is kept: dL/dhidden [rows, T, d] and dL/dW [d, vocab] (fp32). The head
FLOPs are those of the plain forward and backward; none is recomputed. Where a conditional
is cheap (not on GPU: `skips_unweighted`), the head skips the unweighted positions (prompt
tokens, padding): they are sorted behind the weighted ones and their chunks never run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from selectit_jax.errors import UserError

DEFAULT_CHUNK = 128  # positions of each row per vocabulary chunk (config train.loss_chunk)


def skips_unweighted(platform: str) -> bool:
  """Whether the loss skips chunks without weighted positions on `platform`: XLA:GPU reads
  a conditional's predicate back to the host (a wait inside the step), CPU and TPU do not."""
  return platform != "gpu"


def configured_chunk(train_cfg) -> int:
  """`train.loss_chunk` (default DEFAULT_CHUNK): positions per row per vocabulary chunk, 0 for
  the whole row."""
  chunk = int(train_cfg.get("loss_chunk", DEFAULT_CHUNK))
  if chunk < 0:
    raise UserError(
        f"train.loss_chunk={chunk}; expected positions per vocabulary chunk, >= 1 (or 0: the "
        "whole row)"
    )
  return chunk


def chunk_size(length: int, chunk: int) -> int:
  """The largest divisor of `length` that is at most `chunk` (0: the whole row)."""
  if chunk <= 0 or chunk >= length:
    return length
  return next(c for c in range(chunk, 0, -1) if length % c == 0)


def _chunks(x, chunk: int):
  """[b, t, ...] -> [t // chunk, b, chunk, ...]: rows keep their (sharded) batch axis."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x):
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _take(x, order):
  return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _packed(hidden_btd, targets_bt, weights_bt, chunk: int, groups: int):
  """The scan's inputs (hidden states, targets, fp32 weights chunk by chunk), and how to
  put a [groups, n, ...] result back into [b, t, ...] order (None: nothing was moved).

  With `groups` > 0 the rows are cut into `groups` runs of whole rows (one per batch shard,
  so nothing crosses devices) and each run's weighted positions are moved to its front
  (a stable sort), `chunk` positions per row becoming `chunk` · rows-per-run positions per
  run: the chunks past every run's last weighted position are all zero, and the scan skips
  them (`_skipping`). Response-only training leaves ~37 % of ShareGPT positions unweighted."""
  x = (hidden_btd, targets_bt, weights_bt.astype(jnp.float32))
  if not groups:
    return tuple(_chunks(a, chunk) for a in x), None
  b, t = targets_bt.shape
  x = tuple(a.reshape(groups, b // groups * t, *a.shape[2:]) for a in x)
  order = jnp.argsort(x[2] == 0, axis=1, stable=True)
  size = chunk_size(x[2].shape[1], chunk * (b // groups))
  inverse = jnp.argsort(order, axis=1)
  restore = lambda y: _take(_unchunk(y), inverse).reshape(b, t, *y.shape[3:])
  return tuple(_chunks(_take(a, order), size) for a in x), restore


def _skipping(body, empty, skip: bool):
  """`body` on chunks with a weighted position; `empty` (no head work) on the rest."""
  if not skip:
    return body
  return lambda carry, x: jax.lax.cond(jnp.any(x[2] != 0), body, empty, carry, x)


def _logits(h_bcd, w_dv, softcap):
  """fp32 logits of a chunk (tanh-capped when `softcap`), and the tanh for its derivative."""
  z = jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32)
  if softcap is None:
    return z, None
  s = jnp.tanh(z / softcap)
  return s * softcap, s


def _logsumexp(z, block: int = 128):
  """logsumexp over the last axis by blocks of `block` words (each block's max and sum, then
  the blocks merged): XLA:CPU reduces a [512, 49152] chunk ~1.5× faster this way than with
  jax.nn.logsumexp's one pass over each whole row, ~2 % of the training step."""
  if z.shape[-1] % block:
    return jax.nn.logsumexp(z, axis=-1)
  z = z.reshape(*z.shape[:-1], -1, block)
  peak = jnp.max(z, axis=-1)
  total = jnp.sum(jnp.exp(z - peak[..., None]), axis=-1)
  return jax.nn.logsumexp(peak, axis=-1, b=total)  # log Σ_blocks total · exp(peak)


def _nll(z, targets, weights):
  logz = _logsumexp(z)
  picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  return logz, jnp.sum((logz - picked) * weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def nll_sum(hidden_btd, head_dv, targets_bt, weights_bt, chunk: int, softcap, groups: int = 0):
  """Σ weights · (logsumexp(z) − z[target]) with z = hidden · head (fp32), `chunk`
  positions of each row at a time (`chunk` must divide T: `chunk_size`); with `groups`,
  the head runs only on chunks holding weighted positions (`_packed`)."""
  xs, _ = _packed(hidden_btd, targets_bt, weights_bt, chunk, groups)

  def body(total, x):
    h, tgt, wt = x
    return total + _nll(_logits(h, head_dv, softcap)[0], tgt, wt)[1], None

  empty = lambda total, x: (total, None)
  return jax.lax.scan(_skipping(body, empty, groups > 0), jnp.float32(0), xs)[0]


def _nll_sum_fwd(hidden_btd, head_dv, targets_bt, weights_bt, chunk, softcap, groups):
  xs, restore = _packed(hidden_btd, targets_bt, weights_bt, chunk, groups)

  def body(carry, x):
    total, dw = carry
    h, tgt, wt = x
    z, s = _logits(h, head_dv, softcap)
    logz, nll = _nll(z, tgt, wt)
    # d(Σ w·NLL)/dz = w · (softmax(z) − onehot(target)), through the cap's tanh.
    dz = (jnp.exp(z - logz[..., None]) - jax.nn.one_hot(tgt, z.shape[-1])) * wt[..., None]
    if s is not None:
      dz = dz * (1 - s * s)
    dh = jnp.einsum(
        "bcv,dv->bcd", dz.astype(head_dv.dtype), head_dv, preferred_element_type=jnp.float32
    )
    dw = dw + jnp.einsum("bcd,bcv->dv", h, dz.astype(h.dtype), preferred_element_type=jnp.float32)
    return (total + nll, dw), dh.astype(h.dtype)

  empty = lambda carry, x: (carry, jnp.zeros_like(x[0]))
  init = (jnp.float32(0), jnp.zeros(head_dv.shape, jnp.float32))
  (total, dw), dh = jax.lax.scan(_skipping(body, empty, groups > 0), init, xs)
  dh = _unchunk(dh) if restore is None else restore(dh)
  return total, (dh, dw.astype(head_dv.dtype))


def _nll_sum_bwd(chunk, softcap, groups, residuals, g):
  del chunk, softcap, groups
  dh, dw = residuals
  return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)
