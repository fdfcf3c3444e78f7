"""Shared fixtures: tiny random LLaMA checkpoints and a SentencePiece tokenizer trained here.

Eight fake CPU devices are set up before JAX is imported, so mesh code runs on CPU.
"""
import io
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from selectit_jax.checkpoints import hf  # noqa: E402
from selectit_jax.models.llama import LlamaConfig  # noqa: E402

TINY_VOCAB = 400
# The released code's rating prompts, a read-only fixture beside the checkout (../shared).
REFERENCE_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "..", "shared", "reference", "rating_prompt.txt")
_CORPUS = (
    "Rate the response from 1 to 5 and answer with one digit.\n",
    "Instruction:Write a short poem about the sea.\n",
    "Response:The sea is wide and deep; 2345 waves roll in.\n",
    "The answer is: 4\n",
    "Please explain how photosynthesis works in plants, step by step.\n",
    "Sure! Plants use light, water and carbon dioxide to make sugar and oxygen.\n",
)


def tiny_config(**overrides) -> LlamaConfig:
  base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, max_position_embeddings=512)
  base.update(overrides)
  return LlamaConfig(**base)


def write_sentencepiece(directory: str) -> None:
  """A LLaMA-2-style SentencePiece BPE model (byte fallback, split digits, identity
  normalisation) plus the tokenizer_config.json LLaMA-2 ships (BOS added)."""
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_CORPUS * 40), model_writer=model, vocab_size=TINY_VOCAB,
      model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
               "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>"}, f)


def write_tiny_checkpoint(directory: str, *, seed: int = 0, max_shard_bytes: int = 2 << 30,
                          tokenizer: bool = True, **overrides) -> LlamaConfig:
  """config.json + random safetensors (HF layout, written by safetensors.numpy) in
  `directory`; sharded with an index when `max_shard_bytes` is small."""
  cfg = tiny_config(**overrides)
  rng = np.random.default_rng(seed)
  params = {}
  for spec in hf.param_table(cfg):
    shape = _our_shape(spec.path, cfg)
    scale = 1.0 if spec.path[-1] == "scale" else 0.5 / np.sqrt(shape[-2] if len(shape) > 1 else 1)
    value = rng.normal(size=shape).astype(np.float32) * scale
    if spec.path[-1] == "scale":
      value = 1.0 + 0.1 * value
    node = params
    for k in spec.path[:-1]:
      node = node.setdefault(k, {})
    node[spec.path[-1]] = value
  hf.save_hf(directory, cfg, params, max_shard_bytes=max_shard_bytes)
  if tokenizer:
    write_sentencepiece(directory)
  return cfg


def _our_shape(path, cfg):
  d, h, kv, hd, f, v, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size, cfg.num_layers)
  return {
      ("embedding",): (v, d), ("lm_head",): (d, v), ("final_norm", "scale"): (d,),
      ("layers", "attn_norm", "scale"): (L, d), ("layers", "mlp_norm", "scale"): (L, d),
      ("layers", "attn", "q"): (L, d, h, hd), ("layers", "attn", "k"): (L, d, kv, hd),
      ("layers", "attn", "v"): (L, d, kv, hd), ("layers", "attn", "o"): (L, h, hd, d),
      ("layers", "mlp", "gate"): (L, d, f), ("layers", "mlp", "up"): (L, d, f),
      ("layers", "mlp", "down"): (L, f, d),
  }[tuple(path)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
  """A tiny untied GQA checkpoint with a SentencePiece tokenizer (shared, read-only)."""
  directory = str(tmp_path_factory.mktemp("tiny_llama"))
  write_tiny_checkpoint(directory)
  return directory


def sharegpt_records(n: int):
  """The first `n` usable records of the embedded ShareGPT file."""
  import ml_collections
  from selectit_jax import assets
  from selectit_jax.data import records
  cfg = ml_collections.ConfigDict(dict(path=assets.default_sharegpt_path(), format="sharegpt",
                                       limit=4 * n + 20, turns="first"))
  recs, _, _ = records.read_records(cfg)
  return recs[:n]
