"""Our Flax LLaMA vs HF transformers (PyTorch, fp32) on the same files."""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from conftest import right_padded
from conftest import REFERENCE_PROMPTS, assert_same_tokens, sharegpt_records, write_tiny_checkpoint
from selectit_jax.models import costs
from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine
from selectit_jax.data import prompts
from selectit_jax.parallel import sharding
from selectit_jax.models.llama import Llama
from selectit_jax.checkpoints import gguf as gguf_lib
from selectit_jax.checkpoints.gguf_pretokenizers import apply_gguf_pre_tokenizer
from selectit_jax.checkpoints.tokenizer import load_tokenizer, rating_token_ids


def _our_logits(model, tokens, positions, segments):
  llama = Llama(model.config)
  hidden = llama.apply({"params": model.params}, tokens, positions, segments)
  return np.asarray(llama.apply({"params": model.params}, hidden, method=Llama.logits))


@pytest.mark.parametrize(
    "tied,sharded",
    [(False, False), (True, False), (False, True)],
    ids=["untied", "tied", "sharded_index"],
)
def test_tiny_checkpoint_logits_match_transformers(tmp_path, tied, sharded):
  cfg = write_tiny_checkpoint(
      str(tmp_path),
      seed=3,
      tie_word_embeddings=tied,
      max_shard_bytes=40_000 if sharded else 2 << 30,
      tokenizer=False,
  )
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
  model = checkpoints.load_model(str(tmp_path))
  assert model.num_params == costs.num_params(cfg)

  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (17, 5, 11)]
  tokens, positions, segments = right_padded(seqs)
  ours = _our_logits(model, tokens, positions, segments)

  ref_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  with torch.no_grad():
    ref = ref_model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(segments, dtype=torch.long),
    ).logits.numpy()
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(ours[i, : len(s)], ref[i, : len(s)], atol=1e-4, rtol=0)


def test_readout_gives_the_full_states_at_those_positions(tiny_checkpoint):
  """`readout` runs the last layer for the chosen positions only: packed segments, padding,
  a position chosen twice."""
  model = checkpoints.load_model(tiny_checkpoint)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, model.config.vocab_size, (2, 24)).astype(np.int32)
  segments = np.array([[1] * 10 + [2] * 9 + [0] * 5, [1] * 24], np.int32)
  positions = np.array([list(range(10)) + list(range(9)) + [0] * 5, list(range(24))], np.int32)
  readout = np.array([[9, 18, 0], [23, 5, 5]], np.int32)
  llama = Llama(model.config)
  full = np.asarray(llama.apply({"params": model.params}, tokens, positions, segments))
  chosen = llama.apply({"params": model.params}, tokens, positions, segments, readout=readout)
  np.testing.assert_allclose(
      chosen, np.take_along_axis(full, readout[..., None], axis=1), atol=1e-6, rtol=0
  )


def test_missing_tensor_is_named(tmp_path):
  write_tiny_checkpoint(str(tmp_path), tokenizer=False)
  from safetensors.numpy import load_file, save_file

  path = tmp_path / "model.safetensors"
  tensors = load_file(str(path))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(path))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    checkpoints.load_model(str(tmp_path))


def test_shape_mismatch_is_named(tmp_path):
  write_tiny_checkpoint(str(tmp_path), tokenizer=False)
  from safetensors.numpy import load_file, save_file

  path = tmp_path / "model.safetensors"
  tensors = load_file(str(path))
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 64), np.float32)
  save_file(tensors, str(path))
  with pytest.raises(ValueError, match=r"k_proj\.weight: shape \(7, 64\)"):
    checkpoints.load_model(str(tmp_path))


def test_unknown_architecture_is_refused(tmp_path):
  write_tiny_checkpoint(str(tmp_path), tokenizer=False)
  import json

  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="unsupported architecture"):
    checkpoints.load_model(str(tmp_path))


def test_sentencepiece_tokenizer_matches_llama_tokenizer(tiny_checkpoint):
  import sentencepiece as spm

  ours = load_tokenizer(tiny_checkpoint)
  theirs = transformers.LlamaTokenizer.from_pretrained(tiny_checkpoint)
  raw = spm.SentencePieceProcessor(model_file=os.path.join(tiny_checkpoint, "tokenizer.model"))
  texts = [
      prompts.build_text(p, "Write a poem about the sea.", "The sea is wide, 2345 waves.")
      for p in prompts.default_prompts()
  ] + ["日本語 and émigré\ttabs\n\nnewlines 12345"]
  for text in texts:
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ids == [raw.bos_id()] + raw.encode(text)  # LLaMA-2 layout: BOS, no EOS
  digits = rating_token_ids(ours, texts[0])
  assert [raw.id_to_piece(int(i)) for i in digits] == list("12345")


def test_rating_digits_must_be_single_tokens(tiny_checkpoint):
  class Merging:
    """A tokenizer whose "5" merges with the newline before it."""

    def __init__(self, tok):
      self.tok = tok

    def encode(self, text):
      ids = self.tok.encode(text)
      return ids[:-2] + [999] if text.endswith("\n5") else ids

    def decode(self, ids):
      return "\n5" if list(ids) == [999] else self.tok.decode(ids)

  tok = Merging(load_tokenizer(tiny_checkpoint))
  with pytest.raises(ValueError, match="rating digit '5' is not a single token"):
    rating_token_ids(tok, "The answer is: \n")


