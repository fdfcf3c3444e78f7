"""The rating engine: one jit'd step per batch of packed rows -> P("1".."5") and the
full-vocabulary logsumexp per text, and `Scorer.rate`, the one loop over a plan's batches.

The step runs the last layer and the head only at each text's last token and never
materialises [batch, seq, vocab]; each prompt's shared prefix is prefilled once. The
log-likelihood step (`target_logprobs_fn`, for `evaluate`) reads chosen positions instead and
returns the exact log-softmax at given target tokens, through the same rows, prefixes and loop.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selectit_jax.models import registry
from selectit_jax.models.layers import DecoderConfig, Prefix
from selectit_jax.parallel import sharding
from selectit_jax.scoring.batching import Batch


def use_compilation_cache(path: str) -> None:
  """Persists every compiled program under `path` (a directory or a gs:// path; jax reads
  it through etils.epath), so a second run skips compiling what an earlier one compiled.
  Call before the first compile; '' leaves the cache off."""
  if path:
    jax.config.update("jax_compilation_cache_dir", path)


class BatchArrays(NamedTuple):
  """A batch as arrays: tokens, segment ids (1.. per text, 0 = padding) and positions within
  each text [batch_size, length]; the prompt each row continues [batch_size]; the read-out
  positions [batch_size, slots] (a rating reads each segment's last token: slots =
  max_segments); per text of `Batch.items`, its first flat (row × slots + slot) slot (its
  reads fill consecutive slots); the token scored at each slot [batch_size, slots] (the
  log-likelihood step) and each text's number of reads."""

  tokens: np.ndarray
  segments: np.ndarray
  positions: np.ndarray
  prompt: np.ndarray
  last: np.ndarray
  item_slot: np.ndarray
  targets: np.ndarray | None = None
  item_reads: np.ndarray | None = None

  @property
  def item_row(self) -> np.ndarray:
    """Per text of `Batch.items`, its row."""
    return self.item_slot // self.last.shape[1]


class Rated(NamedTuple):
  """One batch's result: P("1".."5") [n, 5] and logsumexp [n] per text of `batch.items`."""

  batch: Batch
  arrays: BatchArrays
  probs: np.ndarray
  logsumexp: np.ndarray
  host_seconds: float  # padding on the host: what prefetching could hide


def pad_batch(
    batch: Batch, batch_size: int, max_segments: int, pad_id: int, slots: int | None = None
) -> BatchArrays:
  """The batch's rows, right-padded to its length; missing rows are all padding. `slots`:
  read-out slots per row (default max_segments, one read per text: a rating)."""
  slots = max_segments if slots is None else slots
  tokens = np.full((batch_size, batch.length), pad_id, np.int32)
  segments = np.zeros((batch_size, batch.length), np.int32)
  positions = np.zeros((batch_size, batch.length), np.int32)
  prompt = np.zeros((batch_size,), np.int32)
  last = np.zeros((batch_size, slots), np.int32)
  targets = np.zeros((batch_size, slots), np.int32)
  item_slot, item_reads = [], []
  for r, (row, skip) in enumerate(zip(batch.rows, batch.skips)):
    start, slot = 0, 0
    for s, it in enumerate(row):
      n = len(it.ids) - skip
      tokens[r, start : start + n] = it.ids[skip:]
      segments[r, start : start + n] = s + 1
      positions[r, start : start + n] = np.arange(n)
      reads = it.read_at
      last[r, slot : slot + len(reads)] = np.asarray(reads) - skip + start
      targets[r, slot : slot + len(it.targets)] = it.targets
      item_slot.append(r * slots + slot)
      item_reads.append(len(reads))
      start += n
      slot += len(reads)
    prompt[r] = row[0].prompt_index
  return BatchArrays(
      tokens,
      segments,
      positions,
      prompt,
      last,
      np.asarray(item_slot, np.int64),
      targets,
      np.asarray(item_reads, np.int64),
  )


