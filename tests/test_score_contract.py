"""The score dir's contract through the CLIs: settings that change a probability are refused
on resume, runs add models, prompts and coverage instead of narrowing what select sees, and
the rating scale is a setting. Tiny random checkpoint, real ShareGPT records."""

import json
import os

import pytest

from conftest import run_command

from selectit_jax.scoring import manifest as manifest_lib
from selectit_jax.scoring import store as store_lib

pytestmark = pytest.mark.slow  # a dozen CLI runs, ~10 s each


def _run(module, *args, ok=True):
  proc = run_command(module, *args)
  assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
  return proc.stderr


def _score(ckpt, out, *extra, ok=True):
  return _run(
      "score",
      "--config=configs/score_tiny.py",  # 4 records, 2 prompts, short rows, one device
      f"--config.model.path={ckpt}",
      f"--config.output_dir={out}",
      *extra,
      ok=ok,
  )


def _select(scores, out, *extra, ok=True):
  _run(
      "select",
      "--config=configs/select.py",
      f"--config.scores_dir={scores}",
      f"--config.output_dir={out}",
      *extra,
      ok=ok,
  )
  if ok:
    with open(os.path.join(out, "summary.json")) as f:
      return json.load(f)


def test_resume_with_other_settings_is_refused_by_name(tiny_checkpoint, tmp_path):
  out = str(tmp_path / "s")
  _score(tiny_checkpoint, out)
  before = store_lib.ScoreStore(out).read_table().num_rows
  for flag, named in (
      ("--config.engine.max_tokens=200", "engine.max_tokens"),
      ("--config.engine.too_long=reject", "engine.too_long"),
      ("--config.data.turns=released", "data.turns"),
  ):
    err = _score(tiny_checkpoint, out, flag, ok=False)
    assert named in err.strip().splitlines()[-1]
  assert store_lib.ScoreStore(out).read_table().num_rows == before


def test_runs_add_models_prompts_and_coverage(tiny_checkpoint, tmp_path):
  """A second model, a later run with fewer prompts and one over fewer records: select
  still sees both models, both prompts and all records."""
  out = str(tmp_path / "s")
  _score(tiny_checkpoint, out, "--config.model.name=a")
  _score(tiny_checkpoint, out, "--config.model.name=b")
  _score(
      tiny_checkpoint, out, "--config.model.name=a", "--config.prompts.k=1", "--config.data.limit=2"
  )
  manifest = manifest_lib.read(out)
  assert [m.name for m in manifest.models] == ["a", "b"] and manifest.limit == 4
  # model.dtype 'auto' (the default) is recorded as what ran on this CPU, not as 'auto'.
  assert {m.settings["model.dtype"] for m in manifest.models} == {"float32"}
  summary = _select(out, str(tmp_path / "sel"), "--config.level=model")
  assert len(summary["models"]) == 2 and summary["k"] == 2
  assert summary["num_samples"] == summary["num_ranked"] + summary["num_selection_rejects"]
  assert summary["num_samples"] >= 3  # the 4 records read, less any the reader rejected
  counts = manifest.runs[0].turn_counts  # what data.turns chose among, in the report too
  assert set(counts) == {"first", "first_user", "released"}
  assert counts["first"] == summary["num_samples"] <= counts["first_user"] <= 4
  report = open(os.path.join(str(tmp_path / "sel"), "report.md")).read()
  assert "turn policies over the 4 records read: first " in report


def test_rating_scale_is_a_setting(tiny_checkpoint, tmp_path):
  out = str(tmp_path / "s3")
  _score(tiny_checkpoint, out, "--config.prompts.scale=3")
  table = store_lib.ScoreStore(out).read_table()
  assert store_lib.rating_scale(table) == 3 and manifest_lib.read(out).scale == 3
  assert _select(out, str(tmp_path / "sel"))["num_ranked"] > 0
  _select(out, str(tmp_path / "code"), "--config.mode=code", ok=False)  # five ratings only
  assert "prompts.scale" in _score(tiny_checkpoint, out, ok=False).strip().splitlines()[-1]


def test_a_config_without_an_embedded_model_needs_a_path(tmp_path):
  err = _run("score", "--config=configs/llama2_7b.py", f"--config.output_dir={tmp_path}", ok=False)
  assert "model.path" in err.strip().splitlines()[-1]


# Two embedded raters in one dir at model level (Eq. 5 weights, the raters report): the README
# shows those commands; tests/test_readme.py runs them and checks the selection.
