"""Parquet score store: one row per (sample, prompt, model), resumable by key.

Layout under a scores dir:
  shards/{process:05d}-{seq:06d}.parquet  written atomically (tmp in the same dir,
                                          fsync, os.replace); tmp files start with '.'
                                          and are never read.
  manifest.json                           run description (atomic json).
  rejects.jsonl                           {index, id, reason} of the last run (atomic).
Key of a row = (content_hash, model, prompt_hash): the same text rated by the same
model with the same prompt is computed once, whatever its index or id.
"""

import collections
import concurrent.futures
import dataclasses
import json
import os

import numpy as np
from absl import logging
import pyarrow as pa
import pyarrow.compute as pc

from selectit_jax import fileio
from selectit_jax.data import records as records_lib
from selectit_jax.scoring import manifest as manifest_lib

KEY_COLUMNS = ("content_hash", "model", "prompt_hash")
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("sample_index", pa.int64()),
        ("content_hash", pa.string()),
        ("model", pa.string()),
        ("num_params", pa.int64()),
        ("prompt_index", pa.int32()),
        ("prompt_hash", pa.string()),
        ("probs", pa.list_(pa.float64())),  # P("1".."K"); one scale per dir (the manifest's)
        ("logsumexp", pa.float64()),
        ("num_tokens", pa.int32()),
        ("truncated", pa.bool_()),  # the sample's text was cut to engine.max_tokens
    ]
)
# Columns added after the first shards were written: rows may leave them out, and shards
# without them read as this value. (Shards written when probs were fixed-size lists of 5
# read as lists: the cast to SCHEMA.)
DEFAULTS = {"truncated": False}


class ScoreStore:
  """A scores dir. process_index names this process's shards (jax.process_index())."""

  def __init__(self, directory: str, process_index: int = 0):
    self.dir = directory
    self.shards_dir = os.path.join(directory, "shards")
    self.process_index = int(process_index)
    self._shards = fileio.ParquetShards(
        self.shards_dir, SCHEMA, KEY_COLUMNS, DEFAULTS, prefix=f"{self.process_index:05d}-"
    )

  @property
  def rejects_path(self):
    return os.path.join(self.dir, "rejects.jsonl")

  # -- manifest
  def write_manifest(self, m: manifest_lib.Manifest) -> None:
    manifest_lib.write(self.dir, m)

  def read_manifest(self) -> manifest_lib.Manifest | None:
    return manifest_lib.read(self.dir)

  # -- rejects
  def write_rejects(self, rejects, num_read: int | None = None) -> int:
    """Replaces rejects.jsonl (atomically) with this run's Rejects, one per (index, reason),
    and earlier ones of records at index >= num_read, which this run did not read (the
    manifest has already refused other settings, so those still hold); returns how many.
    A record this run read keeps only this run's verdict."""
    kept = [
        records_lib.Reject(r["index"], r["id"], r["reason"])
        for r in self.read_rejects()
        if num_read is not None and r["index"] >= num_read
    ]
    unique = list({(r.index, r.reason): r for r in list(rejects) + kept}.values())
    unique.sort(key=lambda r: r.index)
    records_lib.write_rejects(self.rejects_path, unique)
    return len(unique)

  def read_rejects(self) -> list[dict]:
    if not os.path.exists(self.rejects_path):
      return []
    with open(self.rejects_path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  # -- shards
  def shard_paths(self) -> list[str]:
    """Complete shards in (process, seq) order; tmp files are ignored."""
    return self._shards.paths()

  def write_shard(self, rows: list[dict]) -> str | None:
    """Writes rows (dicts with every SCHEMA column) as one new shard; returns its path."""
    if not rows:
      return None
    rows = [{**DEFAULTS, **r} for r in rows]
    missing = [c for c in SCHEMA.names if c not in rows[0]]
    if missing:
      raise ValueError(f"score rows lack columns {missing}")
    cols = {}
    for name in SCHEMA.names:
      vals = [r[name] for r in rows]
      if name == "probs":
        lengths = {len(v) for v in vals}
        if len(lengths) != 1:
          raise ValueError(f"probs must have one length (the scale) for all rows, got {lengths}")
        vals = np.asarray(vals, dtype=np.float64)
        offsets = np.arange(0, vals.size + 1, vals.shape[1], dtype=np.int32)
        cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals.reshape(-1)))
      else:
        if any(v is None for v in vals):
          raise ValueError(f"score rows have null {name}")
        cols[name] = pa.array(vals, type=SCHEMA.field(name).type)
    return self._shards.write(pa.Table.from_arrays([cols[n] for n in SCHEMA.names], schema=SCHEMA))

  def stored_keys(self) -> set:
    """{(content_hash, model, prompt_hash)} over all shards; reads only those columns."""
    return self._shards.keys()

  def read_table(self) -> pa.Table:
    """All shards concatenated, de-duplicated by key (first in shard order wins)."""
    return self._shards.read_table()


