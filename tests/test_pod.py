"""Pod readiness: steps that run on one worker never touch the accelerator, hosts that would
score different inputs are refused, and one config runs on any device count."""

import getpass
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a command's main as `python -m` would, then prints which JAX backends exist.
_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
  code = e.code
from jax._src import xla_bridge
print("BACKENDS", sorted(xla_bridge._backends), flush=True)
sys.exit(code)
"""


def test_plan_never_initialises_the_accelerator():
  """On one worker of a multi-host slice, a TPU backend waits for the other hosts: `plan`
  must neither ask for one (JAX_PLATFORMS=tpu would fail here, there is no libtpu) nor
  create any array (no backend at all when the config names the device and the count)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="tpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE, "selectit_jax.plan", "--config=configs/llama2_70b.py:v5p-64"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "-> fits" in out
  assert "BACKENDS []" in out, out[-3000:]


def _plan(ids=(1, 5, 7, 9)):
  from selectit_jax.scoring import batching  # noqa: PLC0415

  item = lambda i, ids: batching.WorkItem(i, f"s{i}", f"h{i}", 0, "p0", tuple(ids))
  batch = batching.Batch(rows=((item(0, ids),), (item(1, (1, 2)),)), length=16, skips=(0, 0))
  return batching.Plan(prefixes=((1,),), buckets=[16], batches=[batch])


def test_plan_digest_changes_with_one_token_id():
  from selectit_jax.scoring import runner  # noqa: PLC0415

  assert runner.plan_digest(_plan()) == runner.plan_digest(_plan())
  assert runner.plan_digest(_plan()) != runner.plan_digest(_plan(ids=(1, 5, 8, 9)))
  assert runner.plan_digest(None) != runner.plan_digest(_plan())


def test_differing_processes_names_process_and_part():
  import numpy as np  # noqa: PLC0415

  from selectit_jax.scoring import runner  # noqa: PLC0415

  n = len(runner.AGREEMENT_PARTS)
  gathered = np.zeros((3, n, 32), np.uint8)
  assert runner.differing_processes(gathered) == {}
  gathered[2, runner.AGREEMENT_PARTS.index("batch plan"), 5] = 1
  assert runner.differing_processes(gathered) == {2: ["batch plan"]}


def _env(devices_per_process=4):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
      PYTHONPATH=ROOT,
      DEVICES_PER_PROCESS=str(devices_per_process),
  )
  return env


def _score_cmd(ckpt, out, *extra):
  return [
      sys.executable,
      "-m",
      "selectit_jax.score",
      "--config=configs/score_tiny.py",
      f"--config.model.path={ckpt}",
      "--config.model.name=tiny",
      f"--config.output_dir={out}",
      "--config.memory.device=cpu",
      *extra,
  ]


