"""Fine-tuned params -> a HF checkpoint directory `transformers` loads (config.json,
safetensors, tokenizer files)."""

from __future__ import annotations

import jax
import numpy as np

from selectit_jax.checkpoints import hf
from selectit_jax.models.llama import LlamaConfig


def export_hf(directory: str, cfg: LlamaConfig, params, tokenizer) -> str:
  """Writes fp32 weights (HF layout) and the tokenizer. A GGUF-sourced tokenizer is the
  transformers one built from the GGUF metadata, saved with save_pretrained, so the
  directory does not depend on the GGUF file."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  hf.save_hf(directory, cfg, host)
  tokenizer.hf.save_pretrained(directory)
  return directory
