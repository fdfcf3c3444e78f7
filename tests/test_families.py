"""LLaMA-family variants (Llama 3 rope scaling, Qwen2/2.5, Qwen3) vs HF transformers (PyTorch,
fp32) on tiny random checkpoints written here through our HF export (`hf.save_hf`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_training_grads_match_transformers
from conftest import right_padded
from conftest import training_batch
import torch
import transformers

from selectit_jax import checkpoints
from selectit_jax.checkpoints import hf
from selectit_jax.models import costs
from selectit_jax.models import registry
from selectit_jax.models.layers import rope_inv_freq
from selectit_jax.models.llama import LlamaConfig
from selectit_jax.parallel import sharding
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine

_BASE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)
# Llama 3 scaling with an original context of 32: the 40-token texts pass it, and the
# wavelengths of head_dim 16 at theta 1e4 fall on all three sides of the smoothing band.
LLAMA3 = (
    ("factor", 4.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 32),
    ("rope_type", "llama3"),
)
CASES = {
    "llama3": (LlamaConfig(**_BASE, rope_scaling=LLAMA3), "LlamaForCausalLM"),
    "qwen2": (
        LlamaConfig(**_BASE, rope_theta=1e6, qkv_bias=True, model_type="qwen2"),
        "Qwen2ForCausalLM",
    ),
    "qwen2_tied": (
        LlamaConfig(
            **_BASE, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True, model_type="qwen2"
        ),
        "Qwen2ForCausalLM",
    ),
    # head_dim 24 != hidden/heads, as Qwen3 configs state it explicitly.
    "qwen3": (
        LlamaConfig(**{**_BASE, "head_dim": 24}, rope_theta=1e6, qk_norm=True, model_type="qwen3"),
        "Qwen3ForCausalLM",
    ),
}


def _random_params(cfg, seed=0):
  """A random tree of the decoder's shapes; norms around 1, biases non-zero."""
  model = registry.build(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, tokens + 1))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == "scale":
      return (1.0 + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    if name.endswith("_bias"):
      return (0.5 * rng.normal(size=x.shape)).astype(np.float32)
    fan_in = x.shape[-2] if x.ndim > 1 else 1
    return (0.7 * rng.normal(size=x.shape) / np.sqrt(fan_in)).astype(np.float32)

  unboxed = jax.tree.map(
      lambda x: x.value, abstract["params"], is_leaf=lambda x: hasattr(x, "value")
  )
  return jax.tree_util.tree_map_with_path(draw, unboxed)


def _ours(cfg, params, tokens, positions, segments):
  model = registry.build(cfg)
  hidden = model.apply({"params": params}, tokens, positions, segments)
  return np.asarray(model.apply({"params": params}, hidden, method=model.logits))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  name = request.param
  cfg, arch = CASES[name]
  directory = str(tmp_path_factory.mktemp(name))
  params = _random_params(cfg)
  hf.save_hf(directory, cfg, params)  # the trainer's export
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager"
  )
  assert type(ref).__name__ == arch
  return name, cfg, params, checkpoints.load_model(directory), ref


def test_logits_match_transformers(case):
  """Loaded == exported tree, θ == costs, and logits at every real position of a
  right-padded batch within 1e-4 of transformers."""
  name, cfg, params, model, ref = case
  assert model.config == cfg
  assert model.num_params == costs.num_params(cfg)
  for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)

  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (40, 5, 23)]
  tokens, positions, segments = right_padded(seqs)
  ours = _ours(cfg, model.params, tokens, positions, segments)
  with torch.no_grad():
    theirs = ref(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(segments, dtype=torch.long),
    ).logits.numpy()
  worst = max(
      float(np.abs(ours[i, : len(s)] - theirs[i, : len(s)]).max()) for i, s in enumerate(seqs)
  )
  print(f"{name}: max |dlogit| {worst:.3g}")
  assert worst < 1e-4
  if cfg.rope_scaling:
    # The scaling matters here: without it the logits differ.
    plain = _ours(
        dataclasses.replace(cfg, rope_scaling=None), model.params, tokens, positions, segments
    )
    assert np.abs(plain[0, :40] - theirs[0, :40]).max() > 1e-3


def test_training_gradients_match_transformers(case):
  """The trainer's gradients (the gated MLP's own VJP included) equal torch's backward."""
  _, cfg, params, model, ref = case
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (40, 9, 23)]
  assert_training_grads_match_transformers(cfg, model.params, ref, seqs)


@pytest.mark.parametrize("remat", ["dots", "full", True])
def test_remat_policies_keep_the_gradients(remat):
  """What a block keeps for the backward (`model.remat`) changes memory and speed only."""
  from selectit_jax.models.layers import remat_mode
  from selectit_jax.training import step as step_lib

  cfg = CASES["qwen2"][0]
  params = _random_params(cfg)
  rng = np.random.default_rng(2)
  batch = training_batch([rng.integers(0, 300, n).tolist() for n in (17, 9)])
  grads = lambda c: jax.grad(lambda p: step_lib.loss_sums(registry.build(c), p, batch)[0])(params)
  plain, other = grads(cfg), grads(dataclasses.replace(cfg, remat=remat))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(other)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())
  with pytest.raises(ValueError, match="model.remat='some' is not one of"):
    remat_mode("some")


