"""`launch/local.sh 2 python -m selectit_jax.score ...` (2 processes x 4 fake CPU devices,
jax.distributed over localhost) stores the same probabilities and gives the same selection
as a 1-process, 1-device run; per-process resume refills only the missing shard."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selectit_jax.scoring import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config.data.limit=10",
    "--config.prompts.k=2",
    "--config.engine.batch_size=8",
    "--config.engine.max_tokens=384",
    "--config.engine.max_shapes=2",
    "--config.engine.shard_rows=8",
    "--config.memory.device=cpu",
]


def _env(devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      DEVICES_PER_PROCESS="4",
  )
  return env


def _run(cmd, devices=1):
  proc = subprocess.run(
      cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout + proc.stderr


def _score(ckpt, out, processes):
  cmd = [
      sys.executable,
      "-m",
      "selectit_jax.score",
      "--config=configs/smollm2_135m.py",
      f"--config.model.path={ckpt}",
      "--config.model.name=tiny",
      f"--config.output_dir={out}",
      *ARGS,
  ]
  if processes == 1:
    return _run(cmd + ["--config.mesh.data=1"])
  return _run(["bash", "launch/local.sh", str(processes)] + cmd)


def _select(scores, out):
  _run(
      [
          sys.executable,
          "-m",
          "selectit_jax.select",
          "--config=configs/select.py",
          f"--config.scores_dir={scores}",
          f"--config.output_dir={out}",
          "--config.proportion=0.3",
      ]
  )
  with open(os.path.join(out, "scores.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_same_selection(a, b):
  """Same samples, ranks and selection; scores equal up to float rounding (devices run
  different row counts per matmul)."""
  key = lambda rows: [(r["sample_id"], r["rank"], r["selected"]) for r in rows]
  assert key(a) == key(b)
  score = lambda rows: [np.nan if r["score"] is None else r["score"] for r in rows]  # rejected
  np.testing.assert_allclose(score(a), score(b), rtol=0, atol=1e-6)


def _probs(out):
  return store_lib.probs_array(store_lib.ScoreStore(out).read_table())


@pytest.mark.slow  # 4 score runs (~25 s each on 2 busy cores)
def test_two_processes_equal_one(tiny_checkpoint, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _score(tiny_checkpoint, one, 1)
  log = _score(tiny_checkpoint, two, 2)
  assert "[p1]" in log
  shards = sorted(os.listdir(os.path.join(two, "shards")))
  assert {s[:5] for s in shards} == {"00000", "00001"}, shards  # each process wrote its rows
  a, b = _probs(one), _probs(two)
  assert not a.missing and not b.missing and a.probs.shape[0] >= 6
  np.testing.assert_array_equal(a.sample_index, b.sample_index)
  np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)
  _assert_same_selection(_select(one, str(tmp_path / "sel1")), _select(two, str(tmp_path / "sel2")))

  # Resume: lose process 1's shards; a rerun recomputes only batches with missing rows, and
  # only process 1 writes (process 0's rows are stored).
  for s in shards:
    if s.startswith("00001"):
      os.remove(os.path.join(two, "shards", s))
  _score(tiny_checkpoint, two, 2)
  after = sorted(os.listdir(os.path.join(two, "shards")))
  assert [s for s in after if s.startswith("00000")] == [s for s in shards if s.startswith("00000")]
  c = _probs(two)
  assert not c.missing
  np.testing.assert_allclose(c.probs, a.probs, rtol=0, atol=1e-6)
