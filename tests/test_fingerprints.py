"""Weight fingerprints hash every byte and are cached by path, size and mtime."""

import json
import os

import pytest

from selectit_jax import checkpoints
from selectit_jax.checkpoints import fingerprints

MIB = 1 << 20


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  return tmp_path / "cache"


@pytest.fixture
def hash_calls(monkeypatch):
  calls = []
  real = fingerprints.hash_files

  def counting(files):
    calls.append(list(files))
    return real(files)

  monkeypatch.setattr(fingerprints, "hash_files", counting)
  return calls


def _twin(path, size, middle_byte):
  """A sparse file of `size` zero bytes but one byte at its middle."""
  with open(path, "wb") as f:
    f.truncate(size)
    f.seek(size // 2)
    f.write(bytes([middle_byte]))
  return str(path)


def test_middle_bytes_count(tmp_path):
  a = _twin(tmp_path / "a.gguf", 3 * MIB, 1)
  b = _twin(tmp_path / "b.gguf", 3 * MIB, 2)
  fa, fb = checkpoints.fingerprint(a), checkpoints.fingerprint(b)
  assert fa != fb and len(fa) == len(fb) == 16 and int(fa, 16) >= 0


@pytest.mark.slow  # hashes 2 x 2 GiB (sparse on disk)
def test_fine_tunes_over_2_gib_differ(tmp_path):
  # The earlier fingerprint hashed only the first and last MiB above 2 GiB: these collided.
  size = (2 << 30) + 4 * MIB
  a = _twin(tmp_path / "a.gguf", size, 1)
  b = _twin(tmp_path / "b.gguf", size, 2)
  assert checkpoints.fingerprint(a) != checkpoints.fingerprint(b)


def test_directory_hashes_weight_files_only(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"w" * 100)
  (tmp_path / "config.json").write_text("{}")
  before = checkpoints.fingerprint(str(tmp_path))
  (tmp_path / "README.md").write_text("notes")
  assert checkpoints.fingerprint(str(tmp_path)) == before
  (tmp_path / "model.safetensors").write_bytes(b"v" * 100)
  assert checkpoints.fingerprint(str(tmp_path)) != before


def test_cache_is_used_and_invalidated_by_mtime(tmp_path, hash_calls, cache_home):
  path = _twin(tmp_path / "m.gguf", 2 * MIB, 7)
  first = checkpoints.fingerprint(path)
  assert checkpoints.fingerprint(path) == first
  assert len(hash_calls) == 1
  with open(fingerprints.cache_path()) as f:
    assert json.load(f)[os.path.abspath(path)]["fingerprint"] == first
  assert fingerprints.cache_path().startswith(str(cache_home))

  # Same size, new content, new mtime: hashed again.
  _twin(path, 2 * MIB, 8)
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  second = checkpoints.fingerprint(path)
  assert second != first and len(hash_calls) == 2
  # Only the mtime changes: hashed again, same value.
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
  assert checkpoints.fingerprint(path) == second and len(hash_calls) == 3


def test_corrupt_or_unwritable_cache_is_ignored(tmp_path, hash_calls, monkeypatch):
  path = _twin(tmp_path / "m.gguf", MIB, 3)
  os.makedirs(os.path.dirname(fingerprints.cache_path()))
  for junk in ("{not json", "[1, 2]", '{"%s": {"scheme": 1, "files": 3}}' % path):
    with open(fingerprints.cache_path(), "w") as f:
      f.write(junk)
    assert checkpoints.fingerprint(path) == fingerprints.hash_files([path])
  assert checkpoints.fingerprint(path) == fingerprints.hash_files([path])
  # A cache file that cannot be written (its directory is a file) costs only time.
  monkeypatch.setenv("XDG_CACHE_HOME", str(path))
  assert checkpoints.fingerprint(path) == fingerprints.hash_files([path])


def test_cache_drops_checkpoints_that_are_gone(tmp_path):
  keep = _twin(tmp_path / "keep.gguf", MIB, 1)
  gone = _twin(tmp_path / "gone.gguf", MIB, 2)
  checkpoints.fingerprint(gone)
  os.remove(gone)
  checkpoints.fingerprint(keep)
  with open(fingerprints.cache_path()) as f:
    assert list(json.load(f)) == [os.path.abspath(keep)]