def test_engine_with_shared_prefix_matches_transformers(case):
  """P(5 chosen tokens) at the last position through the scoring engine (a 12-token shared
  prefix computed once, packed rows) vs the full softmax of transformers."""
  name, cfg, _, model, ref = case
  rng = np.random.default_rng(1)
  prefix = rng.integers(1, cfg.vocab_size, 12).tolist()
  items = [
      batching.WorkItem(i, f"s{i}", f"h{i}", 0, "p", tuple(prefix + tail))
      for i, tail in enumerate(rng.integers(1, cfg.vocab_size, n).tolist() for n in (9, 3, 17))
  ]
  prefixes = batching.shared_prefixes(items)
  assert len(prefixes[0]) == 12
  digits = np.array([7, 8, 9, 10, 11])
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  scorer = engine.Scorer(cfg, model.params, digits, mesh, 2, prefixes, 2, 0)
  got = {
      it.sample_index: p
      for rated in scorer.rate(batching.plan_batches(items, 2, [32], prefixes, 2))
      for it, p in zip(rated.batch.items, rated.probs)
  }
  assert len(got) == len(items)
  for it in items:
    with torch.no_grad():
      logits = ref(torch.tensor(np.asarray(it.ids))[None]).logits[0, -1]
    want = torch.softmax(logits.double(), -1)[torch.tensor(digits)].numpy()
    np.testing.assert_allclose(got[it.sample_index], want, rtol=1e-4, atol=1e-6)


def test_llama3_inv_freq_matches_transformers():
  cfg = CASES["llama3"][0]
  hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
  fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
  want, _ = fn(hf_cfg, "cpu")
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), want.numpy(), rtol=1e-6)
  plain = np.asarray(rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)))
  ratio = plain / want.numpy()
  # Unscaled, smoothed and fully scaled frequencies all occur.
  assert ratio.min() == pytest.approx(1) and ratio.max() == pytest.approx(4)
  assert ((ratio > 1.01) & (ratio < 3.99)).any()


def test_hf_config_round_trip_and_refusals():
  for cfg, _ in CASES.values():
    assert registry.config_from_hf(cfg.to_hf()) == cfg
  qwen2 = CASES["qwen2"][0].to_hf()
  with pytest.raises(ValueError, match="use_sliding_window"):
    registry.config_from_hf({**qwen2, "use_sliding_window": True})
  with pytest.raises(ValueError, match="attention_bias"):
    registry.config_from_hf({**CASES["qwen3"][0].to_hf(), "attention_bias": True})
  # transformers >= 5 writes rope_parameters instead of rope_theta / rope_scaling.
  v5 = {
      k: v for k, v in CASES["llama3"][0].to_hf().items() if k not in ("rope_theta", "rope_scaling")
  }
  v5["rope_parameters"] = {**dict(LLAMA3), "rope_theta": 10000.0}
  assert registry.config_from_hf(v5) == CASES["llama3"][0]


def test_sharded_load_places_biases_and_norms(case):
  """Loaded onto an fsdp × tensor mesh by the logical axes (biases split over heads): the
  same values as the single-device load."""
  name, cfg, _, model, _ = case
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  sharded = checkpoints.load_model(model.source_path, mesh)
  for got, want in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(model.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if cfg.qkv_bias:
    q_bias = sharded.params["layers"]["attn"]["q_bias"]
    assert q_bias.sharding.shard_shape(q_bias.shape)[1] < cfg.num_heads


def _write_gguf(path, arch, cfg, params):
  """Our params as an fp32 GGUF in llama.cpp's qwen2/qwen3 layout (HF's rotary order, HF
  names mapped to llama.cpp's), with the metadata transformers' GGUF loader reads."""
  import gguf

  from selectit_jax.checkpoints import gguf as gguf_lib
  from selectit_jax.models import llama

  to_gguf = {hf_name: name for name, hf_name in gguf_lib._GLOBAL_NAMES.items()}
  to_gguf.update(
      {f"model.layers.{{i}}.{v}": f"blk.{{i}}.{k}" for k, v in llama.GGUF_LAYER_NAMES.items()}
  )
  writer = gguf.GGUFWriter(path, arch)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_key_length(cfg.head_dim)
  writer.add_value_length(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  for name, w in hf.hf_tensors(cfg, params):
    layer, _, rest = name.removeprefix("model.layers.").partition(".")
    if name.startswith("model.layers."):
      stem, kind = rest.rsplit(".", 1)
      gguf_name = to_gguf[f"model.layers.{{i}}.{stem}"].format(i=layer) + "." + kind
    else:
      gguf_name = to_gguf[name]
    writer.add_tensor(gguf_name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_gguf_loads_like_safetensors_and_transformers(name, tmp_path):
  cfg, arch = CASES[name]
  params = _random_params(cfg, seed=2)
  path = str(tmp_path / f"{name}.gguf")
  _write_gguf(path, name, cfg, params)
  model = checkpoints.load_model(path)
  assert model.config.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # stored as f32
  assert dataclasses.replace(model.config, rms_norm_eps=cfg.rms_norm_eps) == cfg
  for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  if name == "qwen3":
    # transformers' GGUF reader drops qwen3's attention.key_length (head_dim falls back to
    # its default 128): the reference reads the same weights from our safetensors export.
    hf.save_hf(str(tmp_path / "hf"), cfg, params)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32
    )
  else:
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=f"{name}.gguf", dtype=torch.float32
    )
  assert type(ref).__name__ == arch
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 20)).astype(np.int32)
  ours = _ours(cfg, model.params, tokens, np.arange(20, dtype=np.int32)[None], np.ones_like(tokens))
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
