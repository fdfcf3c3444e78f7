"""Fine-tuning: templates and response-only masks, packing isolation, accumulation,
kill -9 / resume reproducibility, HF export parity, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import train_tiny
from selectit_jax import checkpoints
from selectit_jax.models.llama import Llama
from selectit_jax.data.records import Record
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.training import data as data_lib
from selectit_jax.training import step as step_lib
from selectit_jax.training import trainer
from selectit_jax.parallel import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORDS = (
    "the sea is wide and deep waves roll in plants use light water and carbon "
    "dioxide to make sugar rate the response please explain how it works"
).split()


def _text(rng, n):
  return " ".join(rng.choice(_WORDS, size=n))


def write_selection(path, n=40, seed=0):
  """ShareGPT records (some multi-turn) of a few words each."""
  rng = np.random.default_rng(seed)
  recs = []
  for i in range(n):
    conv = [
        {"from": "human", "value": _text(rng, rng.integers(3, 8))},
        {"from": "gpt", "value": _text(rng, rng.integers(3, 12))},
    ]
    if i % 3 == 0:
      conv += [{"from": "human", "value": _text(rng, 4)}, {"from": "gpt", "value": _text(rng, 5)}]
    recs.append({"id": f"r{i}", "conversations": conv})
  with open(path, "w") as f:
    json.dump(recs, f)
  return path


def _data_cfg(**kw):
  c = train_tiny.get_config().data
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
  return load_tokenizer(tiny_checkpoint)


def _rec(turns, index=0):
  user = [t for r, t in turns if r == "user"]
  asst = [t for r, t in turns if r == "assistant"]
  return Record(
      str(index), index, user[0] if user else "", asst[0] if asst else "", None, tuple(turns)
  )


def _target_text(tok, ex):
  """Decoded target runs of an example."""
  runs, cur = [], []
  for i, t in zip(ex.ids, ex.target):
    if t:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  return [tok.hf.decode(r) for r in runs]


def test_alpaca_mask_rated_turn_by_default_every_turn_when_asked(tok):
  turns = [
      ("user", "explain plants"),
      ("assistant", "plants use light"),
      ("user", "and the sea"),
      ("assistant", "the sea is wide"),
  ]
  cfg = _data_cfg(template="alpaca", train_turns="all")
  (ex,), stats = data_lib.prepare([_rec(turns)], tok, cfg)
  eos = tok.hf.decode([tok.eos_id])
  assert [s.strip() for s in _target_text(tok, ex)] == [
      "plants use light" + eos,
      "the sea is wide" + eos,
  ]
  assert ex.ids[0] == tok.bos_id and not ex.target[0]
  assert stats.target_tokens == int(ex.target[1:].sum())
  (rated,), _ = data_lib.prepare([_rec(turns)], tok, _data_cfg(template="alpaca"))
  assert [s.strip() for s in _target_text(tok, rated)] == ["plants use light" + eos]
  assert "the sea" not in tok.hf.decode(rated.ids)  # the later turns are left out


def test_chat_template_targets_are_assistant_text(tok):
  tok.hf.chat_template = (
      "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
      "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
  )
  try:
    turns = [
        ("user", "explain plants"),
        ("assistant", "plants use light"),
        ("user", "and the sea"),
        ("assistant", "the sea is wide"),
    ]
    assert data_lib.resolve_template(tok, _data_cfg(template="auto")) == "chat"
    (ex,), _ = data_lib.prepare([_rec(turns)], tok, _data_cfg(template="auto", train_turns="all"))
    assert [s.strip() for s in _target_text(tok, ex)] == ["plants use light", "the sea is wide"]
    full = tok.hf.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False)
    assert ex.ids.tolist() == tok.hf(full, add_special_tokens=False)["input_ids"]
  finally:
    tok.hf.chat_template = None
  with pytest.raises(ValueError, match="no chat template"):
    data_lib.resolve_template(tok, _data_cfg(template="chat"))


def test_too_long_truncate_and_drop_are_counted(tok):
  long = [("user", "explain plants"), ("assistant", " ".join(["sugar"] * 200))]
  huge_prompt = [("user", " ".join(["water"] * 200)), ("assistant", "ok")]
  short = [("user", "hi"), ("assistant", "the sea")]
  recs = [_rec(long, 0), _rec(huge_prompt, 1), _rec(short, 2)]
  exs, stats = data_lib.prepare(
      recs, tok, _data_cfg(template="alpaca", too_long="truncate", max_length=32)
  )
  assert [e.record_index for e in exs] == [0, 2]
  assert stats.truncated == 2 and sum(stats.dropped.values()) == 1
  assert all(len(e.ids) <= 33 for e in exs)
  exs, stats = data_lib.prepare(
      recs, tok, _data_cfg(template="alpaca", too_long="drop", max_length=32)
  )
  assert [e.record_index for e in exs] == [2] and sum(stats.dropped.values()) == 2
  assert any("too_long=drop" in r for r in stats.dropped)


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [
      data_lib.Example(rng.integers(3, 300, n).astype(np.int32), np.arange(n) >= n // 2, i)
      for i, n in enumerate(lengths)
  ]


def test_pack_positions_segments_and_targets():
  exs = _examples([10, 7, 20, 5, 12])
  rows = data_lib.pack(exs, 24, seed=1)
  seg, pos = rows["segment_ids"], rows["positions"]
  assert (rows["weights"][seg == 0] == 0).all()
  seen = 0
  for r in range(len(seg)):
    for s in set(seg[r].tolist()) - {0}:
      m = seg[r] == s
      np.testing.assert_array_equal(pos[r][m], np.arange(m.sum()))
      ex = next(
          e for e in exs if len(e.ids) - 1 == m.sum() and (e.ids[:-1] == rows["inputs"][r][m]).all()
      )
      np.testing.assert_array_equal(rows["targets"][r][m], ex.ids[1:])
      np.testing.assert_array_equal(rows["weights"][r][m], ex.target[1:])
      seen += 1
  assert seen == len(exs) and len(seg) < len(exs)  # packed, nothing lost


def test_packed_attention_never_crosses_samples(tiny_checkpoint):
  """Each sample's logits in a packed row equal its logits run alone."""
  loaded = checkpoints.load_model(tiny_checkpoint)
  model = Llama(loaded.config)
  exs = _examples([9, 13, 6])
  rows = data_lib.pack(exs, 32, seed=None)
  assert len(rows["inputs"]) == 1
  apply = jax.jit(
      lambda t, p, s: model.apply(
          {"params": loaded.params},
          model.apply({"params": loaded.params}, t, p, s),
          method=Llama.logits,
      )
  )
  packed = apply(rows["inputs"], rows["positions"], rows["segment_ids"])[0]
  for s, ex in enumerate(exs, start=1):
    alone = data_lib.pack([ex], 32, seed=None)
    ref = apply(alone["inputs"], alone["positions"], alone["segment_ids"])[0]
    n = len(ex.ids) - 1
    np.testing.assert_allclose(packed[rows["segment_ids"][0] == s], ref[:n], atol=1e-5)