class ShardWriter:
  """`store.write_shard` on one background thread, in submission order, with at most
  `max_pending` shards queued (the caller blocks beyond that, so memory stays bounded).

  Each shard is still written whole and atomically; after a failed write no later shard is
  written (the error is raised on the next `submit` or on `close`), so a store never holds
  a later batch's rows without an earlier one's unless it held them before. `close` (also
  on an exception in the `with` body) writes what was queued: finished work."""

  def __init__(self, store: ScoreStore, max_pending: int = 2):
    self.store = store
    self.max_pending = max_pending
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    self._queued: collections.deque = collections.deque()
    self._failed = False  # set on the writer thread: later shards are not written
    self._error: BaseException | None = None

  def _write(self, rows: list[dict]) -> str | None:
    if self._failed:
      raise RuntimeError("not written: an earlier shard failed")
    try:
      return self.store.write_shard(rows)
    except BaseException:
      self._failed = True
      raise

  def _wait(self, keep: int) -> None:
    """Waits until at most `keep` shards are queued; raises the first failed write's error."""
    while len(self._queued) > keep:
      error = self._queued.popleft().exception()  # waits for that write
      self._error = self._error or error
    if self._error is not None:
      raise self._error

  def submit(self, rows: list[dict]) -> None:
    if rows:
      self._wait(self.max_pending - 1)
      self._queued.append(self._pool.submit(self._write, rows))

  def close(self) -> None:
    try:
      self._wait(0)
    finally:
      self._pool.shutdown(wait=True)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # the loop's own error goes on; a write error besides it is logged
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("writing a score shard failed too: %s", e)


@dataclasses.dataclass(frozen=True)
class ProbsArray:
  """probs_array's result: the stored probabilities on dense axes."""

  probs: np.ndarray  # [N, M, K, R] float64, NaN where a cell is missing
  sample_index: np.ndarray  # [N] int64
  sample_id: np.ndarray  # [N] object (str)
  models: list  # [M]
  num_params: np.ndarray  # [M] int64
  prompt_hashes: list  # [K]
  missing: list  # [(sample_index, model, k)], k = position in prompt_hashes


def _codes(values, order):
  """Positions of values in order (-1 if absent)."""
  pos = {v: i for i, v in enumerate(order)}
  return np.fromiter((pos.get(v, -1) for v in values), dtype=np.int64, count=len(values))


def rating_scale(table: pa.Table) -> int:
  """K of the rows' P("1".."K") (5 for an empty table); refuses rows of mixed scales."""
  if table.num_rows == 0:
    return 5
  lengths = np.unique(pc.list_value_length(table.column("probs")).to_numpy(zero_copy_only=False))
  if len(lengths) != 1:
    raise ValueError(f"score rows mix rating scales {lengths.tolist()}")
  return int(lengths[0])


def _prompt_order(table: pa.Table) -> list:
  """Stored prompt hashes ordered by prompt_index (one hash per index)."""
  pairs = set(
      zip(table.column("prompt_index").to_pylist(), table.column("prompt_hash").to_pylist())
  )
  by_index = {}
  for i, h in sorted(pairs):
    if i in by_index:
      raise ValueError(
          f"prompt_index {i} has several prompt hashes "
          f"({by_index[i]}, {h}); pass prompt_hashes explicitly"
      )
    by_index[i] = h
  return [by_index[i] for i in sorted(by_index)]