def read_slots(batch: Batch, multiple: int = 16) -> int:
  """Read-out slots per row for the log-likelihood step: the most reads of a row, rounded up
  to `multiple` (fewer compiled shapes)."""
  most = max((sum(len(it.read_at) for it in row) for row in batch.rows), default=1)
  return -(-most // multiple) * multiple


def rating_probs_fn(model: nn.Module, rating_ids: np.ndarray) -> Callable:
  """(params, prefix table, tokens, segments, positions [b,t], prompt [b], last [b,s]) ->
  (rating logits [b,s,5], logsumexp [b,s]) at each segment's last token, fp32.

  The prefix table (`Scorer`) holds each prompt's shared-prefix keys and values
  [layers, prompts, kv, p, hd]; row r continues prompt[r]'s prefix.
  """
  rating_ids = jnp.asarray(rating_ids)

  def step(params, table: Prefix, tokens_bt, segments_bt, positions_bt, prompt_b, last_bs):
    logits_bsv = _readout_logits(
        model, params, table, tokens_bt, segments_bt, positions_bt, prompt_b, last_bs
    )
    return logits_bsv[..., rating_ids], jax.nn.logsumexp(logits_bsv, axis=-1)

  return step


def _readout_logits(
    model, params, table: Prefix, tokens_bt, segments_bt, positions_bt, prompt_b, readout_bs
):
  """Vocabulary logits [b, s, vocab] (fp32) at the read-out positions; row r continues
  prompt[r]'s prefix of the table."""
  valid_bp = table.valid[prompt_b]
  positions = valid_bp.sum(-1, dtype=jnp.int32)[:, None] + positions_bt
  prefix = Prefix(
      *(
          nn.with_logical_constraint(
              jnp.take(x, prompt_b, axis=1), (None, "activation_batch", None, None, None)
          )
          for x in (table.k, table.v)
      ),
      valid_bp,
  )
  states_bsd = model.apply(
      {"params": params}, tokens_bt, positions, segments_bt, prefix, readout=readout_bs
  )
  return model.apply({"params": params}, states_bsd, method="logits")


def target_logprobs_fn(model: nn.Module) -> Callable:
  """The log-likelihood step: (params, prefix table, tokens, segments, positions [b,t],
  prompt [b], readout [b,s], targets [b,s]) -> (log p(target) [b,s], logsumexp [b,s]): the
  exact full-vocabulary log-softmax at each read-out position, taken at its target, fp32."""

  def step(
      params, table: Prefix, tokens_bt, segments_bt, positions_bt, prompt_b, readout_bs, targets_bs
  ):
    logits_bsv = _readout_logits(
        model, params, table, tokens_bt, segments_bt, positions_bt, prompt_b, readout_bs
    )
    lse_bs = jax.nn.logsumexp(logits_bsv, axis=-1)
    target_bs = jnp.take_along_axis(logits_bsv, targets_bs[..., None], axis=-1)[..., 0]
    return target_bs - lse_bs, lse_bs

  return step


class Scorer:
  """A jit'd rating step bound to a mesh, loaded params and the prompts' shared prefixes.

  With `rating_ids=None` the step is `target_logprobs_fn` instead: each text's log-probs of
  its `WorkItem.targets` at its `reads` (evaluation), on the same rows, prefixes and loop.

  Multi-process: every process calls it with the same global batch (the plan is
  deterministic); each process's devices receive only their rows (batch over data×fsdp),
  and the small outputs come back replicated, so every process sees all rows and writes
  the ones `owned_rows` gives it.
  """

  def __init__(
      self,
      cfg: DecoderConfig,
      params,
      rating_ids: np.ndarray | None,
      mesh,
      batch_size: int,
      prefixes: Sequence[Sequence[int]] = (),
      max_segments: int = 1,
      pad_id: int = 0,
  ):
    self.mesh = mesh
    self.batch_size = batch_size
    self.max_segments = max_segments
    self.pad_id = pad_id
    self.rating = rating_ids is not None
    self.scale = len(rating_ids) if self.rating else 1
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % rows:
      raise ValueError(
          f"engine.batch_size={batch_size} is not a multiple of the mesh's " f"data×fsdp={rows}"
      )
    self.params = params
    self._batch_sharding = sharding.batch_sharding(mesh)
    out_sharding = sharding.replicated(mesh)
    self.prefill_seconds = 0.0
    self._cfg, self._prefill_jit = cfg, None
    self._table = self._prefill(cfg, prefixes)
    model = registry.build(cfg)
    step = rating_probs_fn(model, rating_ids) if self.rating else target_logprobs_fn(model)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    self._step = jax.jit(
        step,
        in_shardings=(param_sh, out_sharding) + (self._batch_sharding,) * (5 if self.rating else 6),
        out_shardings=(out_sharding, out_sharding),
    )
    # The log-likelihood step's read-out slots per row; None: each batch's own (read_slots).
    self.read_width: int | None = None
    self.compiled_shapes: set[tuple[int, int, int]] = set()  # (rows, length, segments)
    self.compile_seconds = 0.0

  def load_prefixes(self, prefixes: Sequence[Sequence[int]], shape: tuple[int, int]) -> None:
    """Replaces the prefix table with these prefixes, padded to `shape` (prompts, tokens): a
    run whose prefixes do not fit in memory at once goes through them in groups of one
    table shape, so the step compiles once per batch shape."""
    self._table = self._prefill(self._cfg, prefixes, shape)

  def _prefill(
      self, cfg: DecoderConfig, prefixes: Sequence[Sequence[int]], shape: tuple[int, int] = (0, 0)
  ) -> Prefix:
    """Keys and values of every prompt's shared prefix, replicated: [layers, prompts, kv, p, hd]
    (p = 0 without prefixes: rows then hold whole texts), at least `shape` (prompts, p)."""
    start = time.perf_counter()
    n = max(len(prefixes), 1, shape[0])
    p = max(max((len(x) for x in prefixes), default=0), shape[1])
    valid = np.zeros((n, p), bool)
    for k, ids in enumerate(prefixes):
      valid[k, : len(ids)] = True
    replicated = sharding.replicated(self.mesh)
    if p == 0:
      kv = jnp.zeros((cfg.num_layers, n, cfg.num_kv_heads, 0, cfg.head_dim), cfg.dtype)
      return jax.device_put(Prefix(kv, kv, jnp.asarray(valid)), replicated)
    tokens = np.zeros((n, p), np.int32)
    for k, ids in enumerate(prefixes):
      tokens[k, : len(ids)] = ids
    if self._prefill_jit is None:  # one jit for every table (`load_prefixes`)
      param_sharding = jax.tree.map(lambda x: x.sharding, self.params)
      self._prefill_jit = registry.prefix_prefill(cfg, param_sharding, self.mesh)
    table = jax.block_until_ready(self._prefill_jit(self.params, tokens, valid))
    self.prefill_seconds += time.perf_counter() - start
    return table

  def owned_rows(self) -> np.ndarray:
    """Rows of a batch this process writes: those on its devices (the lowest process
    index wins where rows are replicated, e.g. over `tensor`)."""
    owner = np.full((self.batch_size,), jax.process_count(), np.int64)
    for device, index in self._batch_sharding.devices_indices_map((self.batch_size,)).items():
      rows = np.arange(self.batch_size)[index[0]]
      owner[rows] = np.minimum(owner[rows], device.process_index)
    return owner == jax.process_index()

  def dispatch(self, rows: BatchArrays) -> tuple[jax.Array, jax.Array]:
    """Starts the step on `pad_batch`'s global batch and returns its device outputs at once
    (JAX dispatches asynchronously; only a new shape's trace and compile block here)."""
    shape = rows.tokens.shape + rows.last.shape[1:] + self._table.k.shape[1:4:2]
    start = time.perf_counter()
    with sharding.activate(self.mesh):
      inputs = rows[:5] if self.rating else rows[:5] + (rows.targets,)
      args = (sharding.global_array(x, self._batch_sharding) for x in inputs)
      out = self._step(self.params, self._table, *args)
    if shape not in self.compiled_shapes:
      self.compiled_shapes.add(shape)
      self.compile_seconds += time.perf_counter() - start
    return out

  def fetch(self, rows: BatchArrays, out) -> tuple[np.ndarray, np.ndarray]:
    """Waits for `dispatch`'s outputs: probabilities of "1".."5" [n, 5] (float64) and
    logsumexp [n] of the batch's n texts, in `Batch.items` order. The log-likelihood step:
    log p of each text's targets and the logsumexp at each read [n, most reads], NaN past
    its reads."""
    rating_logits, lse = out
    if not self.rating:
      return self._per_read(rows, rating_logits, lse)
    rating_logits = np.asarray(rating_logits, np.float64).reshape(-1, self.scale)[rows.item_slot]
    lse = np.asarray(lse, np.float64).reshape(-1)[rows.item_slot]
    return np.exp(rating_logits - lse[:, None]), lse

  def _per_read(self, rows: BatchArrays, logp, lse):
    """The log-likelihood step's slots, per text of the batch: [n, most reads], NaN-padded."""
    width = int(rows.item_reads.max(initial=1))
    slot = rows.item_slot[:, None] + np.arange(width)
    real = np.arange(width) < rows.item_reads[:, None]
    slot = np.where(real, slot, 0)
    logp = np.where(real, np.asarray(logp, np.float64).reshape(-1)[slot], np.nan)
    lse = np.where(real, np.asarray(lse, np.float64).reshape(-1)[slot], np.nan)
    return logp, lse

  def __call__(self, rows: BatchArrays) -> tuple[np.ndarray, np.ndarray]:
    """`fetch(dispatch(rows))`: one batch, waited for."""
    return self.fetch(rows, self.dispatch(rows))

  def rate(self, batches: Iterable[Batch]) -> Iterator[Rated]:
    """The one rating loop: each batch padded on the host and dispatched, then the batch
    before it read back, so the device always has the next step queued while the host pads,
    reads back and stores (nothing in the step waits on the host)."""
    ahead = None  # (batch, arrays, device outputs, host seconds) of the batch in flight
    for batch in batches:
      start = time.perf_counter()
      slots = None if self.rating else (self.read_width or read_slots(batch))
      arrays = pad_batch(batch, self.batch_size, self.max_segments, self.pad_id, slots)
      host_seconds = time.perf_counter() - start
      out = self.dispatch(arrays)
      if ahead is not None:
        yield self._rated(*ahead)
      ahead = (batch, arrays, out, host_seconds)
    if ahead is not None:
      yield self._rated(*ahead)

  def _rated(self, batch: Batch, arrays: BatchArrays, out, host_seconds: float) -> Rated:
    probs, lse = self.fetch(arrays, out)
    return Rated(batch, arrays, probs, lse, host_seconds)

  def compile(self, lengths: Iterable[int]) -> None:
    """Compiles the step for each bucket length (an all-padding batch each)."""
    for length in lengths:
      self(pad_batch(Batch((), length, ()), self.batch_size, self.max_segments, self.pad_id))
