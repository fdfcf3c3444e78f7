"""score -> select on the tiny checkpoint: long samples truncated (not rejected) with one cut
for all prompts, and rejects.jsonl holding each run's own rejects."""

import json
import os
import subprocess
import sys

import pytest

from conftest import read_jsonl, sharegpt_record
from selectit_jax.scoring import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_INSTRUCTION = {1, 6}  # instruction alone over max_tokens
LONG_RESPONSE = {3}


def _dataset(path):
  raw = [
      sharegpt_record(i, f"Write line {i} about the sea.", f"The sea is wide {i}.")
      for i in range(8)
  ]
  for i in LONG_INSTRUCTION:
    raw[i] = sharegpt_record(i, f"Explain the sea {i}. " * 80, "It is wide.")
  for i in LONG_RESPONSE:
    raw[i] = sharegpt_record(i, "Describe the sea.", "The sea is wide and deep. " * 80)
  raw[5]["conversations"][1]["value"] = ""  # rejected by the reader
  path.write_text(json.dumps(raw), encoding="utf-8")
  return str(path)


def _run(module, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-m", module, *flags],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _score(checkpoint, data, out, *extra):
  return _run(
      "selectit_jax.score",
      "--config=configs/smollm2_135m.py",
      f"--config.model.path={checkpoint}",
      "--config.model.name=tiny",
      f"--config.data.path={data}",
      f"--config.output_dir={out}",
      "--config.prompts.k=3",
      "--config.engine.max_tokens=160",
      "--config.engine.batch_size=4",
      "--config.mesh.data=1",
      *extra,
  )


def _select(scores, out):
  _run(
      "selectit_jax.select",
      "--config=configs/select.py",
      f"--config.scores_dir={scores}",
      "--config.proportion=0.5",
      f"--config.output_dir={out}",
  )
  with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_long_samples_are_truncated_and_counted(tiny_checkpoint, tmp_path):
  data = _dataset(tmp_path / "data.json")
  scores = str(tmp_path / "scores")
  log = _score(tiny_checkpoint, data, scores, "--config.data.limit=8")
  assert "rejected 1 records, truncated 3 samples (9 texts)" in log
  table = store_lib.ScoreStore(scores).read_table()
  cut = {
      (i, k)
      for i, k, t in zip(
          table.column("sample_index").to_pylist(),
          table.column("prompt_index").to_pylist(),
          table.column("truncated").to_pylist(),
      )
      if t
  }
  assert cut == {(i, k) for i in LONG_INSTRUCTION | LONG_RESPONSE for k in range(3)}
  assert max(table.column("num_tokens").to_pylist()) <= 160
  assert [r["index"] for r in store_lib.ScoreStore(scores).read_rejects()] == [5]
  summary = _select(scores, str(tmp_path / "sel"))
  assert summary["num_ranked"] == 7 and summary["num_truncated"] == 3
  with open(tmp_path / "sel" / "report.md", encoding="utf-8") as f:
    assert "- truncated to engine.max_tokens while scoring: 3 (selected: " in f.read()
  rows = read_jsonl(tmp_path / "sel" / "scores.jsonl")
  assert {r["sample_index"] for r in rows if r["truncated"]} == LONG_INSTRUCTION | LONG_RESPONSE


@pytest.mark.slow
def test_rejects_are_the_current_runs(tiny_checkpoint, tmp_path):
  """too_long=reject over 8 records, then over 4 in the same dir: the records the second run
  read carry its verdicts, those beyond it keep the first run's (same settings), and select
  counts the rejects of the 8 records the store covers."""
  data = _dataset(tmp_path / "data.json")
  scores = str(tmp_path / "scores")
  _score(tiny_checkpoint, data, scores, "--config.engine.too_long=reject", "--config.data.limit=8")
  assert sorted(r["index"] for r in store_lib.ScoreStore(scores).read_rejects()) == [1, 3, 5, 6]
  log = _score(
      tiny_checkpoint, data, scores, "--config.engine.too_long=reject", "--config.data.limit=4"
  )
  assert "rejected 2 records" in log
  assert sorted(r["index"] for r in store_lib.ScoreStore(scores).read_rejects()) == [1, 3, 5, 6]
  summary = _select(scores, str(tmp_path / "sel"))
  assert summary["num_store_rejects"] == 4 and summary["num_truncated"] == 0
  assert summary["coverage"]["missing_unexplained"] == 0
