"""The README opens with the two set-up commands, and CI runs the second one."""

import os
import re

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
