"""Tokenizers (HF `tokenizer.json`, SentencePiece `tokenizer.model`, GGUF metadata) and the
rating tokens "1".."5"."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

RATING_DIGITS = "123456789"  # a scale K rates with the first K


class Tokenizer:
  """A transformers tokenizer; `encode` adds the special tokens the model was trained with
  (LLaMA-2: BOS; SmolLM2: none), as the released code's `tokenizer(text)` does."""

  def __init__(self, hf_tokenizer):
    self.hf = hf_tokenizer

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def eos_id(self) -> int | None:
    return self.hf.eos_token_id

  @property
  def pad_id(self) -> int:
    return self.eos_id if self.hf.pad_token_id is None else self.hf.pad_token_id

  def encode(self, text: str) -> list[int]:
    return self.hf(text)["input_ids"]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.hf(list(texts))["input_ids"] if texts else []

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode(list(ids))

  def token_ends(self, text: str) -> list[int]:
    """Per token of `text` (no special tokens), the character offset its span ends at:
    text[:ends[n - 1]] is the text of the first n tokens, cut in the original string (a
    decode could differ from it in spaces or split characters)."""
    spans = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ends, end = [], 0
    for _, stop in spans["offset_mapping"]:
      end = max(end, stop)  # byte-fallback pieces of one character share its span
      ends.append(end)
    return ends


def load_tokenizer(path: str) -> Tokenizer:
  """From a GGUF file (its metadata) or a checkpoint directory (tokenizer.json, or the
  SentencePiece tokenizer.model that LLaMA-2 ships, converted by transformers)."""
  import transformers  # slow import; only tokenizer loading needs it

  if path.endswith(".gguf"):
    return Tokenizer(_gguf_tokenizer(path))
  if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
  return Tokenizer(transformers.AutoTokenizer.from_pretrained(path))


def _gguf_tokenizer(path: str):
  """The tokenizer in a GGUF file's metadata, built by transformers' GGUF converter.

  `AutoTokenizer.from_pretrained(gguf_file=...)` would do the same but imports PyTorch to read
  the file; the metadata is read here with `gguf`, so scoring needs no PyTorch.
  """
  import transformers
  from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

  from selectit_jax.checkpoints import gguf as gguf_lib
  from selectit_jax.checkpoints.gguf_pretokenizers import apply_gguf_pre_tokenizer

  fields = gguf_lib.reader(path).fields
  meta = {
      k: f.contents()
      for k, f in fields.items()
      if k.startswith("tokenizer.") or k == "general.architecture"
  }
  groups = {
      group: {
          name: meta[f"tokenizer.{key}"]
          for key, name in renames.items()
          if f"tokenizer.{key}" in meta
      }
      for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()
  }
  tokens, config = groups["tokenizer"], groups["tokenizer_config"]
  _default_add_bos(tokens.get("tokenizer_type"), config)
  for name in ("bos", "eos", "unknown", "padding"):
    token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
    key = {"unknown": "unk", "padding": "pad"}.get(name, name) + "_token"
    config[key] = tokens["tokens"][token_id] if token_id is not None else None
  backend, extra = mapping.convert_gguf_tokenizer(meta["general.architecture"], tokens)
  # The converter drops pre-types it does not know (SmolLM2's "smollm"); set llama.cpp's.
  apply_gguf_pre_tokenizer(
      backend, meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre"), path
  )
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _default_add_bos(tokenizer_type: str | None, config: dict) -> None:
  """transformers' `get_gguf_tokenizer` defaults, which PyTorch-free loading must repeat.

  A SentencePiece vocabulary ("llama") that does not say gets BOS, as llama.cpp adds it and
  LLaMA-2 was trained with it (the released code's `tokenizer(text)` prepends <s>); older
  files lack the key. gemma4 files say true, but its reference tokenizer adds none.
  """
  if tokenizer_type == "llama":
    config.setdefault("add_bos_token", True)
  elif tokenizer_type == "gemma4":
    config["add_bos_token"] = False


def rating_token_ids(tokenizer: Tokenizer, context: str, scale: int = 5) -> np.ndarray:
  """Ids of "1".."scale" as the model would emit them right after `context`.

  The digit's token is the last token of `context + digit`; it must be the digit alone
  (one token, decoding to exactly that digit), or a single next-token probability would
  not be its rating probability. The context's own last tokens may merge differently
  without the digit (BPE: " \n" is one token at the end of text), which is why the ids are
  read from the text with the digit appended.
  """
  ids = []
  for digit in RATING_DIGITS[:scale]:
    last = tokenizer.encode(context + digit)[-1]
    if tokenizer.decode([last]) != digit:
      raise ValueError(
          f"rating digit {digit!r} is not a single token after the prompt's closing text "
          f"{context[-20:]!r}: its last token {last} decodes to {tokenizer.decode([last])!r}"
      )
    ids.append(last)
  if len(set(ids)) != len(ids):
    raise ValueError(f"rating digits map to repeated token ids {ids}")
  return np.asarray(ids, np.int32)
