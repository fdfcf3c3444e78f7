"""The one writer of every output file: write to a hidden temp file beside the target, fsync,
rename. Readers (and a resumed run) see the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable


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
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  return atomic_write(path, lambda f: pq.write_table(table, f))


def save_figure(fig, path: str, dpi: int = 100) -> str:
  return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
