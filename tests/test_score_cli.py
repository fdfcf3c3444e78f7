"""The score command on the embedded SmolLM2 + ShareGPT: resume after kill -9, new keys for
changed prompts, and score -> select -> report."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest

from selectit_jax.scoring import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.data.limit=6",
    "--config.prompts.k=2",
    "--config.engine.batch_size=2",
    "--config.engine.shard_rows=2",
    "--config.engine.max_tokens=256",
    "--config.engine.max_shapes=3",
    "--config.mesh.data=1",
]


def _score_cmd(out, *extra):
  return [
      sys.executable,
      "-m",
      "selectit_jax.score",
      "--config=configs/smollm2_135m.py",
      f"--config.output_dir={out}",
      *SMALL,
      *extra,
  ]


def _env():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(cmd):
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _rows(out):
  table = store_lib.ScoreStore(out).read_table()
  table = table.sort_by([("sample_index", "ascending"), ("prompt_index", "ascending")])
  return table.drop_columns([]).to_pylist()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("uninterrupted"))
  _run(_score_cmd(out))
  return out


def test_resume_after_kill_9_is_identical(uninterrupted, tmp_path):
  out = str(tmp_path / "killed")
  proc = subprocess.Popen(
      _score_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  shards = os.path.join(out, "shards")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(shards) and any(n.endswith(".parquet") for n in os.listdir(shards)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = len(_rows(out))
  assert 0 < partial < len(_rows(uninterrupted))

  log = _run(_score_cmd(out))
  assert f"({partial} already stored)" in log
  assert _rows(out) == _rows(uninterrupted)


def test_rerun_skips_everything_and_new_prompts_get_new_keys(uninterrupted, tmp_path):
  out = str(tmp_path / "rerun")
  _run(["cp", "-r", uninterrupted, out])
  before = _rows(out)
  assert "scored 0 texts" in _run(_score_cmd(out))
  assert _rows(out) == before

  _run(_score_cmd(out, "--config.prompts.k=3"))
  rows = _rows(out)
  third = [r for r in rows if r["prompt_index"] == 2]
  assert third and len(rows) == len(before) + len(third)
  assert [r for r in rows if r["prompt_index"] < 2] == before


def test_score_select_report(uninterrupted, tmp_path):
  sel = str(tmp_path / "selection")
  _run(
      [
          sys.executable,
          "-m",
          "selectit_jax.select",
          "--config=configs/select.py",
          f"--config.scores_dir={uninterrupted}",
          "--config.proportion=0.5",
          f"--config.output_dir={sel}",
      ]
  )
  with open(os.path.join(sel, "scores.jsonl")) as f:
    scores = [json.loads(line) for line in f]
  ranked = [s for s in scores if s["rank"] is not None]
  chosen = [s for s in ranked if s["selected"]]
  assert len(chosen) == len(ranked) // 2 and len(ranked) >= 4
  with open(os.path.join(sel, "selected.json")) as f:
    selected = json.load(f)
  by_rank = sorted(chosen, key=lambda s: s["rank"])
  assert [r["id"] for r in selected] == [s["sample_id"] for s in by_rank]
  assert all(len(s["token_scores"]) == 2 for s in ranked)
  report = open(os.path.join(sel, "report.md")).read()
  assert "score_hist.png" in report and os.path.exists(os.path.join(sel, "score_hist.png"))
  manifest = store_lib.ScoreStore(uninterrupted).read_manifest()
  assert [m.num_params for m in manifest.models] == [134_515_008]
  table = store_lib.ScoreStore(uninterrupted).read_table()
  mass = pc.list_value_length(table.column("probs"))
  assert set(mass.to_pylist()) == {5}
