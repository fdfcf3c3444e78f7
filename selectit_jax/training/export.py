"""Fine-tuned params -> a HF checkpoint directory `transformers` loads: config.json (with the
BOS / EOS ids), generation_config.json (generation stops at every id that ends an answer,
e.g. SmolLM2's <|im_end|>), safetensors (fp32, or bf16 when asked) and the tokenizer files.

On several processes the params are global arrays that no process holds in full: every
process takes part in gathering each tensor (`process_allgather`, a collective), process 0
writes. A bucket URI (gs://...) is written to a local staging directory, then copied with
etils.epath.
"""

from __future__ import annotations

import os
import tempfile

import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from selectit_jax import fileio
from selectit_jax.checkpoints import hf
from selectit_jax.errors import UserError
from selectit_jax.models.llama import LlamaConfig
from selectit_jax.training import checkpointing

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def host_params(params, dtype=np.float32):
  """Every leaf as a numpy array of `dtype` on this host. Cast on the devices first (a bf16
  export gathers half the bytes); a leaf this process cannot address in full is gathered
  from all processes, so every process must call this, in the same order."""

  def fetch(x):
    x = x.astype(dtype) if x.dtype != dtype else x
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(fetch, params)


def _token_ids(tokenizer, eos_ids) -> dict:
  eos = list(dict.fromkeys(int(i) for i in (eos_ids or [tokenizer.eos_id]) if i is not None))
  out = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}
  out["eos_token_id"] = eos[0] if len(eos) == 1 else eos or None
  return out


def _write(directory: str, cfg, host, tokenizer, ids: dict, dtype_name: str) -> None:
  hf.save_hf(
      directory,
      cfg,
      host,
      dtype=DTYPES[dtype_name],
      config_extra={**ids, "torch_dtype": dtype_name},
  )
  fileio.write_json(
      os.path.join(directory, "generation_config.json"), {**ids, "do_sample": False}, indent=2
  )
  tokenizer.hf.save_pretrained(directory)


def export_hf(
    directory: str,
    cfg: LlamaConfig,
    params,
    tokenizer,
    eos_ids=None,
    dtype: str = "float32",
) -> str:
  """Writes the HF directory (process 0) and returns its path. `eos_ids`: the ids generation
  stops at (default the tokenizer's EOS); `dtype`: float32 | bfloat16 for the weights. A
  GGUF-sourced tokenizer is the transformers one built from the GGUF metadata, saved with
  save_pretrained, so the directory does not depend on the GGUF file."""
  if dtype not in DTYPES:
    raise UserError(f"export.dtype={dtype!r}; expected one of {tuple(DTYPES)}")
  host = host_params(params, DTYPES[dtype])
  ids = _token_ids(tokenizer, eos_ids)
  if jax.process_index() == 0:
    if checkpointing.is_uri(directory):
      with tempfile.TemporaryDirectory() as staging:
        _write(staging, cfg, host, tokenizer, ids, dtype)
        dest = epath.Path(directory)
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(staging)):
          (dest / name).write_bytes(epath.Path(staging, name).read_bytes())
    else:
      _write(directory, cfg, host, tokenizer, ids, dtype)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("export_hf")  # the directory is complete for everyone
  return directory
