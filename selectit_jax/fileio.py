"""The one writer of every output file: write to a hidden temp file beside the target, fsync,
rename. Readers (and a resumed run) see the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write(path: str, write_fn: Callable, mode: str = "wb") -> str:
  """Calls write_fn(file) on a temp file in path's directory, then renames it to path."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
  try:
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _fsync_dir(d: str) -> None:
  """Makes the rename durable; some filesystems cannot fsync a directory."""
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_text(path: str, text: str) -> str:
  return atomic_write(path, lambda f: f.write(text), "w")


def write_json(path: str, obj: Any, indent: int = 1, **dump_kw) -> str:
  text = json.dumps(obj, indent=indent, ensure_ascii=False, **dump_kw) + "\n"
  return write_text(path, text)


def write_jsonl(path: str, rows: Iterable[Any], **dump_kw) -> str:
  return atomic_write(
      path,
      lambda f: f.writelines(json.dumps(r, ensure_ascii=False, **dump_kw) + "\n" for r in rows),
      "w",
  )


def write_parquet(path: str, table) -> str:
  return atomic_write(path, lambda f: pq.write_table(table, f))


def save_figure(fig, path: str, dpi: int = 100) -> str:
  return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


# `{prefix}{seq:06d}.parquet`, prefix '' or a process's `{index:05d}-`; temp files start with
# '.' and end in `.tmp.<pid>`, so they never match.
_SHARD = re.compile(r"^((?:\d{5}-)?)(\d{6})\.parquet$")


class ParquetShards:
  """A directory of Parquet shards of one schema, the one store behind scores and evaluation
  results: each shard written whole and atomically as `{prefix}{seq:06d}.parquet` (a process
  writes under its own prefix, so hosts never collide), read back in name order in today's
  schema (columns added since a shard was written take their `defaults`), the first row of
  each key kept."""

  def __init__(self, directory: str, schema, key_columns, defaults=None, prefix: str = ""):
    self.dir = directory
    self.schema = schema
    self.key_columns = list(key_columns)
    self.defaults = dict(defaults or {})
    self.prefix = prefix
    os.makedirs(directory, exist_ok=True)
    mine = [
        int(m.group(2))
        for m in map(_SHARD.match, os.listdir(directory))
        if m and m.group(1) == prefix
    ]
    self._seq = max(mine) + 1 if mine else 0

  def paths(self) -> list[str]:
    """Complete shards of every prefix, in name order."""
    return [os.path.join(self.dir, n) for n in sorted(os.listdir(self.dir)) if _SHARD.match(n)]

  def write(self, table) -> str:
    """`table` (in `schema`) as the next shard of this prefix; returns its path."""
    while True:
      path = os.path.join(self.dir, f"{self.prefix}{self._seq:06d}.parquet")
      self._seq += 1
      if not os.path.exists(path):
        return write_parquet(path, table)

  def read(self, path: str):
    """One shard in today's schema."""
    table = pq.read_table(path)
    for name, value in self.defaults.items():
      if name not in table.column_names:
        column = pa.array([value] * table.num_rows, self.schema.field(name).type)
        table = table.append_column(name, column)
    return table.select(self.schema.names).cast(self.schema)

  def keys(self) -> set:
    """Every stored key (tuples of `key_columns`), reading only those columns."""
    keys = set()
    for path in self.paths():
      t = pq.read_table(path, columns=self.key_columns)
      keys.update(zip(*(t.column(c).to_pylist() for c in self.key_columns)))
    return keys

  def read_table(self):
    """Every shard, concatenated in name order, the first row of each key kept (in order)."""
    paths = self.paths()
    if not paths:
      return self.schema.empty_table()
    table = pa.concat_tables([self.read(p) for p in paths])
    rows = table.select(self.key_columns).append_column(
        "__row", pa.array(np.arange(table.num_rows, dtype=np.int64))
    )
    first = rows.group_by(self.key_columns, use_threads=False).aggregate([("__row", "min")])
    keep = np.sort(first.column("__row_min").to_numpy())
    return table if len(keep) == table.num_rows else table.take(pa.array(keep))
