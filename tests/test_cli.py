"""User errors end every command with one `error: ...` line and exit 2; bugs keep their
traceback (selectit_jax/cli.py)."""

import pytest

from conftest import run_command

from selectit_jax import cli
from selectit_jax.errors import UserError


def _guarded_run(capsys, exc):
  def main(argv):
    raise exc

  with pytest.raises(SystemExit) as info:
    cli._guarded(main)(["prog"])
  return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "exc",
    [
        UserError("data.path: x.json is empty"),
        ValueError("data.turns='bogus'"),
        FileNotFoundError("no such file: x.json"),
        MemoryError("does not fit"),
    ],
)
def test_user_errors_are_one_line(capsys, exc):
  code, err = _guarded_run(capsys, exc)
  assert code == cli.EXIT_USER_ERROR
  assert err == f"error: {exc}\n"


def test_multi_line_message_ends_with_its_summary(capsys):
  code, err = _guarded_run(capsys, MemoryError("  total 9 GiB\n\nwill not fit on cpu"))
  assert code == 2
  assert err.splitlines() == ["  total 9 GiB", "error: will not fit on cpu"]


@pytest.mark.parametrize("exc", [TypeError("bug"), KeyError("bug"), AttributeError("bug")])
def test_bugs_are_not_swallowed(exc):
  with pytest.raises(type(exc)):
    cli._guarded(lambda argv: (_ for _ in ()).throw(exc))(["prog"])


def test_traceback_env_reraises(monkeypatch):
  monkeypatch.setenv("SELECTIT_TRACEBACK", "1")
  with pytest.raises(ValueError, match="bogus"):
    cli._guarded(lambda argv: (_ for _ in ()).throw(ValueError("bogus")))(["prog"])


def test_config_file_errors_read_as_one_line():
  # config_flags embeds get_config's traceback in the flag error; a ValueError (an unknown
  # preset) is the user's, anything else a bug in the config file.
  msg = (
      "flag --config=c.py:v9: Error whilst parsing config file:\n\n  Traceback (most recent "
      "call last):\n    File \"c.py\", line 3\n  ValueError: unknown slice 'v9'\n"
  )
  assert cli._flag_error(msg) == (
      "flag --config=c.py:v9: Error whilst parsing config file: " "ValueError: unknown slice 'v9'"
  )
  assert cli._flag_error("flag --config.k=x: invalid literal for int()") == (
      "flag --config.k=x: invalid literal for int()"
  )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  (d / "empty.json").write_text("")
  (d / "bad.json").write_text("not json {")
  (d / "good.json").write_text(
      '[{"id": "a", "conversations": [{"from": "human", "value": '
      '"Say hi."}, {"from": "gpt", "value": "Hi."}]}]'
  )
  (d / "noscores").mkdir()
  return str(d)


def _cases():
  score = [
      "score",
      "--config=configs/smollm2_135m.py",
      "--config.model.path={model}",
      "--config.mesh.data=1",
      "--config.output_dir={d}/out",
  ]
  good = "--config.data.path={d}/good.json"
  return {
      "score_missing_data": score + ["--config.data.path={d}/missing.json"],
      "score_empty_data": score + ["--config.data.path={d}/empty.json"],
      "score_not_json": score + ["--config.data.path={d}/bad.json"],
      "score_bad_too_long": score + [good, "--config.engine.too_long=maybe"],
      "score_bad_turns": score + [good, "--config.data.turns=bogus"],
      "score_missing_model": score + [good, "--config.model.path={d}/no_model"],
      "score_does_not_fit": score + [good, "--config.memory.headroom=1e-9"],
      "select_missing_scores": [
          "select",
          "--config=configs/select.py",
          "--config.scores_dir={d}/missing",
          "--config.output_dir={d}/s",
      ],
      "select_bad_mode": [
          "select",
          "--config=configs/select.py",
          "--config.mode=x",
          "--config.scores_dir={d}/noscores",
          "--config.output_dir={d}/s",
      ],
      "sweep_empty_scores": [
          "sweep",
          "--config=configs/sweep.py",
          "--config.scores_dir={d}/noscores",
          "--config.output_dir={d}/w",
      ],
      "train_missing_data": [
          "train",
          "--config=configs/train_smollm2_135m.py",
          "--config.data.path={d}/missing.json",
          "--config.output_dir={d}/t",
      ],
      "plan_bad_mesh": [
          "plan",
          "--config=configs/llama2_70b.py:v5e-8",
          "--config.mesh.data=3",
      ],
      "plan_bad_preset": ["plan", "--config=configs/llama2_70b.py:v5e-1"],
  }


_EXPECT = {
    "score_missing_data": "missing.json",
    "score_empty_data": "empty.json",
    "score_not_json": "bad.json",
    "score_bad_too_long": "engine.too_long='maybe'",
    "score_bad_turns": "data.turns='bogus'",
    "score_missing_model": "no_model",
    "score_does_not_fit": "will not fit",
    "select_missing_scores": "missing",
    "select_bad_mode": "'x'",
    "sweep_empty_scores": "noscores",
    "train_missing_data": "missing.json",
    "plan_bad_mesh": "needs 24 devices, 8 are present",
    "plan_bad_preset": "'v5e-1'",
}


@pytest.mark.slow  # 13 commands, each starting Python + JAX (~5 s)
@pytest.mark.parametrize("case", list(_cases()))
def test_command_user_error(case, inputs, tiny_checkpoint):
  command, *args = _cases()[case]
  args = [a.format(d=inputs, model=tiny_checkpoint) for a in args]
  proc = run_command(command, *args, timeout=300)
  last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert last.startswith("error: ") and _EXPECT[case] in last, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