@pytest.fixture(scope="module")
def smollm2():
  path = assets.default_gguf_path()
  return path, checkpoints.load_model(path), load_tokenizer(path)


def test_gguf_config_and_num_params(smollm2):
  _, model, tok = smollm2
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
      30,
      576,
      9,
      3,
      49152,
  )
  assert c.tie_word_embeddings and "lm_head" not in model.params
  assert model.num_params == costs.num_params(c) == 134_515_008
  assert tok.bos_id == 1 and tok.encode("hi")[0] != tok.bos_id  # SmolLM2 adds no BOS


@pytest.mark.slow  # 100 reference forwards
def test_gguf_rating_probs_match_transformers(smollm2):
  """Full-vocabulary softmax P("1".."5") at the last position of 10 real ShareGPT samples x
  all 5 rating prompts (the released file when present beside the checkout, else ours),
  through the engine's path (shared prefixes, packed rows), against transformers
  (gguf_file=) + torch fp32: within 1e-4 relative + 1e-6 absolute."""
  path, model, tok = smollm2
  prompt_list = (
      prompts.load_prompts(REFERENCE_PROMPTS)[:5]
      if os.path.exists(REFERENCE_PROMPTS)
      else prompts.default_prompts()[:5]  # K = 5 of our six, as prompts.k's default
  )
  recs = [
      dataclasses.replace(r, instruction=r.instruction[:240], response=r.response[:240])
      for r in sharegpt_records(10)
  ]
  digits = rating_token_ids(tok, prompts.build_text(prompt_list[0], "", ""))

  items, _ = batching.prepare(recs, prompt_list, prompts.DEFAULT_TEMPLATE, tok, max_tokens=1024)
  assert len(items) == 50
  plan = batching.make_plan(
      items,
      ml_collections.ConfigDict(
          dict(
              prefix_cache=True,
              max_shapes=3,
              bucket_multiple=16,
              max_tokens=1024,
              batch_size=2,
              max_segments=4,
              fit_buckets=False,
          )
      ),
  )
  assert min(len(p) for p in plan.prefixes) > 20
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  scorer = engine.Scorer(model.config, model.params, digits, mesh, 2, plan.prefixes, 4, tok.pad_id)
  ours = {
      (it.sample_index, it.prompt_index): p
      for rated in scorer.rate(plan.batches)
      for it, p in zip(rated.batch.items, rated.probs)
  }

  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  worst = 0.0
  for it in items:
    with torch.no_grad():
      logits = ref_model(torch.tensor(np.asarray(it.ids))[None], logits_to_keep=1).logits[0, -1]
    ref = torch.softmax(logits.double(), -1)[torch.tensor(digits, dtype=torch.long)].numpy()
    got = ours[(it.sample_index, it.prompt_index)]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    worst = max(worst, float(np.max(np.abs(got - ref) / (ref + 1e-6))))
  assert worst < 1e-4


def test_gguf_tokenizer_matches_transformers_auto_tokenizer(smollm2):
  path, _, ours = smollm2
  theirs = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  # transformers drops SmolLM2's "smollm" pre-tokenizer (digits alone); restore it so both
  # sides cut text as the model was trained (ours against llama.cpp: test_gguf_tokenizer.py).
  fields = gguf_lib.reader(path).fields  # the file's reader the fixture's load already parsed
  apply_gguf_pre_tokenizer(
      theirs.backend_tokenizer,
      fields["tokenizer.ggml.model"].contents(),
      fields["tokenizer.ggml.pre"].contents(),
      path,
  )
  assert_same_tokens(
      ours, theirs, ["<|im_start|>user\nhi<|im_end|>", "  leading\tspaces 12345 日本語 émigré"]
  )
  assert ours.hf.chat_template == theirs.chat_template


def test_scoring_path_does_not_import_torch():
  """torch is a test-only extra: loading the default model and tokenizer must not need it."""
  import subprocess
  import sys

  code = (
      "import sys; from selectit_jax import assets, checkpoints; "
      "from selectit_jax.scoring import runner; from selectit_jax.checkpoints import tokenizer; "
      "p = assets.default_gguf_path(); tokenizer.load_tokenizer(p); "
      "checkpoints.tensor_source(p); assert 'torch' not in sys.modules, 'torch imported'"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_bf16_and_fp16_safetensors_load(tmp_path):
  """LLaMA-family checkpoints ship in bf16 or fp16; safetensors' numpy reader has no bf16."""
  import ml_dtypes
  import safetensors.torch

  write_tiny_checkpoint(str(tmp_path / "f32"), tokenizer=False, max_shard_bytes=40_000)
  ref = checkpoints.load_model(str(tmp_path / "f32"))
  for name, torch_dtype, np_dtype in (
      ("bf16", torch.bfloat16, ml_dtypes.bfloat16),
      ("f16", torch.float16, np.float16),
  ):
    out = tmp_path / name
    out.mkdir()
    for f in os.listdir(tmp_path / "f32"):
      src = str(tmp_path / "f32" / f)
      if f.endswith(".safetensors"):
        tensors = {k: v.to(torch_dtype) for k, v in safetensors.torch.load_file(src).items()}
        safetensors.torch.save_file(tensors, str(out / f), metadata={"format": "pt"})
      else:
        (out / f).write_bytes(open(src, "rb").read())
    model = checkpoints.load_model(str(out))
    for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(ref.params)):
      np.testing.assert_array_equal(
          np.asarray(got), np.asarray(want).astype(np_dtype).astype(np.float32)
      )
