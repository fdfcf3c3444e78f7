"""Shared fixtures: tiny random LLaMA checkpoints and a SentencePiece tokenizer trained here.

Eight fake CPU devices are set up before JAX is imported, so mesh code runs on CPU.
"""

import io
import json
import subprocess
import sys
import os

# Under pytest-xdist (the README's test command runs one worker per core, up to 4) each worker
# is pinned to its share of the CPUs, before JAX or torch size their thread pools: workers whose
# pools each span the whole machine oversubscribe it (torch's parity tests ran 3x slower).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and hasattr(os, "sched_setaffinity"):
  _cpus = sorted(os.sched_getaffinity(0))
  if len(_cpus) >= _WORKERS:
    _mine = _cpus[int(_WORKER.removeprefix("gw")) % _WORKERS :: _WORKERS]
    os.sched_setaffinity(0, _mine)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(_mine)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from selectit_jax.checkpoints import hf  # noqa: E402
from selectit_jax.models.gemma3 import Gemma3, Gemma3Config  # noqa: E402
from selectit_jax.models.llama import LlamaConfig  # noqa: E402
from selectit_jax.data import prompts as prompts_lib  # noqa: E402
from selectit_jax.data import records as records_lib  # noqa: E402
from selectit_jax.scoring import manifest as manifest_lib  # noqa: E402
from selectit_jax.scoring import store as store_lib  # noqa: E402
from configs import select as select_config  # noqa: E402

TINY_VOCAB = 400
# The released code's rating prompts, a read-only fixture beside the checkout (../shared).
REFERENCE_PROMPTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "reference",
    "rating_prompt.txt",
)
_CORPUS = (
    "Rate the response from 1 to 5 and answer with one digit.\n",
    "Instruction:Write a short poem about the sea.\n",
    "Response:The sea is wide and deep; 2345 waves roll in.\n",
    "The answer is: 4\n",
    "Please explain how photosynthesis works in plants, step by step.\n",
    "Sure! Plants use light, water and carbon dioxide to make sugar and oxygen.\n",
)


def tiny_config(**overrides) -> LlamaConfig:
  base = dict(
      vocab_size=TINY_VOCAB,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      tie_word_embeddings=False,
      max_position_embeddings=512,
  )
  base.update(overrides)
  return LlamaConfig(**base)


def write_sentencepiece(directory: str) -> None:
  """A LLaMA-2-style SentencePiece BPE model (byte fallback, split digits, identity
  normalisation) plus the tokenizer_config.json LLaMA-2 ships (BOS added)."""
  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_CORPUS * 40),
      model_writer=model,
      vocab_size=TINY_VOCAB,
      model_type="bpe",
      byte_fallback=True,
      split_digits=True,
      character_coverage=1.0,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=True,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      hard_vocab_limit=False,
      minloglevel=2,
  )
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
        },
        f,
    )


def write_tiny_checkpoint(
    directory: str,
    *,
    seed: int = 0,
    max_shard_bytes: int = 2 << 30,
    tokenizer: bool = True,
    **overrides,
) -> LlamaConfig:
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
  d, h, kv, hd, f, v, L = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.intermediate_size,
      cfg.vocab_size,
      cfg.num_layers,
  )
  return {
      ("embedding",): (v, d),
      ("lm_head",): (d, v),
      ("final_norm", "scale"): (d,),
      ("layers", "attn_norm", "scale"): (L, d),
      ("layers", "mlp_norm", "scale"): (L, d),
      ("layers", "attn", "q"): (L, d, h, hd),
      ("layers", "attn", "k"): (L, d, kv, hd),
      ("layers", "attn", "v"): (L, d, kv, hd),
      ("layers", "attn", "o"): (L, h, hd, d),
      ("layers", "mlp", "gate"): (L, d, f),
      ("layers", "mlp", "up"): (L, d, f),
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

  cfg = ml_collections.ConfigDict(
      dict(path=assets.default_sharegpt_path(), format="sharegpt", limit=4 * n + 20, turns="first")
  )
  recs, _, _ = records.read_records(cfg)
  return recs[:n]


def assert_same_tokens(ours, theirs, extra_texts) -> list[str]:
  """Our tokenizer and a transformers one give the same ids (special tokens included) for 20
  ShareGPT texts in the first rating prompt plus `extra_texts`, and the same special ids.
  Returns the texts."""
  from selectit_jax.data import prompts

  texts = [
      prompts.build_text(prompts.default_prompts()[0], r.instruction, r.response)
      for r in sharegpt_records(20)
  ] + list(extra_texts)
  assert [ours.encode(t) for t in texts] == [theirs(t)["input_ids"] for t in texts]
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
      theirs.bos_token_id,
      theirs.eos_token_id,
      theirs.pad_token_id,
  )
  return texts


