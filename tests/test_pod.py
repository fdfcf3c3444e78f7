"""Pod readiness: steps that run on one worker never touch the accelerator, hosts that would
score different inputs are refused, and one config runs on any device count."""

import getpass
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

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
FAKE_SRUN = os.path.join(ROOT, "tests", "fake_srun")
RECORDS = 8  # real ShareGPT records (the file the package ships), scored by the tiny model
# The scoring flags every stand-in run shares with the 1-process baseline.
FLAGS = [
    "--config.model.name=tiny",
    "--config.memory.device=cpu",
    "--config.mesh.data=-1",
    f"--config.data.limit={RECORDS}",
]


def _script(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"#!/usr/bin/env bash\n{body}\n")
  path.chmod(0o755)


def _python_stand_in(crash_when=None, step="score", wait=""):
  """A venv's python: this one, or one whose `step` main crashes when the shell test
  crash_when holds (e.g. on one worker or task), as a host that dies; after the shell
  command `wait`, if given."""
  crash = ""
  if crash_when:
    crash = (
        f'if [[ {crash_when} && " $* " == *" -m selectit_jax.{step} "* ]]; then\n'
        f"  {wait or ':'}\n"
        '  echo "simulated crash $(date +%s.%N)" >&2; exit 3\nfi\n'
    )
  return f'{crash}exec {sys.executable} "$@"'


def _fake_slice(root, ckpt, workers=2, crash_score_on=None):
  """A bucket holding the tiny checkpoint and `workers` worker homes whose bin/ holds the
  tools setup expects: gcsfuse/sudo/mountpoint stand-ins and a stand-in `uv` that logs its
  calls to FAKE_ROOT/uv-<worker>.log and makes venvs whose python is this one."""
  bucket = root / "gcs" / "bkt"
  shutil.copytree(ckpt, bucket / "models" / "tiny")
  for i in range(workers):
    bin_ = root / f"worker-{i}" / "bin"
    python = _python_stand_in("1" if crash_score_on == i else None)
    uv = f"""echo "$*" >> {root}/uv-{i}.log
if [[ $1 == venv ]]; then
  venv=${{@: -1}}; rm -rf "$venv"; mkdir -p "$venv/bin"
  printf '%s\\n' '#!/usr/bin/env bash' {shlex.quote(python)} > "$venv/bin/python"
  chmod +x "$venv/bin/python"
fi"""
    scripts = {
        "hostname": f"echo worker-{i}",
        "sudo": 'exec "$@"',
        "gcsfuse": "exit 0",
        "mountpoint": "exit 0",
        "uv": uv,
    }
    for name, body in scripts.items():
      _script(bin_ / name, body)
  return bucket


