"""The README opens with the two set-up commands, CI runs the second one, and every other
command it shows runs as written."""

import json
import os
import re
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  head = readme.split("## ")[0]
  return re.findall(r"```bash\n(.*?)\n```", head, re.S)


def test_readme_opens_with_two_setup_commands():
  main_job, tests = _commands()
  assert "selectit_jax.score" in main_job and "selectit_jax.select" in main_job
  assert "pytest" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
  assert _commands()[1] in ci.splitlines()


# ---------------------------------------- every command the README shows, as written

# Set-up and CI steps: the test already runs inside the installed environment, and running
# the suite from inside the suite would recurse. Every other command runs.
_SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "pyink", "python -m pytest")
# Size overrides appended per command (later flags win): fewer records, prompts and tokens,
# one training step (the demo selection is a record of ~500 tokens). Nothing else changes.
_SIZE = {
    "score": [
        "--config.data.limit=8",
        "--config.prompts.k=2",
        "--config.engine.max_tokens=256",
    ],
    "train": ["--config.train.max_steps=1"],
    # A couple of items of one small task instead of 5 per MMLU subject.
    "evaluate": ["--config.tasks=arc_easy", "--config.limit=2"],
    # Two arms, one training step each, the same two evaluation items.
    "study": [
        "--config.arms=base,selectit",
        "--config.train.train.max_steps=1",
        "--config.eval.tasks=arc_easy",
        "--config.eval.limit=2",
    ],
    "sweep": [],
    "select": [],
    "plan": [],
}


def readme_commands() -> list[str]:
  """Every command the README shows, in order: fenced bash blocks (split at &&), indented
  blocks and inline code spans that start a `python -m selectit_jax.*` or `launch/` command;
  backslash continuations joined."""
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  found = []  # (offset, command)
  for m in re.finditer(r"```bash\n(.*?)\n```", text, re.S):
    for k, part in enumerate(m.group(1).replace("\\\n", " ").split("&&")):
      found.append((m.start() + k, " ".join(part.split())))
  fenced = [(m.start(), m.end()) for m in re.finditer(r"```.*?```", text, re.S)]
  starts = r"(?:python -m selectit_jax\.|launch/\S+\.sh |python -m pytest|pyink )"
  for m in re.finditer(r"^(?: {4})(" + starts + r"(?:.*\\\n)*.*)$", text, re.M):
    if not any(a <= m.start() < b for a, b in fenced):
      found.append((m.start(), " ".join(m.group(1).replace("\\\n", " ").split())))
  for m in re.finditer(r"`(" + starts + r"[^`]*)`", text.replace("\n", " ")):
    if not any(a <= m.start() < b for a, b in fenced):
      found.append((m.start(), " ".join(m.group(1).split())))
  return [c for _, c in sorted(found)]


def _module(argv: list[str]) -> str:
  i = argv.index("-m")
  return argv[i + 1].rsplit(".", 1)[-1]


def _argv(command: str) -> list[str]:
  """The command's argv with the size overrides appended; `python` is this interpreter."""
  import shlex
  import sys

  argv = shlex.split(command)
  if argv[0] == "launch/local.sh":
    argv = ["bash"] + argv
  argv = [sys.executable if a == "python" else a for a in argv]
  return argv + _SIZE[_module(argv)]


def test_readme_commands_are_complete():
  """No placeholder a user would have to fill in (FILE, DIR, ...) and no '...'."""
  commands = readme_commands()
  assert any("selectit_jax.train" in c for c in commands)
  for c in commands:
    assert "..." not in c, c
    assert not re.search(r"=[A-Z][A-Z_]+\b", c), c


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
  """Runs every README command in order in a fresh directory (configs/ and launch/ linked in)
  on one CPU device, as a new user would, with only size overrides appended; then checks
  the two-rater selection (Eq. 5 weights from the loaded weights, the raters' report) and
  that the fine-tuned export stops generating at SmolLM2's end-of-turn token."""
  for name in ("configs", "launch"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      DEVICES_PER_PROCESS="1",
  )
  env.pop("SELECTIT_TRACEBACK", None)
  for command in readme_commands():
    if command.startswith(_SETUP):
      continue
    argv = _argv(command)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    print(f"{time.perf_counter() - start:5.1f}s {command[:100]}", flush=True)  # pytest -s
    assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-3000:]}"
  assert os.path.exists(tmp_path / "runs/demo/selection/report.md")
  # Two raters in one dir, combined by Eq. 5 with θ read from their weights.
  summary = json.loads((tmp_path / "runs/two/selection/summary.json").read_text())
  assert [m.split("@")[0] for m in summary["models"]] == ["smollm2_135m", "gemma3_270m"]
  assert summary["weights"] == [134_515_008, 268_098_176]
  (agreement,) = summary["agreement"]
  assert agreement["models"] == summary["models"] and agreement["n_common"] >= 2
  report = (tmp_path / "runs/two/selection/report.md").read_text(encoding="utf-8")
  assert "## Raters: digit mass and agreement" in report
  export = tmp_path / "runs/demo/train/hf"
  generation = json.loads((export / "generation_config.json").read_text())
  config = json.loads((export / "config.json").read_text())
  tokenizer = json.loads((export / "tokenizer.json").read_text())
  im_end = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|im_end|>")
  eos = generation["eos_token_id"]
  assert im_end in (eos if isinstance(eos, list) else [eos])
  assert config["eos_token_id"] == eos and config["bos_token_id"] == generation["bos_token_id"]
