"""`evaluate`'s generate forms on the shipped GSM8K and HumanEval items: the scoring path with
the decoder replaced by a fake (the gold text scores 1, a wrong one 0), the tiny model through
the real decoder into the store and back (resume), and old shards read with the new columns."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import eval as eval_config
from selectit_jax.evaluation import answers
from selectit_jax.evaluation import generation
from selectit_jax.evaluation import results
from selectit_jax.evaluation import runner
from selectit_jax.evaluation import tasks


class ByteTokenizer:
  """UTF-8 bytes as token ids: exact round trips, so the fake decoder's text is the text."""

  eos_id = 0

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(ids).decode("utf-8", "replace")


def test_readers_add_generate_forms():
  gsm = tasks.load("gsm8k", 1)[0]
  assert [f.kind for f in gsm.forms] == ["bpb", "generate"]
  bpb, gen = gsm.forms
  assert gen.context == bpb.context and gen.choices == ("18",) and gen.check == "number"
  assert "Question:" in gen.stop and "\n\n" in gen.stop
  he = tasks.load("humaneval", 1)[0].forms[1]
  assert he.stop == answers.HUMANEVAL_STOPS and he.check == "tests"
  assert he.problem["entry_point"] == "has_close_elements" and he.context == he.problem["prompt"]


def test_scoring_path_with_a_fake_decoder():
  """The gold GSM8K chain of thought and HumanEval's canonical solution (each followed by
  text past a stop string) score 1; a wrong number and a wrong body score 0."""
  gsm, he = tasks.load("gsm8k", 2), tasks.load("humaneval", 2)
  items = gsm + he
  right = [
      it.forms[0].choices[0] + "\n\nQuestion: 2 + 2?\nAnswer: So the answer is 5." for it in gsm
  ]
  right += [it.forms[0].choices[0] + "\ndef unrelated(:\n" for it in he]  # past the stop
  wrong = [" So the answer is 17.", " Add them. So the answer is 1,000,000."]
  wrong += ["    return None\n", "    while True:\n        pass\n"]  # the second times out
  tok = ByteTokenizer()
  keep, ids, skipped = generation.prompts(items, tok, 100_000, 8)
  assert keep == [0, 1, 2, 3] and not skipped
  calls = []

  def fake(texts):
    def generate(prompts, max_new, eos, stop, decode):
      calls.append((len(prompts), max_new, tuple(eos), tuple(stop)))
      return [tok.encode(texts[ids.index(p)]) for p in prompts]

    return generate

  limits = generation.Limits(timeout=3.0)
  rows, _ = generation.run(fake(right), tok, items, ids, 8, "m", limits)
  assert [r["score"] for r in rows] == [1.0] * 4, [r["answer"] for r in rows]
  assert [r["answer"] for r in rows[:2]] == [it.forms[1].choices[0] for it in gsm]
  assert all("Question:" not in r["prediction_text"] for r in rows[:2])
  assert rows[2]["prediction_text"] == he[0].forms[0].choices[0]  # cut before "\ndef "
  assert rows[2]["answer"] == "passed" and rows[2]["gold_text"] == he[0].forms[0].choices[0]
  assert all(r["form"] == "generate" and r["model"] == "m" for r in rows)
  # One decoder call per task (its stop strings), EOS passed on.
  assert sorted(c[3] for c in calls) == sorted({it.forms[1].stop for it in items})
  assert all(c[:3] == (2, 8, (0,)) for c in calls)

  rows, _ = generation.run(fake(wrong), tok, items, ids, 8, "m", limits)
  assert [r["score"] for r in rows] == [0.0] * 4
  assert rows[0]["answer"] == "17" and rows[1]["answer"] == "1000000"
  assert rows[2]["answer"].startswith("failed") and rows[3]["answer"].startswith("timed out")


def test_long_prompts_are_left_out_with_a_reason():
  items = tasks.load("gsm8k", 1)
  keep, _, skipped = generation.prompts(items, ByteTokenizer(), 1000, 256)
  assert keep == [] and "gsm8k item 0" in skipped[0] and "max_tokens 1000" in skipped[0]


def test_old_shards_read_with_the_new_columns(tmp_path):
  store = results.ResultStore(str(tmp_path))
  old = pa.schema([f for f in results.SCHEMA if f.name not in results.DEFAULTS])
  row = dict(
      task="arc_easy",
      id="1",
      form="cloze",
      model="m",
      prediction=0,
      gold=1,
      score=0.0,
      logliks=[-1.0, -2.0],
      num_tokens=[1, 2],
      num_bytes=[3, 4],
  )
  # A shard as written before the text columns, then one with them.
  pq.write_table(
      pa.Table.from_pylist([row], schema=old), os.path.join(store.items_dir, "000000.parquet")
  )
  store = results.ResultStore(str(tmp_path))
  store.write([dict(row, id="2", form="generate", prediction_text="x", answer="1")])
  got = store.read_table().to_pylist()
  assert [(r["id"], r["prediction_text"], r["answer"], r["max_new_tokens"]) for r in got] == [
      ("1", "", "", 0),
      ("2", "x", "1", 0),
  ]


def test_tiny_model_generates_scores_and_resumes(tiny_checkpoint, tmp_path):
  config = eval_config.get_config()
  config.model.path = tiny_checkpoint
  config.model.name = "tiny"
  config.tasks = "gsm8k,humaneval"
  config.limit = 2
  config.engine.max_shapes = 1
  config.generate.max_new_tokens = 8
  config.generate.timeout = 3.0
  config.output_dir = str(tmp_path)
  summary = runner.run(config)
  assert summary.computed == 4 and summary.stored == 0
  assert summary.generation.prompts == 4 and 0 < summary.generation.new_tokens <= 32
  table = results.ResultStore(str(tmp_path)).read_table().to_pylist()
  gen = [r for r in table if r["form"] == "generate"]
  assert len(gen) == 4 and {r["task"] for r in gen} == {"gsm8k", "humaneval"}
  for r in gen:
    assert r["score"] in (0.0, 1.0) and r["model"] == gen[0]["model"] and r["max_new_tokens"] == 8
    assert isinstance(r["prediction_text"], str) and r["gold_text"] and r["num_tokens"][0] <= 8
  assert len([r for r in table if r["form"] == "bpb"]) == 4
  for task, metric in (("gsm8k", "exact match"), ("humaneval", "pass@1")):
    s = summary.tasks[task]["generate"]
    assert s["n"] == 2 and s["metric"].startswith(metric) and s["ci95"][0] <= s["value"]
  written = (tmp_path / "summary.md").read_text()
  assert "| humaneval | generate | pass@1 (greedy) |" in written and "tok/s" in written
  shards = sorted(os.listdir(tmp_path / "items"))

  again = runner.run(config)
  assert again.computed == 0 and again.stored == 4 and again.generation.prompts == 0
  assert sorted(os.listdir(tmp_path / "items")) == shards and again.tasks == summary.tasks
  # Stored generations of another length are not passed off as this one's.
  config.generate.max_new_tokens = 4
  with pytest.raises(ValueError, match="generated with max_new_tokens=8, not 4"):
    runner.run(config)