def _tpu_pod(root, *steps, **env_extra):
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
      POLL="0.3",
      EXTRA=" ".join(FLAGS),
      **env_extra,
  )
  return subprocess.run(
      ["bash", "launch/tpu_pod.sh", *(steps or ["all"])],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def _calls(root):
  with open(root / "calls.jsonl") as f:
    return [json.loads(line) for line in f]


def _rows(directory):
  from selectit_jax.scoring import store as store_lib  # noqa: PLC0415

  return store_lib.ScoreStore(str(directory)).read_table()


def _assert_same_store(directory, baseline):
  """Same cells (samples, prompts, models), each stored once, same probabilities."""
  from selectit_jax.scoring import store as store_lib  # noqa: PLC0415

  ta, tb = _rows(baseline), _rows(directory)
  a, b = store_lib.probs_array(ta), store_lib.probs_array(tb)
  assert not a.missing and not b.missing
  assert tb.num_rows == ta.num_rows  # no row written twice
  np.testing.assert_array_equal(a.sample_index, b.sample_index)
  np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def single_store(tiny_checkpoint, tmp_path_factory):
  """The 1-process run every multi-process store below must equal."""
  out = tmp_path_factory.mktemp("single") / "scores"
  proc = subprocess.run(
      _score_cmd(tiny_checkpoint, out, f"--config.data.limit={RECORDS}"),
      cwd=ROOT,
      env=_env(1),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return out


@pytest.mark.slow  # 2 workers: verify x2, score x1.5, plan, select; 1-process score (~1.5 min)
def test_tpu_pod_all_end_to_end_through_a_preemption(tiny_checkpoint, tmp_path, single_store):
  """tpu_pod.sh all on a stand-in slice of 2 workers, preempted as soon as the first shard
  is stored (every process killed, the disks gone). The pinned stack was installed and
  verified on both workers; score saw PREEMPTED, the slice was deleted, created, set up and
  verified again, and score resumed: the store equals a 1-process run's with no row twice.
  Then select ran, the slice was deleted, and each worker's step logs are in the bucket."""
  bucket = _fake_slice(tmp_path, tiny_checkpoint)
  run = bucket / "runs" / "r"
  proc = _tpu_pod(tmp_path, FAKE_PREEMPT_AFTER=str(run / "shards"))
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
  # The preemption: the slice was deleted and created anew, then the score step reran.
  assert (tmp_path / "preempted").exists(), log[-4000:]
  assert "[score] preempted (1 of at most" in log, log[-4000:]
  verbs = [c[3] for c in calls if c[:3] == ["compute", "tpus", "tpu-vm"]]
  assert verbs.count("create") == 2 and verbs.count("delete") == 2, verbs
  first_delete = verbs.index("delete")
  assert verbs.index("create", first_delete) > first_delete and verbs[-1] == "delete", verbs
  logs = sorted(os.listdir(run / "logs"))
  assert {
      "setup-worker-0.log",
      "verify-worker-0.log",
      "verify-worker-1.log",
      "score-worker-0.log",
      "score-worker-1.log",
      "plan-worker-0.log",
      "select-worker-0.log",
  } <= set(logs), logs
  assert (run / "selection" / "scores.jsonl").exists()
  # setup built each worker's venv with uv, pinned by launch/constraints.txt, on the first
  # slice and again on the new one ...
  for i in range(2):
    uv = (tmp_path / f"uv-{i}.log").read_text().splitlines()
    assert len(uv) == 4 and uv[0] == uv[2] and uv[1] == uv[3], uv
    assert uv[0].startswith("venv --clear --python 3.11 "), uv
    assert "--constraint" in uv[1] and "launch/constraints.txt jax[tpu] -e" in uv[1], uv
  # ... and verify saw both processes agree with it before anything was scored.
  for i in range(2):
    text = (run / "logs" / f"verify-worker-{i}.log").read_text()
    assert f"verify: process {i} of 2" in text and "ok" in text, text[-2000:]
  # The second score found the first one's rows and scored only the rest.
  summary = (run / "logs" / "score-worker-0.log").read_text()
  stored = int(re.search(r"scored \d+ texts \((\d+) already stored\)", summary).group(1))
  assert 0 < stored < _rows(single_store).num_rows, summary[-2000:]
  _assert_same_store(run, single_store)


@pytest.mark.slow  # a failing 2-worker score (~30 s)
def test_tpu_pod_failed_score_stops_before_select_and_delete(tiny_checkpoint, tmp_path):
  """Worker 1's score crashes at once, while worker 0 waits for it in
  jax.distributed.initialize: the script stops worker 0's step too and exits nonzero, naming
  worker 1 and its exit code, with no select and no delete, and both workers' logs are in
  the bucket. (The steps of `all` without verify and plan, which the test above runs.)"""
  bucket = _fake_slice(tmp_path, tiny_checkpoint, crash_score_on=1)
  proc = _tpu_pod(tmp_path, "create", "setup", "score", "select", "delete")
  log = proc.stdout + proc.stderr
  assert proc.returncode != 0, log[-4000:]
  assert "[score] FAILED: worker-1 exited with 3 (" in log, log[-4000:]
  calls = _calls(tmp_path)
  assert not any(c[3] == "delete" for c in calls)
  assert not any("selectit_jax.select" in " ".join(c) for c in calls)
  assert not (bucket / "runs" / "r" / "selection").exists()
  logs = bucket / "runs" / "r" / "logs"
  assert "simulated crash" in (logs / "score-worker-1.log").read_text()
  assert (logs / "score-worker-0.log").exists()  # stopped, and its log still copied
  assert (tmp_path / "worker-0" / "selectit_steps" / "score.rc").read_text().strip() != "0"


def _slurm(tmp_path, ckpt, out, crash_task=None):
  venv = tmp_path / "venv"
  crash = f"$SLURM_PROCID == {crash_task}" if crash_task is not None else None
  # Task 1 dies once task 0 serves the coordinator, i.e. waits in jax.distributed.initialize.
  serving = (
      "for _ in $(seq 300); do (: > /dev/tcp/${JAX_COORDINATOR_ADDRESS/://}) 2>/dev/null"
      " && break; sleep 0.1; done"
  )
  _script(venv / "bin" / "python", _python_stand_in(crash, step="verify", wait=serving))
  port = socket.socket()
  port.bind(("127.0.0.1", 0))
  env = _env()
  env.update(
      PATH=FAKE_SRUN + os.pathsep + env["PATH"],
      FAKE_DEVICES="4",
      FAKE_KILL_WAIT="10",
      SLURM_JOB_ID="4242",
      SLURM_NNODES="2",
      SLURM_NTASKS="2",
      SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2",
      SLURM_SUBMIT_DIR=ROOT,
      CONFIG="configs/score_tiny.py",
      MODEL=str(ckpt),
      OUT=str(out),
      VENV=str(venv),
      PORT=str(port.getsockname()[1]),
      EXTRA=" ".join(FLAGS),
  )
  port.close()
  # sbatch runs a copy of the script from its spool directory, in the submit directory.
  script = shutil.copy(os.path.join(ROOT, "launch", "slurm_gpu.sbatch"), tmp_path / "slurm_script")
  proc = subprocess.run(
      ["bash", str(script)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  return proc, time.time()


@pytest.mark.slow  # a 2-task verify and score, a select (~30 s)
def test_slurm_sbatch_two_tasks_with_a_stand_in_srun(tiny_checkpoint, tmp_path, single_store):
  """launch/slurm_gpu.sbatch with a stand-in srun of 2 tasks: both verify, the store equals
  a 1-process run's, and the selection is written."""
  out = tmp_path / "scores"
  proc, _ = _slurm(tmp_path, tiny_checkpoint, out)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  assert "0: verify: process 0 of 2" in log and "1: verify: process 1 of 2" in log, log[-4000:]
  _assert_same_store(out, single_store)
  assert (out / "selection" / "scores.jsonl").exists()


@pytest.mark.slow  # task 1 dies at once, task 0 is stopped (~10 s)
def test_slurm_dead_task_stops_the_other_at_once(tiny_checkpoint, tmp_path):
  """Task 1 dies in its first step (verify) while task 0 waits for it in
  jax.distributed.initialize (300 s timeout): srun --kill-on-bad-exit ends task 0 within
  seconds, the failure names task 1 and its node, and neither score nor select runs."""
  out = tmp_path / "scores"
  proc, end = _slurm(tmp_path, tiny_checkpoint, out, crash_task=1)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 3, log[-4000:]
  assert "srun: error: node-1: task 1: Exited with exit code 3" in log, log[-4000:]
  assert "1: error: task 1 on node-1 failed (exit 3)" in log, log[-4000:]
  assert "srun: error: node-0: task 0: SIGTERM" in log, log[-4000:]
  crashed = float(re.search(r"simulated crash (\d+\.\d+)", log).group(1))
  assert end - crashed < 20, log[-4000:]
  assert not out.exists()


def _lock():
  spec = importlib.util.spec_from_file_location("lock", os.path.join(ROOT, "launch", "lock.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_constraints_are_this_venvs_stack():
  """launch/constraints.txt pins what CI runs: regenerated from this venv it is unchanged
  (run `python launch/lock.py` after changing the stack), and its accelerator wheels are
  versions jax's own extras accept."""
  with open(os.path.join(ROOT, "launch", "constraints.txt")) as f:
    assert f.read() == _lock().render(), "stale: run `python launch/lock.py` in the CI venv"


def test_verify_names_each_package_off_its_pin():
  from selectit_jax import verify  # noqa: PLC0415

  python, pins = verify.read_constraints(os.path.join(ROOT, "launch", "constraints.txt"))
  assert verify.stack_problems(python, pins, "cpu") == []  # this venv is the pinned stack
  assert {"jax", "libtpu", "flax", "orbax-checkpoint"} <= pins.keys()
  stale = dict(pins, jax="0.4.30")
  installed = lambda name: {"libtpu": None}.get(name, pins.get(name))
  assert verify.stack_problems(python, stale, "cpu", installed) == [
      f"jax {pins['jax']} installed, pinned 0.4.30"
  ]
  assert verify.stack_problems(python, pins, "tpu", installed) == [
      f"libtpu is not installed (pinned {pins['libtpu']})"
  ]
  assert verify.stack_problems(python, pins, "cpu", installed, (3, 10, 12)) == [
      f"python 3.10.12, pinned {python}"
  ]


def test_initialize_passes_timeouts_and_keeps_every_gpu(monkeypatch):
  """With the coordinator, count and id given (the launch scripts), JAX's cluster detection
  is off (under SLURM it would limit each node's process to GPU SLURM_LOCALID), and the
  timeouts come from the environment, under jax.distributed.initialize's own names."""
  import inspect  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from selectit_jax.parallel import distributed  # noqa: PLC0415

  seen = {}
  real = inspect.signature(jax.distributed.initialize)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
  monkeypatch.setattr(distributed, "_done", False)
  env = {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1",
      "JAX_HEARTBEAT_TIMEOUT_SECONDS": "60",
      "JAX_INITIALIZATION_TIMEOUT": "120",
      "SLURM_JOB_ID": "1",
      "SLURM_LOCALID": "0",
  }
  assert distributed.initialize(None, environ=env)
  real.bind(**seen)  # every name is one this jax accepts
  assert seen == dict(
      coordinator_address="10.0.0.1:1234",
      num_processes=2,
      process_id=1,
      cluster_detection_method="deactivate",
      initialization_timeout=120,
      heartbeat_timeout_seconds=60,
  )


@pytest.mark.slow  # one python process (~5 s)
def test_verify_main_refuses_a_stack_off_its_pins(tmp_path):
  """`python -m selectit_jax.verify` against pins this venv does not have: one `error:` line
  naming the process and the package, exit 2."""
  with open(os.path.join(ROOT, "launch", "constraints.txt")) as f:
    pins = f.read()
  jax_pin = re.search(r"^jax==(.*)$", pins, re.M).group(0)
  stale = tmp_path / "constraints.txt"
  stale.write_text(pins.replace(jax_pin, "jax==0.4.30"))
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "selectit_jax.verify",
          "--config=configs/score_tiny.py",
          f"--constraints={stale}",
          "--processes=1",
      ],
      cwd=ROOT,
      env=_env(1),
      capture_output=True,
      text=True,
      timeout=120,
  )
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert last.startswith("error: process 0 of 1 on "), last
  assert f"jax {jax_pin[len('jax=='):]} installed, pinned 0.4.30" in last, last