# ---------------------------------------- numpy references of the formulas (one vector)


def ref_token_paper(p):
  p = np.asarray(p, np.float64)
  q = p / p.sum()
  b = int(np.argmax(q))
  return (b + 1) * sum(abs(q[i] - q[b]) for i in range(5)) / 4


def ref_token_code(p):
  p = np.asarray(p, np.float64)
  q = p / p.sum()
  r = np.exp(q) / np.sum(np.exp(q))
  b = int(np.argmax(r))
  return (b + 1) * sum(r[b] - r[k] for k in range(5)) / (5 - 1)


def ref_sentence(tok, alpha):
  tok = np.asarray(tok, np.float64)
  return np.mean(tok) / (1 + alpha * np.std(tok))


def ref_model(sent, w):
  return sum(wi * si for wi, si in zip(w, sent)) / sum(w)


REF_TOKEN = {"paper": ref_token_paper, "code": ref_token_code}

CRAFTED = np.array(
    [
        [0.01, 0.02, 0.05, 0.30, 0.10],  # clear 4
        [0.20, 0.20, 0.10, 0.05, 0.05],  # argmax tie 1/2: first wins -> 1
        [0.0, 0.0, 0.3, 0.0, 0.3],  # tie 3/5 -> 3
        [0.1, 0.1, 0.1, 0.1, 0.1],  # flat: spread 0 -> score 0
        [1e-9, 2e-9, 3e-9, 4e-9, 5e-9],  # tiny mass, scale invariant
        [0.0, 0.0, 0.0, 0.0, 0.7],  # one-hot 5
        [0.5, 0.0, 0.0, 0.0, 0.0],  # one-hot 1
    ]
)


# ---------------------------------------- a small score dir for select and sweep

K = 3
PROMPTS = prompts_lib.default_prompts()[:K]


def sharegpt_record(i, ins, res):
  return {
      "id": f"s{i}",
      "conversations": [{"from": "human", "value": ins}, {"from": "gpt", "value": res}],
  }


def small_dataset():
  """13 ShareGPT records; index 3 is rejected by the reader (empty response)."""
  raw = [
      sharegpt_record(i, f"question {i} " + "x" * i, f"answer {i} " + "y" * (3 * i))
      for i in range(13)
  ]
  raw[3]["conversations"][1]["value"] = ""
  raw[7] = sharegpt_record(
      7,
      raw[6]["conversations"][0]["value"],  # duplicate text of 6
      raw[6]["conversations"][1]["value"],
  )
  return raw


def crafted_probs(i, model_shift=0.0):
  """Crafted probabilities per sample index: [K, 5]."""
  rng = np.random.default_rng(100 + i)
  p = rng.gamma(0.7, size=(K, 5))
  p = p / p.sum(-1, keepdims=True) * (0.3 + 0.05 * i) + model_shift
  if i in (1, 4, 9):  # identical probs: exact score ties
    p = np.tile([0.05, 0.05, 0.1, 0.4, 0.1], (K, 1))
  if i == 5:
    p[1, 2] = np.nan  # nonfinite in prompt 1
  if i == 8:
    p[0] = 0.0  # zero digit mass in prompt 0
  return p


