"""Tokenizers (HF `tokenizer.json`, SentencePiece `tokenizer.model`, GGUF metadata) and the
rating tokens "1".."5"."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

RATING_DIGITS = "12345"


class Tokenizer:
  """`encode` adds the special tokens the model was trained with (LLaMA-2: BOS)."""

  def __init__(self, backend, *, sentencepiece: bool = False, add_bos: bool = True):
    self.backend = backend
    self._sp = sentencepiece
    self._add_bos = add_bos

  @property
  def hf(self):
    """The transformers tokenizer, or None for a bare SentencePiece model."""
    return None if self._sp else self.backend

  @property
  def bos_id(self) -> int | None:
    return self.backend.bos_id() if self._sp else self.backend.bos_token_id

  @property
  def eos_id(self) -> int | None:
    return self.backend.eos_id() if self._sp else self.backend.eos_token_id

  @property
  def pad_id(self) -> int:
    if self._sp:
      pad = self.backend.pad_id()
      return pad if pad >= 0 else self.eos_id
    pad = self.backend.pad_token_id
    return self.eos_id if pad is None else pad

  def encode(self, text: str) -> list[int]:
    if self._sp:
      ids = self.backend.encode(text)
      return [self.bos_id] + ids if self._add_bos else ids
    return self.backend(text)["input_ids"]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self._sp:
      return [self.encode(t) for t in texts]
    return self.backend(list(texts))["input_ids"]

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode(list(ids))


def load_tokenizer(path: str) -> Tokenizer:
  """From a GGUF file (its metadata) or a checkpoint directory (tokenizer.json via
  transformers, else SentencePiece tokenizer.model as LLaMA-2 ships)."""
  import transformers  # slow import; only tokenizer loading needs it

  if path.endswith(".gguf"):
    hf_tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return Tokenizer(hf_tok)
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return Tokenizer(transformers.AutoTokenizer.from_pretrained(path))
  sp_path = os.path.join(path, "tokenizer.model")
  if os.path.exists(sp_path):
    import sentencepiece as spm
    add_bos = True
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        add_bos = json.load(f).get("add_bos_token", True)
    return Tokenizer(spm.SentencePieceProcessor(model_file=sp_path), sentencepiece=True,
                     add_bos=add_bos)
  raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")


def rating_token_ids(tokenizer: Tokenizer, context: str) -> np.ndarray:
  """Ids of "1".."5" as the model would emit them right after `context`.

  The digit's token is the last token of `context + digit`; it must be the digit alone
  (one token, decoding to exactly that digit), or a single next-token probability would
  not be its rating probability. The context's own last tokens may merge differently
  without the digit (BPE: " \n" is one token at the end of text), which is why the ids are
  read from the text with the digit appended.
  """
  ids = []
  for digit in RATING_DIGITS:
    last = tokenizer.encode(context + digit)[-1]
    if tokenizer.decode([last]) != digit:
      raise ValueError(
          f"rating digit {digit!r} is not a single token after the prompt's closing text "
          f"{context[-20:]!r}: its last token {last} decodes to {tokenizer.decode([last])!r}")
    ids.append(last)
  if len(set(ids)) != len(ids):
    raise ValueError(f"rating digits map to repeated token ids {ids}")
  return np.asarray(ids, np.int32)