def test_accumulation_matches_one_big_batch(tiny_checkpoint):
  loaded = checkpoints.load_model(tiny_checkpoint)
  cfg = loaded.config
  mesh = sharding.make_mesh(
      ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=1)), jax.devices()[:2]
  )
  t = train_tiny.get_config().train
  sched = step_lib.schedule(t, 10)
  tx = step_lib.optimizer(t, sched)
  sh = step_lib.state_shardings(cfg, tx, mesh)
  rows = data_lib.pack(_examples([30, 25, 40, 12, 33, 50, 8, 20], seed=3), 64, seed=0, pack=False)
  batch = {k: v[:4] for k, v in rows.items()}
  train_step = step_lib.make_train_step(cfg, tx, sched, mesh, sh)
  out = []
  for accum in (1, 2):
    params = jax.tree.map(jnp.array, loaded.params)
    state = step_lib.init_state(params, tx, sh)
    b = {k: jnp.asarray(v.reshape((accum, 4 // accum) + v.shape[1:])) for k, v in batch.items()}
    state, m = train_step(state, b)
    out.append((jax.device_get(m), jax.device_get(state["params"])))
  np.testing.assert_allclose(out[0][0]["loss"], out[1][0]["loss"], rtol=1e-6)
  assert out[0][0]["target_tokens"] == out[1][0]["target_tokens"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[0][1], out[1][1])


def test_schedule_warmup_and_cosine():
  t = train_tiny.get_config().train
  t.learning_rate, t.warmup_ratio = 2e-5, 0.03
  s = step_lib.schedule(t, 100)  # ceil(3) warmup steps
  assert float(s(0)) == 0.0 and np.isclose(float(s(3)), 2e-5)
  assert float(s(50)) < 2e-5 and np.isclose(float(s(100)), 0.0, atol=1e-12)


def _cli(ckpt, data, out, *extra):
  return [
      sys.executable,
      "-m",
      "selectit_jax.train",
      "--config=configs/train_tiny.py",
      f"--config.model.path={ckpt}",
      f"--config.data.path={data}",
      f"--config.output_dir={out}",
      "--config.train.epochs=4",
      "--config.checkpoint.every=1",
      "--config.checkpoint.keep=3",
      *extra,
  ]


def _env():
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return env


def _committed_steps(directory):
  if not os.path.isdir(directory):
    return []
  return [int(n) for n in os.listdir(directory) if n.isdigit()]


@pytest.mark.slow
def test_kill9_resume_reproduces_losses(tiny_checkpoint, tmp_path):
  data = write_selection(str(tmp_path / "sel.json"), n=40)
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  subprocess.run(
      _cli(tiny_checkpoint, data, full), cwd=REPO, env=_env(), check=True, capture_output=True
  )
  ref = trainer.read_metrics(os.path.join(full, "metrics.jsonl"))
  last = max(ref)
  assert last >= 10

  proc = subprocess.Popen(
      _cli(tiny_checkpoint, data, killed),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 120
  while time.time() < deadline and not [
      s for s in _committed_steps(os.path.join(killed, "checkpoints")) if s >= 2
  ]:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  logged = trainer.read_metrics(os.path.join(killed, "metrics.jsonl"))
  assert proc.returncode == -signal.SIGKILL and max(logged) < last, "killed too late"

  subprocess.run(
      _cli(tiny_checkpoint, data, killed), cwd=REPO, env=_env(), check=True, capture_output=True
  )
  got = trainer.read_metrics(os.path.join(killed, "metrics.jsonl"))
  assert sorted(got) == sorted(ref)
  for s in ref:
    assert got[s]["loss"] == ref[s]["loss"], f"step {s}"
    assert got[s]["grad_norm"] == ref[s]["grad_norm"], f"step {s}"
  summary = json.load(open(os.path.join(killed, "train_summary.json")))
  assert summary["resumed_from"] is not None and summary["final_step"] == last


@pytest.mark.slow  # two training runs in subprocesses (~20 s each)
def test_two_process_training_equals_one(tiny_checkpoint, tmp_path):
  """`launch/local.sh 2 python -m selectit_jax.train ...`: 2 processes x 4 fake devices joined
  by jax.distributed, FSDP over all 8, log the losses of a 1-process, 1-device run and export
  the same weights (arrays no process holds whole, written by process 0)."""
  from safetensors.numpy import load_file

  data = write_selection(str(tmp_path / "sel.json"), n=24)
  outs = {n: str(tmp_path / f"p{n}") for n in (1, 2)}
  for n, out in outs.items():
    cmd = _cli(
        tiny_checkpoint, data, out, "--config.train.epochs=1", "--config.export.enabled=True"
    )
    cmd += ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.checkpoint.every=100"]
    env = {k: v for k, v in _env().items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", DEVICES_PER_PROCESS="4")
    if n == 1:
      env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    else:
      cmd = ["bash", "launch/local.sh", "2"] + cmd
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  one, two = (trainer.read_metrics(os.path.join(outs[n], "metrics.jsonl")) for n in (1, 2))
  assert sorted(one) == sorted(two) and len(one) >= 2
  for step in one:
    assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
  summary = json.load(open(os.path.join(outs[2], "train_summary.json")))
  assert (summary["processes"], summary["devices"]) == (2, 4)  # devices: each process's
  w1, w2 = (load_file(os.path.join(outs[n], "hf", "model.safetensors")) for n in (1, 2))
  assert sorted(w1) == sorted(w2)
  for name in w1:
    np.testing.assert_allclose(w2[name], w1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_small_selection_trains_and_exports_a_model_transformers_loads(
    tiny_checkpoint, tmp_path, caplog
):
  """9 records (some held out), the paper's 128 examples a step and 4-row micro-batches on 8
  devices: the step is capped to the training examples (warned), the micro-batch to the rows
  they pack into (rounded to the mesh); the export loads in transformers with its ids."""
  torch = pytest.importorskip("torch")
  import transformers

  data = write_selection(str(tmp_path / "sel.json"), n=9)
  c = train_tiny.get_config()
  c.model.path, c.data.path, c.output_dir = tiny_checkpoint, data, str(tmp_path / "out")
  c.train.batch_size, c.train.micro_batch_size = 128, 4
  c.export.enabled = True
  with caplog.at_level("WARNING"):
    summary = trainer.run(c)
  n = summary["data"]["train"]["examples"]
  assert 5 <= n <= 8 and f"train.batch_size=128 examples but the selection has {n}" in caplog.text
  assert summary["batch_size"] == n and summary["total_steps"] == c.train.epochs
  rows = summary["data"]["steps"]["rows_per_step_max"]
  assert summary["micro_batch_size"] == -(-rows // 8) * 8 < 16  # not 4 (mesh), not 128
  assert summary["final_step"] == summary["total_steps"]
  assert np.isfinite(summary["final_eval"]["eval_loss"])
  export_dir = summary["export_dir"]
  generation = json.load(open(os.path.join(export_dir, "generation_config.json")))
  assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
  ours = checkpoints.load_model(export_dir)
  model = Llama(ours.config)
  ids = np.array([[1, 40, 77, 123, 9, 300, 5, 61]], np.int32)
  pos = np.arange(ids.shape[1], dtype=np.int32)[None]
  hidden = model.apply({"params": ours.params}, ids, pos, np.ones_like(ids))
  logits = np.asarray(model.apply({"params": ours.params}, hidden, method=Llama.logits))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      export_dir, torch_dtype=torch.float32
  )
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
  # The fine-tuned weights differ from the starting checkpoint.
  start = checkpoints.load_model(tiny_checkpoint).params
  assert not np.allclose(start["embedding"], ours.params["embedding"])
  hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
  assert hf_tok("the sea")["input_ids"] == load_tokenizer(tiny_checkpoint).encode("the sea")


def test_empty_selection_and_no_responses_fail_clearly(tiny_checkpoint, tmp_path):
  c = train_tiny.get_config()
  c.model.path, c.output_dir = tiny_checkpoint, str(tmp_path / "out")
  c.train.batch_size = c.train.micro_batch_size = jax.device_count()
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  c.data.path = str(empty)
  with pytest.raises(ValueError, match="no usable records"):
    trainer.run(c)
  noresp = tmp_path / "noresp.json"
  noresp.write_text(json.dumps([{"instruction": "explain plants", "input": "", "output": ""}] * 3))
  c.data.path = str(noresp)
  with pytest.raises(ValueError, match=r"no usable records.*3x empty response"):
    trainer.run(c)


def test_steps_are_examples_packed_within_each_step():
  """A step is batch_size examples (every epoch a new order, its last step the rest); each
  step's rows hold exactly its examples, padded with empty rows to whole micro-batches."""
  exs = _examples(list(np.random.default_rng(5).integers(4, 30, 23)))
  plan = data_lib.StepPlan(exs, batch_size=8, epochs=2, seed=3, max_length=40, pack=True)
  assert len(plan) == 6 and plan.steps_per_epoch == 3
  sizes = [len(plan.indices(s)) for s in range(6)]
  assert sizes == [8, 8, 7, 8, 8, 7]
  for epoch in range(2):
    seen = np.concatenate([plan.indices(3 * epoch + j) for j in range(3)])
    assert sorted(seen.tolist()) == list(range(23))
  assert plan.indices(0).tolist() != plan.indices(3).tolist()  # reshuffled each epoch
  rows_per_step = plan.rows_per_step()
  for s in range(6):
    rows = plan.rows(s, multiple=4)
    assert len(rows["inputs"]) % 4 == 0 and len(rows["inputs"]) >= rows_per_step[s]
    assert rows_per_step[s] < len(plan.indices(s))  # packed
    got = []
    for r in range(len(rows["inputs"])):
      for seg in set(rows["segment_ids"][r].tolist()) - {0}:
        m = rows["segment_ids"][r] == seg
        piece = rows["inputs"][r][m].tolist()
        got.append(next(e.record_index for e in exs if e.ids[:-1].tolist() == piece))
    assert sorted(got) == sorted(plan.indices(s).tolist())
    assert rows["weights"][rows["segment_ids"] == 0].sum() == 0
  unpacked = data_lib.StepPlan(exs, 8, 2, 3, 40, pack=False)
  assert unpacked.rows_per_step().tolist() == sizes


def test_template_file_llmzoo_layout(tok):
  """The released layout from configs/templates/llmzoo.json: the system text and the human
  turns are context; each answer with its BOS/EOS is a target."""
  path = os.path.join(REPO, "configs", "templates", "llmzoo.json")
  turns = [
      ("user", "explain plants"),
      ("assistant", "plants use light"),
      ("user", "and the sea"),
      ("assistant", "the sea is wide"),
  ]
  cfg = _data_cfg(template=path, train_turns="all", max_length=512)
  (ex,), _ = data_lib.prepare([_rec(turns)], tok, cfg)
  runs = [r.replace(" ", "") for r in _target_text(tok, ex)]
  assert runs == ["<s>plantsuselight</s>", "<s>theseaiswide</s>"]
  text = tok.hf.decode(ex.ids)
  assert text.replace(" ", "").startswith("<s>Aconversationbetween")
  assert "Human:<s>explainplants</s>Assistant:<s>" in text.replace(" ", "")
  assert data_lib.end_token_ids(tok, data_lib.resolve_template(tok, cfg)) == [tok.eos_id]


def test_bad_template_files_are_refused(tok, tmp_path):
  for body, reason in (
      ({"prompt": "{instruction}", "response": "{eos}"}, "exactly once"),
      ({"prompt": "{instruction}", "footer": "x"}, "unknown keys"),
      ([1], "JSON object"),
      ({"prompt": 3}, "must be a str"),
  ):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=reason):
      data_lib.resolve_template(tok, _data_cfg(template=str(path)))


def test_end_token_ids_include_the_chat_end_token(tiny_checkpoint):
  """Generation must stop where the template closes an answer (<|im_end|> for SmolLM2),
  not only at EOS."""
  tok = load_tokenizer(tiny_checkpoint)
  tok.hf.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
  tok.hf.chat_template = (
      "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}"
  )
  end = tok.hf.convert_tokens_to_ids("<|end|>")
  assert data_lib.end_token_ids(tok, "chat") == [tok.eos_id, end]


def test_fsdp_export_bf16_equals_the_params(tiny_checkpoint, tmp_path):
  """Params sharded over data×fsdp (8 fake devices) export as the same tensors, in bf16 when
  asked, with BOS / EOS ids in config.json and generation_config.json; local checkpoint
  dirs are made absolute, bucket URIs are left alone."""
  import ml_dtypes
  import safetensors.numpy

  from selectit_jax.checkpoints import hf
  from selectit_jax.training import checkpointing
  from selectit_jax.training import export as export_lib

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
  loaded = checkpoints.load_model(tiny_checkpoint, mesh)
  assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(loaded.params))
  tok = load_tokenizer(tiny_checkpoint)
  out = export_lib.export_hf(
      str(tmp_path / "hf"), loaded.config, loaded.params, tok, eos_ids=[2, 7], dtype="bfloat16"
  )
  got = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  host = checkpoints.load_model(tiny_checkpoint).params
  want = dict(hf.hf_tensors(loaded.config, host))
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name], w.astype(ml_dtypes.bfloat16), err_msg=name)
  config = json.load(open(os.path.join(out, "config.json")))
  generation = json.load(open(os.path.join(out, "generation_config.json")))
  assert config["torch_dtype"] == "bfloat16"
  for c in (config, generation):
    assert c["eos_token_id"] == [2, 7] and c["bos_token_id"] == tok.bos_id == 1
  assert str(checkpointing.resolve("gs://bucket/run/ckpt")) == "gs://bucket/run/ckpt"
  assert str(checkpointing.resolve("runs/x")) == os.path.abspath("runs/x")
