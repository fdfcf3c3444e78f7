"""The KV-cache greedy decoder vs HF transformers `generate(do_sample=False)` + torch fp32, and
its stopping rules (EOS ids, stop strings) per row of a batch."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.models.decode import Generator
from selectit_jax.parallel import sharding
from conftest import TINY_GEMMA3 as GEMMA_TINY, write_tiny_gemma3 as write_tiny_gemma

ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)
MAX_NEW = 16


def _generator(model, mesh_cfg, devices, **kw):
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
  return Generator(model.config, model.params, mesh, max_len=128, length_multiple=32, **kw)


def _hf_greedy(ref_model, prompt, max_new, eos):
  """HF's greedy continuation of one prompt alone, cut before its EOS."""
  with torch.no_grad():
    out = ref_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
  return out[: out.index(eos)] if eos in out else out


def _prompts(vocab, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).tolist() for n in lengths]


# Params and rows sharded over fsdp=2 × tensor=2 (8 fake CPU devices, conftest).
SHARDED = dict(data=1, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
  """The tiny LLaMA on a 2×2 mesh, 4 prompts of different lengths, a generator (batches of
  2) and its greedy output."""
  mesh = sharding.make_mesh(SHARDED, jax.devices()[:4])
  model = checkpoints.load_model(tiny_checkpoint, mesh=mesh)
  prompts = _prompts(model.config.vocab_size, (3, 20, 11, 7))
  gen = _generator(model, SHARDED, 4, batch_size=2)
  return model, prompts, gen, gen.generate(prompts, MAX_NEW, eos_ids=[2])


def test_llama_batches_match_transformers_each_prompt_alone(llama, tiny_checkpoint):
  _, prompts, _, ours = llama
  ref = transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
  assert [_hf_greedy(ref, p, MAX_NEW, 2) for p in prompts] == ours


def test_gemma3_matches_transformers_past_the_sliding_window(tmp_path):
  write_tiny_gemma(str(tmp_path))
  model = checkpoints.load_model(str(tmp_path))
  prompts = _prompts(GEMMA_TINY.vocab_size, (5, 12, 9), seed=1)
  assert GEMMA_TINY.sliding_window < 12 < 12 + MAX_NEW
  gen = _generator(model, ONE_DEVICE, 1, batch_size=4)
  ours = gen.generate(prompts, MAX_NEW, eos_ids=[1])
  load = lambda **kw: transformers.Gemma3ForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager", **kw
  )
  ref_model = load()
  ref = [_hf_greedy(ref_model, p, MAX_NEW, 1) for p in prompts]
  assert ours == ref
  # The window decides these tokens: without it HF continues the longest prompt otherwise.
  assert _hf_greedy(load(sliding_window=1000), prompts[1], MAX_NEW, 1) != ref[1]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_shared_few_shot_prefix_is_prefilled_once(family, tiny_checkpoint, tmp_path):
  """Prompts that start alike (a few-shot context) decode as HF does each alone, with the
  common tokens (rounded down to length_multiple=32) prefilled once for the call; Gemma's
  sliding window is shorter than that prefix."""
  if family == "llama":
    path, cls, mesh, devices, eos = tiny_checkpoint, transformers.LlamaForCausalLM, SHARDED, 4, 2
  else:
    write_tiny_gemma(str(tmp_path))
    path, cls, mesh, devices, eos = str(tmp_path), transformers.Gemma3ForCausalLM, ONE_DEVICE, 1, 1
    assert GEMMA_TINY.sliding_window < 32
  model = checkpoints.load_model(path, mesh=sharding.make_mesh(mesh, jax.devices()[:devices]))
  context = _prompts(model.config.vocab_size, (45,), seed=2)[0]
  prompts = [context + q for q in _prompts(model.config.vocab_size, (4, 9, 1), seed=3)]
  gen = _generator(model, mesh, devices, batch_size=2)
  ours = gen.generate(prompts, MAX_NEW, eos_ids=[eos])
  assert gen.stats.shared_tokens == 32 and gen.stats.prompt_tokens == sum(map(len, prompts))
  ref_model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
  assert ours == [_hf_greedy(ref_model, p, MAX_NEW, eos) for p in prompts]
  # Prompts with nothing in common beyond a few tokens share nothing.
  gen.generate([p[40:] for p in prompts], 2)
  assert gen.stats.shared_tokens == 32


def test_eos_and_stop_strings_end_rows_independently(llama, tiny_checkpoint):
  """The free-running rows, each cut where an EOS id or a stop string (checked every 4
  steps) first appears in it."""
  _, prompts, gen, free = llama
  tok = load_tokenizer(tiny_checkpoint)
  eos = free[0][5]
  text = tok.decode(free[2])
  stop = text[len(text) // 2 : len(text) // 2 + 3]
  assert stop.strip()

  def expected(ids):
    ids = ids[: ids.index(eos)] if eos in ids else ids
    for n in range(1, len(ids) + 1):
      if stop in tok.decode(ids[:n]):
        return ids[:n]
    return ids

  want = [expected(ids) for ids in free]
  assert len({len(w) for w in want}) > 1 and want != free
  gen.check_every = 4
  before = gen.stats.new_tokens
  got = gen.generate(prompts, MAX_NEW, eos_ids=[2, eos], stop=[stop], decode=tok.decode)
  assert got == want
  assert gen.stats.new_tokens - before == sum(map(len, want))


def test_prompts_must_fit_and_stops_need_a_decoder(llama):
  _, prompts, gen, _ = llama
  with pytest.raises(ValueError, match="prompt 1: 128 tokens"):
    gen.generate([[5], [5] * 128], 4)
  with pytest.raises(ValueError, match="decode function"):
    gen.generate(prompts, 4, stop=["x"])
  assert gen.generate(prompts, 0) == [[]] * 4


@pytest.mark.slow  # loads the GGUF twice (ours, transformers)
def test_smollm2_real_prompts_match_transformers():
  path = assets.default_gguf_path()
  model = checkpoints.load_model(path)
  tok = load_tokenizer(path)
  texts = [
      "The capital of France is",
      "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
  ]
  prompts = [tok.encode(t) for t in texts]
  gen = _generator(model, ONE_DEVICE, 1, batch_size=2)
  ours = gen.generate(prompts, 20, eos_ids=[tok.eos_id])
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  assert ours == [_hf_greedy(ref_model, p, 20, tok.eos_id) for p in prompts]
  assert all(len(o) >= 5 for o in ours)


def test_generator_rejects_a_batch_the_mesh_cannot_split(llama):
  model = llama[0]
  with pytest.raises(ValueError, match="not a multiple of the mesh's data×fsdp=2"):
    _generator(model, dict(data=2, fsdp=1, tensor=1), 2, batch_size=3)