def _num_params(t: pa.Table, m_code: np.ndarray, models: list) -> np.ndarray:
  """θ per model from its rows (which must agree)."""
  num_params = np.zeros(len(models), np.int64)
  row_np = t.column("num_params").to_numpy()
  for j in range(len(models)):
    vals = np.unique(row_np[m_code == j])
    if len(vals) > 1:
      raise ValueError(f"model {models[j]!r} has rows with num_params {vals.tolist()}")
    num_params[j] = vals[0] if len(vals) else 0
  return num_params


def _cells_by_content(t, samples, m_code, k_code, row_probs, shape_mkr):
  """The N axis from Records: cells found by content hash (duplicates share theirs)."""
  samples = list(samples)
  hashes = [records_lib.content_hash(r) for r in samples]
  order = list(dict.fromkeys(hashes))
  c_code = _codes(t.column("content_hash").to_pylist(), order)
  keep = c_code >= 0
  cells = np.full((len(order),) + shape_mkr, np.nan)
  cells[c_code[keep], m_code[keep], k_code[keep]] = row_probs[keep]  # keys are unique
  probs = cells[_codes(hashes, order)] if samples else cells[:0]
  sample_index = np.array([r.index for r in samples], np.int64)
  return probs, sample_index, np.array([r.id for r in samples], dtype=object)


def _cells_by_index(t, m_code, k_code, row_probs, shape_mkr, models):
  """The N axis from the stored sample indices, ascending."""
  idx = t.column("sample_index").to_numpy()
  sample_index, first, n_code = np.unique(idx, return_index=True, return_inverse=True)
  sample_id = np.array(t.column("sample_id").to_pylist(), dtype=object)[first]
  count = np.zeros((len(sample_index),) + shape_mkr[:2], np.int64)
  np.add.at(count, (n_code, m_code, k_code), 1)
  if (count > 1).any():
    n, m, k = np.argwhere(count > 1)[0]
    raise ValueError(
        f"sample_index {sample_index[n]} has several rows for model {models[m]!r}, "
        f"prompt {k}: the store mixes different data files; pass samples=records"
    )
  probs = np.full((len(sample_index),) + shape_mkr, np.nan)
  probs[n_code, m_code, k_code] = row_probs
  return probs, sample_index, sample_id


def probs_array(table: pa.Table, models=None, prompt_hashes=None, samples=None) -> ProbsArray:
  """Dense [N, M, K, R] probabilities from score rows.

  models: names in the wanted order (default: all, sorted by name).
  prompt_hashes: in prompt order (default: all, ordered by prompt_index).
  samples: optional Records defining the N axis (in their order); cells are then
    found by content_hash, so duplicate-content samples (stored once) and samples
    with no rows at all are handled. Without it, N = distinct sample_index in the
    table, ascending. Missing cells are NaN and listed in .missing.
  """
  models = list(sorted(set(table.column("model").to_pylist())) if models is None else models)
  prompt_hashes = list(_prompt_order(table) if prompt_hashes is None else prompt_hashes)
  m_code = _codes(table.column("model").to_pylist(), models)
  k_code = _codes(table.column("prompt_hash").to_pylist(), prompt_hashes)
  sel = (m_code >= 0) & (k_code >= 0)
  t = table.filter(pa.array(sel))
  m_code, k_code = m_code[sel], k_code[sel]
  scale = rating_scale(t)
  row_probs = (
      t.column("probs").combine_chunks().flatten().to_numpy().reshape(-1, scale)
      if t.num_rows
      else np.zeros((0, scale))
  )
  shape_mkr = (len(models), len(prompt_hashes), scale)
  if samples is not None:
    probs, sample_index, sample_id = _cells_by_content(
        t, samples, m_code, k_code, row_probs, shape_mkr
    )
  else:
    probs, sample_index, sample_id = _cells_by_index(
        t, m_code, k_code, row_probs, shape_mkr, models
    )
  missing = [
      (int(sample_index[n]), models[m], int(k))
      for n, m, k in np.argwhere(np.isnan(probs).any(axis=-1))
  ]
  return ProbsArray(
      probs,
      sample_index,
      sample_id,
      models,
      _num_params(t, m_code, models),
      prompt_hashes,
      missing,
  )