@pytest.mark.slow  # 2 processes load the tiny model (~30 s on 2 busy cores)
def test_hosts_that_read_different_data_are_refused(tiny_checkpoint, tmp_path):
  """Process 1 reads one record more than process 0 (local.sh sets JAX_PROCESS_ID per
  process, so the limit differs per host): both refuse before writing or scoring anything,
  naming process 1 and what differs."""
  out = tmp_path / "scores"
  cmd = " ".join(_score_cmd(tiny_checkpoint, out, "--config.mesh.data=-1"))
  proc = subprocess.run(
      [
          "bash",
          "launch/local.sh",
          "2",
          "bash",
          "-c",
          cmd + " --config.data.limit=$((3 + JAX_PROCESS_ID))",
      ],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  log = proc.stdout + proc.stderr
  assert proc.returncode != 0, log[-3000:]
  assert "processes disagree with process 0" in log, log[-3000:]
  assert "process 1: input bytes, records" in log, log[-3000:]
  assert not (out / "shards").exists() or not os.listdir(out / "shards")
  assert not (out / "manifest.json").exists()


def test_one_config_scores_on_eight_devices(tiny_checkpoint, tmp_path):
  """configs/score_tiny.py (global batch 2) on 8 fake CPU devices, mesh.data=-1: the batch
  is rounded up to 8 with a note instead of being refused, and the planner agrees."""
  from configs import score_tiny  # noqa: PLC0415
  from selectit_jax.parallel import memory  # noqa: PLC0415
  from selectit_jax.scoring import runner  # noqa: PLC0415

  import jax  # noqa: PLC0415

  assert jax.device_count() == 8  # conftest's fake devices
  config = score_tiny.get_config()
  config.model.path = tiny_checkpoint
  config.model.name = "tiny"
  config.mesh.data = -1
  config.memory.device = "cpu"
  config.output_dir = str(tmp_path / "scores")
  summary = runner.run(config)
  assert summary.scored_rows > 0 and summary.rated_rows > 0
  assert config.engine.batch_size == 2  # the caller's config is left as it was

  fits, lines = memory.plan_config(config)
  assert fits and lines[0].startswith("note: engine.batch_size=2 rounded up to 8")
  assert any("batch 8 (1 rows/device)" in line for line in lines), lines


FAKE_BIN = os.path.join(ROOT, "tests", "fake_gcloud")


def _fake_slice(root, ckpt, workers=2):
  """A bucket holding the tiny checkpoint and `workers` worker homes, each with the tools
  setup expects (a venv whose python is this one, gcsfuse/sudo/mountpoint stand-ins)."""
  bucket = root / "gcs" / "bkt"
  shutil.copytree(ckpt, bucket / "models" / "tiny")
  for i in range(workers):
    bin_ = root / f"worker-{i}" / "bin"
    venv = root / f"worker-{i}" / "venv" / "bin"
    for d in (bin_, venv):
      d.mkdir(parents=True)
    scripts = {
        bin_ / "hostname": f"echo worker-{i}",
        bin_ / "sudo": 'exec "$@"',
        bin_ / "gcsfuse": "exit 0",
        bin_ / "mountpoint": "exit 0",
        venv / "pip": "exit 0",
        venv / "python": f'exec {sys.executable} "$@"',
    }
    for path, body in scripts.items():
      path.write_text(f"#!/usr/bin/env bash\n{body}\n")
      path.chmod(0o755)
  return bucket


def _tpu_pod(root, *extra, step="all"):
  env = _env()
  env.update(
      FAKE_ROOT=str(root),
      FAKE_WORKERS="2",
      FAKE_DEVICES="4",
      PATH=FAKE_BIN + os.pathsep + env["PATH"],
      USER=env.get("USER") or getpass.getuser(),  # setup chowns the mount to it
      TPU_NAME="t",
      ZONE="z",
      ACCELERATOR="v5p-16",
      BUCKET="bkt",
      MODEL="models/tiny",
      RUN="runs/r",
      CONFIG="configs/score_tiny.py",
      GCS_MOUNT=str(root / "gcs" / "bkt"),
      POLL="1",
      EXTRA=" ".join(
          [
              "--config.model.name=tiny",
              "--config.memory.device=cpu",
              "--config.mesh.data=-1",
              "--config.data.limit=6",
              *extra,
          ]
      ),
  )
  return subprocess.run(
      ["bash", "launch/tpu_pod.sh", step],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def _calls(root):
  with open(root / "calls.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # a 2-worker score, plan, select and a 1-process score (~1 min)
def test_tpu_pod_all_end_to_end_with_a_stand_in_gcloud(tiny_checkpoint, tmp_path):
  """tpu_pod.sh all on a stand-in slice of 2 workers: the store equals a 1-process run's,
  select ran, the slice was deleted, and each worker's step logs are in the bucket."""
  from selectit_jax.scoring import store as store_lib  # noqa: PLC0415

  bucket = _fake_slice(tmp_path, tiny_checkpoint)
  proc = _tpu_pod(tmp_path)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  calls = _calls(tmp_path)
  ssh = [c for c in calls if c[3] == "ssh"]
  # Every remote command is strict: no step's failure is piped away.
  assert all(
      flag.startswith("--command=set -euo pipefail;")
      for c in ssh
      for flag in c
      if flag.startswith("--command=")
  )
  assert calls[-1][3] == "delete"
  logs = sorted(os.listdir(bucket / "runs" / "r" / "logs"))
  assert {
      "score-worker-0.log",
      "score-worker-1.log",
      "plan-worker-0.log",
      "select-worker-0.log",
  } <= set(logs), logs
  assert (bucket / "runs" / "r" / "selection" / "scores.jsonl").exists()

  one = tmp_path / "one"
  single = subprocess.run(
      _score_cmd(tiny_checkpoint, one, "--config.data.limit=6"),
      cwd=ROOT,
      env=_env(1),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
  a = store_lib.probs_array(store_lib.ScoreStore(str(one)).read_table())
  b = store_lib.probs_array(store_lib.ScoreStore(str(bucket / "runs" / "r")).read_table())
  assert not a.missing and not b.missing
  np.testing.assert_array_equal(a.sample_index, b.sample_index)
  np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)


@pytest.mark.slow  # a failing 2-worker score (~30 s)
def test_tpu_pod_failed_score_stops_before_select_and_delete(tiny_checkpoint, tmp_path):
  """Worker 1's score crashes at once, while worker 0 waits for it in
  jax.distributed.initialize: `all` stops worker 0's step too and exits nonzero, with no
  select and no delete, and both workers' logs are in the bucket."""
  bucket = _fake_slice(tmp_path, tiny_checkpoint)
  # Worker 1's python runs only score (plan and select run on worker 0).
  (tmp_path / "worker-1" / "venv" / "bin" / "python").write_text(
      "#!/usr/bin/env bash\necho 'simulated crash on worker 1' >&2\nexit 3\n"
  )
  proc = _tpu_pod(tmp_path)
  log = proc.stdout + proc.stderr
  assert proc.returncode != 0, log[-4000:]
  assert "[score] FAILED" in log and "STEP_RC=3 worker-1" in log, log[-4000:]
  calls = _calls(tmp_path)
  assert not any(c[3] == "delete" for c in calls)
  assert not any("selectit_jax.select" in " ".join(c) for c in calls)
  assert not (bucket / "runs" / "r" / "selection").exists()
  logs = bucket / "runs" / "r" / "logs"
  assert "simulated crash" in (logs / "score-worker-1.log").read_text()
  assert (logs / "score-worker-0.log").exists()  # stopped, and its log still copied
  assert (tmp_path / "worker-0" / "selectit_steps" / "score.rc").read_text().strip() != "0"
