"""Greedy generation with a KV cache, for every family the registry builds.

A batch of prompts is prefilled once (`collect_kv=True`, the last layer and the head only at
each prompt's last token) into a fixed-size cache [layers, b, kv_heads, cache_len, head_dim]
with a valid mask; a `jax.lax.while_loop` then feeds one token per row, attending to the cache
through the models' `Prefix` input, and writes that token's keys and values into its slot.

Shared prefix: the leading tokens all of a call's prompts have in common (a task's few-shot
context; rounded down to `length_multiple`) are prefilled once, as one row, and each batch's
prefill then runs only the prompts' own tokens against those keys.

Layout: each prompt sits at cache slots 0..n-1 (right-padded), so a slot index is the token's
position. Rotary positions and Gemma 3's sliding window (which counts prefix keys by their
slot, `arange(p)`) then need no per-row offsets, and the model code is used unchanged.

Stopping: EOS ids end a row on the device, at the step they appear. Stop *strings* are
checked on the host every `check_every` steps: the loop runs in chunks, and between chunks the
rows still going are decoded and searched. Strings, not token-id suffixes, because tasks
state their stops as text and BPE merges hide them from an id match ("\\n\\n" inside the
".\\n\\n" token, "Question:" after a space-merged token); a chunk of 16 steps costs one
small device-to-host copy and a decode per live row, and overruns a stop by < 16 steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from selectit_jax.models import registry
from selectit_jax.models.layers import DecoderConfig, Prefix
from selectit_jax.parallel import sharding


class DecodeState(NamedTuple):
  """The loop carry. `last` [b] is the newest token (fed next) at position `pos` [b];
  `out` [b, max_new] holds every generated token, `length` [b] how many of them are kept
  (an EOS is not), `limit` [b] the most a row may keep; `step` counts generated tokens."""

  k: jax.Array  # [layers, b, kv, cache_len, hd]
  v: jax.Array
  valid: jax.Array  # [b, cache_len]: slots holding a real token
  last: jax.Array
  pos: jax.Array
  out: jax.Array
  length: jax.Array
  limit: jax.Array
  done: jax.Array
  step: jax.Array  # []


@dataclasses.dataclass
class DecodeStats:
  """Totals over `generate` calls. `first_token_seconds`: per batch, from its start to its
  first tokens on the host (the prefill, compilation included on a shape's first use)."""

  prompts: int = 0
  prompt_tokens: int = 0
  new_tokens: int = 0
  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0  # the loop after the first token, host stop checks included
  steps: int = 0  # loop steps run (each feeds one token to every row of a batch)
  shared_tokens: int = 0  # tokens of the calls' shared prefixes, each prefilled once
  first_token_seconds: list[float] = dataclasses.field(default_factory=list)


_EOS_WIDTH = 8


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def prefill_fn(
    model_kv: nn.Module, cache_len: int, max_new: int, pad_id: int, shared_len: int = 0
) -> Callable:
  """(params, tokens [b, t], lengths [b], limits [b], eos [e], shared) -> DecodeState after
  the first token. With `shared_len`, every prompt starts with the same `shared_len` tokens,
  whose keys and values `shared` (k, v [layers, 1, kv, shared_len, hd], `prefill_shared`)
  already hold: `tokens` and `lengths` are then each prompt's rest, and the cache is the
  shared slots followed by the rest. Rows with limit 0 (batch padding) start done."""

  def prefill(params, tokens_bt, lengths_b, limits_b, eos_e, shared=None):
    b, t = tokens_bt.shape
    own = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = (own < lengths_b[:, None]).astype(jnp.int32)
    prefix = None
    if shared_len:
      k0, v0 = (jnp.broadcast_to(x, x.shape[:1] + (b,) + x.shape[2:]) for x in shared)
      prefix = Prefix(k0, v0, jnp.ones((b, shared_len), jnp.bool_))
    # Every row through every layer (no read-out `cond`): compiles in about half the time,
    # and the last layer is 1/num_layers of the prefill.
    hidden, (k, v) = model_kv.apply(
        {"params": params}, tokens_bt, own + shared_len, segments, prefix
    )
    hidden = jnp.take_along_axis(hidden, (lengths_b - 1)[:, None, None], axis=1)
    logits = model_kv.apply({"params": params}, hidden[:, 0], method="logits")
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if prefix is not None:  # slot = position: the shared tokens, then each prompt's rest
      k, v = (
          jnp.concatenate([x.astype(y.dtype), y], axis=3) for x, y in ((prefix.k, k), (prefix.v, v))
      )
    pad = ((0, 0), (0, 0), (0, 0), (0, cache_len - shared_len - t), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    lengths_b = lengths_b + shared_len
    valid = jnp.arange(cache_len)[None, :] < lengths_b[:, None]
    stopped = jnp.isin(first, eos_e) | (limits_b <= 0)
    length = jnp.where(stopped, 0, 1).astype(jnp.int32)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(jnp.where(stopped, pad_id, first))
    done = stopped | (length >= limits_b)
    return DecodeState(
        k, v, valid, first, lengths_b, out, length, limits_b, done, jnp.asarray(1, jnp.int32)
    )

  return prefill


def shared_length(prompts: Sequence[Sequence[int]], multiple: int) -> int:
  """Leading tokens every prompt has in common, rounded down to `multiple` (so batches of
  one task share one prefill shape) and leaving each prompt at least one token of its own."""
  if len(prompts) < 2:
    return 0
  first, n = prompts[0], min(map(len, prompts)) - 1
  for p in prompts[1:]:
    n = next((i for i in range(n) if p[i] != first[i]), n)
  return n // multiple * multiple


def decode_fn(model_kv: nn.Module, pad_id: int) -> Callable:
  """(params, state, until [], eos [e]) -> state after greedy steps until `step == until`
  or every row is done."""

  def one_step(params, eos_e, s: DecodeState) -> DecodeState:
    b = s.last.shape[0]
    hidden, (k_new, v_new) = model_kv.apply(
        {"params": params},
        s.last[:, None],
        s.pos[:, None],
        jnp.ones((b, 1), jnp.int32),
        Prefix(s.k, s.v, s.valid),
    )
    logits = model_kv.apply({"params": params}, hidden[:, 0], method="logits")
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows = jnp.arange(b)
    # The fed token's keys and values go to its own slot (k_new: [layers, b, kv, 1, hd];
    # indexing [:, rows, :, pos] gives [b, layers, kv, hd]). Done rows keep rewriting their
    # last slot, which nothing reads.
    k = s.k.at[:, rows, :, s.pos].set(jnp.swapaxes(k_new[:, :, :, 0], 0, 1).astype(s.k.dtype))
    v = s.v.at[:, rows, :, s.pos].set(jnp.swapaxes(v_new[:, :, :, 0], 0, 1).astype(s.v.dtype))
    valid = s.valid.at[rows, s.pos].set(True)
    live = ~s.done
    is_eos = jnp.isin(nxt, eos_e)
    keep = live & ~is_eos
    out = s.out.at[:, s.step].set(jnp.where(keep, nxt, pad_id))
    length = s.length + keep.astype(jnp.int32)
    done = s.done | is_eos | (length >= s.limit)
    return DecodeState(
        k,
        v,
        valid,
        jnp.where(live, nxt, s.last),
        s.pos + live.astype(jnp.int32),
        out,
        length,
        s.limit,
        done,
        s.step + 1,
    )

  def decode(params, state: DecodeState, until, eos_e):
    return jax.lax.while_loop(
        lambda s: (s.step < until) & ~jnp.all(s.done),
        functools.partial(one_step, params, eos_e),
        state,
    )

  return decode


def stop_cut(
    ids: Sequence[int], checked: int, stop: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> int | None:
  """The fewest leading tokens of `ids` whose text contains a stop string, searching only
  beyond the first `checked` tokens (already known to contain none); None if none does."""
  if not any(s in decode(ids) for s in stop):
    return None
  for n in range(checked + 1, len(ids) + 1):
    text = decode(ids[:n])
    if any(s in text for s in stop):
      return n
  return len(ids)


class Generator:
  """Batched greedy decoding of token-id prompts on a mesh (rows over data×fsdp, like the
  scoring engine), with the loaded (possibly sharded) params.

  Prompts are batched by length (the longest first); each batch's prompts are padded to a
  multiple of `length_multiple`, and one call's cache holds its longest padded prompt plus
  max_new_tokens (at most `max_len`), so a call compiles one decode loop and a prefill per
  prompt bucket. A prompt of n tokens generates at most min(max_new_tokens, max_len - n).
  """

  def __init__(
      self,
      cfg: DecoderConfig,
      params,
      mesh,
      max_len: int,
      batch_size: int,
      pad_id: int = 0,
      length_multiple: int = 64,
      check_every: int = 16,
      share_prefix: bool = True,
  ):
    rows = sharding.row_shards(mesh.shape)
    if batch_size % rows:
      raise ValueError(f"batch_size={batch_size} is not a multiple of the mesh's data×fsdp={rows}")
    self.cfg, self.params, self.mesh = cfg, params, mesh
    self.max_len, self.batch_size, self.pad_id = max_len, batch_size, pad_id
    self.length_multiple, self.check_every = length_multiple, check_every
    self.share_prefix = share_prefix
    self.stats = DecodeStats()
    self._model = registry.build(cfg, collect_kv=True)
    self._batch = sharding.batch_sharding(mesh)
    self._replicated = sharding.replicated(mesh)
    cache = NamedSharding(mesh, P(None, ("data", "fsdp")))
    self._state_sharding = DecodeState(cache, cache, *(self._batch,) * 7, self._replicated)
    self._param_sharding = jax.tree.map(lambda x: x.sharding, params)
    self._prefill: dict[tuple[int, int, int], Callable] = {}
    self._shared_kv: Callable | None = None
    self._decode = jax.jit(
        decode_fn(self._model, pad_id),
        in_shardings=(
            self._param_sharding,
            self._state_sharding,
            self._replicated,
            self._replicated,
        ),
        out_shardings=self._state_sharding,
        donate_argnums=(1,),
    )
    self._host_view = jax.jit(
        lambda s: (s.out, s.length, s.done, s.step),
        in_shardings=(self._state_sharding,),
        out_shardings=self._replicated,
    )

  def _prefill_for(self, cache_len: int, max_new: int, shared_len: int) -> Callable:
    key = (cache_len, max_new, shared_len)
    if key not in self._prefill:
      self._prefill[key] = jax.jit(
          prefill_fn(self._model, cache_len, max_new, self.pad_id, shared_len),
          in_shardings=(self._param_sharding,)
          + (self._batch,) * 3
          + (self._replicated,) * (2 if shared_len else 1),
          out_shardings=self._state_sharding,
      )
    return self._prefill[key]

  def prefill_shared(self, ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Keys and values [layers, 1, kv, n, hd] of the tokens every prompt of a call starts
    with, computed once per call (one row, replicated) instead of once per prompt."""
    if self._shared_kv is None:
      self._shared_kv = registry.prefix_prefill(self.cfg, self._param_sharding, self.mesh)
    prefix = self._shared_kv(self.params, np.asarray([ids], np.int32), np.ones((1, len(ids)), bool))
    return prefix.k, prefix.v

  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      max_new_tokens: int,
      eos_ids: Sequence[int] = (),
      stop: Sequence[str] = (),
      decode: Callable[[Sequence[int]], str] | None = None,
  ) -> list[list[int]]:
    """Greedy continuations of `prompts`, in their order. A row ends at an EOS id (left
    out of its ids), after the token that completes a `stop` string in the text of its
    generated ids, `decode(ids)` (that token is kept: the caller cuts the text at the
    string), or after max_new_tokens."""
    if stop and decode is None:
      raise ValueError("stop strings need a decode function (token ids -> text)")
    for i, p in enumerate(prompts):
      if not 0 < len(p) < self.max_len:
        raise ValueError(f"prompt {i}: {len(p)} tokens; must be 1 to max_len-1={self.max_len - 1}")
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0 or not prompts:
      return results
    # A fixed width, so another number of EOS ids compiles nothing new.
    eos = np.full((_round_up(max(len(eos_ids), 1), _EOS_WIDTH),), -1, np.int32)
    eos[: len(eos_ids)] = eos_ids
    # One cache length per call (one decode compile); prompts pad per batch (cheap prefills).
    longest = max(map(len, prompts))
    cache_len = min(
        _round_up(_round_up(longest, self.length_multiple) + max_new_tokens, self.length_multiple),
        self.max_len,
    )
    # A few-shot context every prompt starts with is prefilled once for the whole call.
    t0 = time.perf_counter()
    n = shared_length(prompts, self.length_multiple) if self.share_prefix else 0
    shared = jax.block_until_ready(self.prefill_shared(prompts[0][:n])) if n else None
    self.stats.shared_tokens += n
    self.stats.prefill_seconds += time.perf_counter() - t0
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      for i, ids in zip(
          chunk,
          self._run_batch(
              [prompts[i][n:] for i in chunk], cache_len, max_new_tokens, eos, stop, decode, shared
          ),
      ):
        results[i] = ids
    return results

  def _run_batch(
      self, prompts, cache_len, max_new, eos, stop, decode, shared=None
  ) -> list[list[int]]:
    """`prompts`: each prompt after the call's `shared` prefix (k, v of its n tokens)."""
    t0 = time.perf_counter()
    b = self.batch_size
    m = self.length_multiple
    n = 0 if shared is None else shared[0].shape[3]
    lengths = np.ones((b,), np.int32)
    lengths[: len(prompts)] = [len(p) for p in prompts]
    prompt_len = min(_round_up(int(lengths.max()), m), self.max_len - n)
    tokens = np.full((b, prompt_len), self.pad_id, np.int32)
    for r, p in enumerate(prompts):
      tokens[r, : len(p)] = p
    limits = np.zeros((b,), np.int32)
    limits[: len(prompts)] = np.minimum(max_new, self.max_len - n - lengths[: len(prompts)])
    with sharding.activate(self.mesh):
      put = lambda x: sharding.global_array(x, self._batch)
      extra = () if shared is None else (shared,)
      state = self._prefill_for(cache_len, max_new, n)(
          self.params, put(tokens), put(lengths), put(limits), eos, *extra
      )
      out, length, done, step = map(np.asarray, self._host_view(state))
      t1 = time.perf_counter()
      checked = np.zeros((b,), np.int64)  # tokens per row already searched for stops
      cut = np.full((b,), -1, np.int64)  # per row: its length at a stop string, once found
      every = self.check_every if stop else max_new
      while not done.all() and step < max_new:
        until = np.int32(min(int(step) + every, max_new))
        state = self._decode(self.params, state, until, eos)
        out, length, done, step = map(np.asarray, self._host_view(state))
        if stop and self._check_stops(out, length, checked, cut, stop, decode):
          done = done | (cut >= 0)
          state = state._replace(done=put(done))
    length = np.where(cut >= 0, cut, length)
    t2 = time.perf_counter()
    s = self.stats
    s.prompts += len(prompts)
    s.prompt_tokens += int(lengths[: len(prompts)].sum()) + n * len(prompts)
    s.new_tokens += int(length[: len(prompts)].sum())
    s.prefill_seconds += t1 - t0
    s.decode_seconds += t2 - t1
    s.steps += int(step) - 1
    s.first_token_seconds.append(t1 - t0)
    return [out[r, : length[r]].tolist() for r in range(len(prompts))]

  @staticmethod
  def _check_stops(out, length, checked, cut, stop, decode) -> bool:
    """Searches each row's tokens beyond `checked` for a stop string; a row that holds one
    gets `cut` (the tokens up to the one completing it). Returns whether any row was cut."""
    found = False
    for r in range(len(length)):
      n = int(length[r])
      if cut[r] >= 0 or n <= checked[r]:
        continue
      at = stop_cut(out[r, :n].tolist(), int(checked[r]), stop, decode)
      if at is not None:
        cut[r], found = at, True
      checked[r] = n
    return found