def write_score_dir(tmp_path, name, data_path, num_params, skip=(), model_shift=0.0, truncated=()):
  d = str(tmp_path / name)
  st = store_lib.ScoreStore(d)
  hashes = tuple(prompts_lib.prompt_hash(p) for p in PROMPTS)
  st.write_manifest(
      manifest_lib.Manifest(
          data={"path": data_path, "format": "sharegpt", "turns": "first"},
          template=prompts_lib.DEFAULT_TEMPLATE,
          prompts=dict(zip(hashes, PROMPTS)),
          models=[manifest_lib.ModelEntry(name, name, "", "0" * 16, num_params)],
          runs=[manifest_lib.RunEntry(name, hashes, 0, 0)],
      )
  )
  recs, rejects, _ = records_lib.read_records({"path": data_path, "format": "sharegpt"})
  st.write_rejects(rejects)
  rows, seen = [], set()
  for r in recs:
    h = records_lib.content_hash(r)
    if r.index in skip or h in seen:  # the scorer stores duplicate texts once
      continue
    seen.add(h)
    probs = crafted_probs(r.index, model_shift)
    for k, prompt in enumerate(PROMPTS):
      rows.append(
          dict(
              sample_id=r.id,
              sample_index=r.index,
              content_hash=h,
              model=name,
              num_params=num_params,
              prompt_index=k,
              prompt_hash=prompts_lib.prompt_hash(prompt),
              probs=probs[k].tolist(),
              logsumexp=0.0,
              num_tokens=10,
              truncated=r.index in truncated,
          )
      )
  st.write_shard(rows[: len(rows) // 2])
  st.write_shard(rows[len(rows) // 2 :])
  return d


@pytest.fixture
def data_path(tmp_path):
  p = tmp_path / "data.json"
  p.write_text(json.dumps(small_dataset(), indent=1), encoding="utf-8")
  return str(p)


def select_cfg(**kw):
  c = select_config.get_config()
  c.update(kw)
  return c


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(x) for x in f]


# ---------------------------------------- running the commands as a user does


def run_command(command: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m selectit_jax.<command> args` from the checkout on one CPU device, output
  captured (tracebacks for user errors off, as a user sees them)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  env.pop("SELECTIT_TRACEBACK", None)
  return subprocess.run(
      [sys.executable, "-m", f"selectit_jax.{command}", *args],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def right_padded(seqs):
  """(tokens, positions, segment ids) [n, t] of right-padded sequences (segment 0 = pad)."""
  t = max(map(len, seqs))
  tokens = np.zeros((len(seqs), t), np.int32)
  segments = np.zeros((len(seqs), t), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)] = s
    segments[i, : len(s)] = 1
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
  return tokens, positions, segments


def training_batch(seqs) -> dict:
  """A trainer micro-batch of right-padded rows, one text a row, every next token a target."""
  tokens, positions, segments = right_padded(seqs)
  weights = segments.astype(np.float32)
  for i, s in enumerate(seqs):
    weights[i, len(s) - 1] = 0  # the last token predicts nothing
  targets = np.roll(tokens, -1, axis=1)
  return dict(
      inputs=tokens, positions=positions, segment_ids=segments, targets=targets, weights=weights
  )


def assert_training_grads_match_transformers(cfg, params, ref_model, seqs):
  """Gradients of the trainer's loss (training.step.loss_sums, per-token mean over every
  predicted token of right-padded rows) equal transformers' backward of the same loss, for
  every HF weight but the norms (Gemma stores 1 + w, so its norm gradients map otherwise).
  The reference runs in float64, one unpadded text at a time (a padded query row is all
  -inf in float64, and its NaN reaches the grads); ours in fp32 is off by up to 2.5e-5 of a
  tensor's largest gradient (AMD EPYC, avx2: the attention biases' small, cancelling
  gradients), torch's own fp32 backward by up to 3e-5, so the bound is 5e-5 of it: a wrong
  mask, position or term is off by orders of magnitude more."""
  import copy  # noqa: PLC0415

  import torch  # noqa: PLC0415

  from selectit_jax.models import registry  # noqa: PLC0415
  from selectit_jax.training import step as step_lib  # noqa: PLC0415

  batch = training_batch(seqs)
  model = registry.build(cfg)
  mean_nll = lambda p: jnp.divide(*step_lib.loss_sums(model, p, batch))
  ours = dict(hf.hf_tensors(cfg, jax.jit(jax.grad(mean_nll))(params)))

  ref_model = copy.deepcopy(ref_model).double()
  ref_model.zero_grad(set_to_none=True)  # a copy carries the fixture model's .grad along
  total = 0
  for s in seqs:
    logits = ref_model(input_ids=torch.tensor([s], dtype=torch.long)).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum")
    total = total + nll
  (total / sum(len(s) - 1 for s in seqs)).backward()
  checked = 0
  for name, param in ref_model.named_parameters():
    if "norm" in name:
      continue
    want = param.grad.numpy()
    np.testing.assert_allclose(
        ours[name], want, atol=5e-5 * np.abs(want).max(), rtol=0, err_msg=name
    )
    checked += 1
  assert checked >= 1 + 7 * cfg.num_layers


# Three local layers then a global one, window 8: the 30-token texts cross it.
TINY_GEMMA3 = Gemma3Config(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rope_local_base_freq=100.0,
    sliding_window=8,
    sliding_window_pattern=4,
    query_pre_attn_scalar=24,
    max_position_embeddings=256,
)


def write_tiny_gemma3(directory, cfg=TINY_GEMMA3, seed=0):
  """Random HF safetensors of `cfg`, norms spread around HF's zero init."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(
      lambda: Gemma3(cfg).init(
          jax.random.PRNGKey(0), *(jnp.zeros((1, 1), jnp.int32),) * 2, jnp.ones((1, 1), jnp.int32)
      )
  )
  shapes = jax.tree.map(
      lambda x: x.shape,
      jax.tree.map(lambda x: x.value, abstract["params"], is_leaf=lambda x: hasattr(x, "value")),
  )
  params = {}
  for spec in hf.param_table(cfg):
    node = shapes
    for k in spec.path:
      node = node[k]
    shape = tuple(node)
    if spec.path[-1] == "scale":
      value = 1.0 + 0.3 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) * 0.7 / np.sqrt(shape[-2] if len(shape) > 1 else 1)
    tree = params
    for k in spec.path[:-1]:
      tree = tree.setdefault(k, {})
    tree[spec.path[-1]] = value.astype(np.float32)
  hf.save_hf(directory, cfg, params)
  return cfg


# --------------------------------------------------------------- steps on abstract inputs


def mesh_of(shape):
  """A (data, fsdp, tensor) mesh on the first devices."""
  from selectit_jax.parallel import sharding

  n = int(np.prod(shape))
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:n])


def abstract_params(cfg, mesh):
  """The params' ShapeDtypeStructs with their shardings on `mesh` (no weights made)."""
  import flax.linen as nn

  from selectit_jax import checkpoints
  from selectit_jax.parallel import sharding

  boxed = checkpoints.param_shapes(cfg)["params"]
  return jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      nn.unbox(boxed),
      sharding.param_shardings(boxed, mesh),
  )


def abstract_rating_step(cfg, mesh, batch, length, prefix, segments, prompts=5):
  """The engine's rating step (prefix cache, read-out rows) jit'd, and abstract inputs:
  lower it under `sharding.activate(mesh)`."""
  from selectit_jax.models import registry
  from selectit_jax.models.layers import Prefix
  from selectit_jax.parallel import sharding
  from selectit_jax.scoring import engine

  step = engine.rating_probs_fn(registry.build(cfg), np.arange(5))
  kv = jax.ShapeDtypeStruct(
      (cfg.num_layers, prompts, cfg.num_kv_heads, prefix, cfg.head_dim), jnp.dtype(cfg.dtype)
  )
  table = Prefix(kv, kv, jax.ShapeDtypeStruct((prompts, prefix), jnp.bool_))
  rows = sharding.batch_sharding(mesh)
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
  args = (ints(batch, length),) * 3 + (ints(batch), ints(batch, segments))
  # Made outside the mesh's context: under one, flax constrains init's params.
  return jax.jit(step), (abstract_params(cfg, mesh), table) + args


def abstract_train_step(cfg, mesh, accum, micro, length, loss_chunk=128):
  """training/step.make_train_step's jit'd step (state donated) and an abstract state and
  batch [accum, micro, length]: lower it under `sharding.activate(mesh)`."""
  import ml_collections

  from selectit_jax.training import step as step_lib

  train = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-3,
          warmup_ratio=0.0,
          schedule="constant",
          weight_decay=0.0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          max_grad_norm=1.0,
      )
  )
  sched = step_lib.schedule(train, 10)
  tx = step_lib.optimizer(train, sched)
  shardings = step_lib.state_shardings(cfg, tx, mesh)
  run = step_lib.make_train_step(cfg, tx, sched, mesh, shardings, loss_chunk)
  rows = step_lib.accumulation_sharding(mesh)
  batch = {
      k: jax.ShapeDtypeStruct(
          (accum, micro, length), jnp.float32 if k == "weights" else jnp.int32, sharding=rows
      )
      for k in ("inputs", "targets", "weights", "positions", "segment_ids")
  }
  return run.jitted, (step_lib.abstract_state(cfg, tx, shardings), batch)
