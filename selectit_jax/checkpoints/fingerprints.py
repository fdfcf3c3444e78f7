"""Content fingerprints of weight files, part of every stored score's key.

Every byte is hashed: two fine-tunes of one base share their size, headers and often their
first and last tensors, so any sampled hash can give both one key. Hashing a 70B checkpoint
takes minutes, so the result is cached per checkpoint path in a small JSON file and reused
while every weight file keeps its size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os

from absl import logging

from selectit_jax import fileio

_CHUNK = 1 << 24
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".model")
# Bump when the hashed content changes, so older cache entries are recomputed.
_SCHEME = 1


def fingerprint(path: str) -> str:
  """sha256 (16 hex) of a GGUF file or a checkpoint directory's weight files (names, sizes and
  every byte); the same value the earlier whole-file hash gave checkpoints up to 2 GiB."""
  files = weight_files(path)
  # Stamps are taken before hashing: a file rewritten meanwhile fails the next lookup.
  stamps = [_stamp(f) for f in files]
  key = os.path.abspath(path)
  cache = _read_cache()
  entry = cache.get(key)
  if (
      isinstance(entry, dict)
      and entry.get("scheme") == _SCHEME
      and entry.get("files") == stamps
      and isinstance(entry.get("fingerprint"), str)
  ):
    return entry["fingerprint"]
  value = hash_files(files)
  cache[key] = {"scheme": _SCHEME, "files": stamps, "fingerprint": value}
  _write_cache(cache)
  return value


def weight_files(path: str) -> list[str]:
  if os.path.isdir(path):
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(_WEIGHT_SUFFIXES)]
  return [path]


def hash_files(files: list[str]) -> str:
  """The uncached hash: each file's name and size, then all of its bytes."""
  h = hashlib.sha256()
  for f in files:
    h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}\0".encode())
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(_CHUNK), b""):
        h.update(chunk)
  return h.hexdigest()[:16]


def cache_path() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "selectit_jax", "fingerprints.json")


def _stamp(f: str) -> list:
  st = os.stat(f)
  return [os.path.basename(f), st.st_size, st.st_mtime_ns]


def _read_cache() -> dict:
  """The cache, or {} when it is missing or corrupt (it is only ever a shortcut)."""
  try:
    with open(cache_path(), encoding="utf-8") as f:
      cache = json.load(f)
  except (OSError, ValueError):
    return {}
  return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict) -> None:
  # Entries of checkpoints that are gone (test temp dirs, deleted downloads) are dropped, so
  # the file stays small. Another process writing at the same time may drop our entry:
  # it is recomputed next time. A cache that cannot be written costs only time.
  cache = {k: v for k, v in cache.items() if os.path.exists(k)}
  try:
    fileio.write_json(cache_path(), cache, indent=None)
  except OSError as e:
    logging.warning("fingerprint cache %s not written: %s", cache_path(), e)
