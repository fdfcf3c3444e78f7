"""The study's config, its arms (which records each trains on) and its paired bootstrap."""

import os
import shutil

import numpy as np
import pytest

from configs import study as study_config
from selectit_jax.selection import inputs
from selectit_jax.selection import runner as selection_runner
from selectit_jax.studies import arms as arms_lib
from selectit_jax.studies import stats
from conftest import select_cfg
from conftest import write_score_dir


def _pool(tmp_path, data_path, models=("m",)):
  dirs = [
      write_score_dir(tmp_path, m, data_path, 100 * (i + 1), model_shift=0.01 * i)
      for i, m in enumerate(models)
  ]
  notes = []
  recs, _ = inputs.load_input_records(dirs, notes)
  loaded = inputs.load_scores(dirs, samples=list(recs.values()))
  return recs, loaded


def test_arms_share_the_pool_and_size(tmp_path, data_path):
  recs, loaded = _pool(tmp_path, data_path)
  cfg = select_cfg(proportion=0.5)
  kinds = arms_lib.parse_kinds("base,selectit,random,longest,full")
  arms = arms_lib.build_arms(kinds, cfg, loaded, {i: r.response for i, r in recs.items()}, (0, 1))
  arms_lib.check_sizes(arms)
  by = {a.name: a for a in arms}
  assert list(by) == ["base", "selectit", "random_s0", "random_s1", "longest", "full"]
  # SelectIT's arm is exactly what `select` keeps, in rank order.
  cfg.level = "sentence"
  ranked = selection_runner.rank_samples(loaded, cfg, [1.0])
  assert by["selectit"].indices == tuple(
      int(i) for i in loaded.sample_index[ranked.order[: ranked.num_kept]]
  )
  pool = set(int(i) for i in loaded.sample_index[ranked.valid])
  assert set(by["full"].indices) == pool and len(pool) == ranked.valid.sum()
  for name in ("random_s0", "random_s1", "longest"):
    assert set(by[name].indices) <= pool and len(by[name].indices) == ranked.num_kept
  assert by["random_s0"].indices != by["random_s1"].indices
  # longest: no record outside the arm has a longer response than one inside it
  length = {i: len(recs[i].response) for i in pool}
  inside = [length[i] for i in by["longest"].indices]
  outside = [length[i] for i in pool - set(by["longest"].indices)]
  assert min(inside) >= max(outside)
  assert by["base"].indices == () and not by["base"].trains


def test_model_level_arm_needs_two_raters(tmp_path, data_path):
  recs, loaded = _pool(tmp_path, data_path)
  with pytest.raises(ValueError, match="two or more models"):
    arms_lib.build_arms(["selectit_model"], select_cfg(), loaded, {}, (0,))
  recs, loaded = _pool(tmp_path / "two", data_path, models=("a", "b"))
  (arm,) = arms_lib.build_arms(["selectit_model"], select_cfg(), loaded, {}, (0,))
  assert (
      len(arm.indices)
      == selection_runner.rank_samples(loaded, select_cfg(level="model"), [100.0, 200.0]).num_kept
  )


def test_unknown_arm_is_refused():
  with pytest.raises(ValueError, match="unknown arm"):
    arms_lib.parse_kinds("selectit,best")


def test_study_config_takes_another_training_config():
  pod = study_config.get_config("train_llama2_7b:v5p-8")
  assert (pod.train.train.micro_batch_size, pod.train.model.dtype) == (32, "bfloat16")
  assert pod.train.data.template == "alpaca" and pod.train.mesh.fsdp == -1
  assert study_config.get_config().train.model.embedded == "smollm2_135m"
  with pytest.raises(ValueError, match="unknown slice 'v9'"):
    study_config.get_config("train_llama2_7b:v9")
  with pytest.raises(ValueError, match="no training config configs/nosuch.py"):
    study_config.get_config("nosuch")


def test_paired_bootstrap():
  rng = np.random.default_rng(1)
  ref = rng.integers(0, 2, 400).astype(float)
  out = stats.paired_bootstrap(
      {
          "random": ref,
          "same": ref.copy(),
          "plus": ref + 1.0,
          "half": np.r_[ref[:200], 1 - ref[200:]],
      },
      "random",
  )
  assert out["same"]["delta"] == 0 and out["same"]["delta_lo"] == out["same"]["delta_hi"] == 0
  # a constant shift survives pairing exactly; unpaired intervals would be ~0.1 wide
  assert out["plus"]["delta_lo"] == out["plus"]["delta_hi"] == pytest.approx(1.0)
  m = out["random"]
  assert m["lo"] < m["mean"] < m["hi"] and m["mean"] == pytest.approx(ref.mean())
  # binomial: half-width ≈ 1.96·sqrt(p(1-p)/n)
  half = 1.96 * np.sqrt(m["mean"] * (1 - m["mean"]) / 400)
  assert (m["hi"] - m["lo"]) / 2 == pytest.approx(half, rel=0.15)
  with pytest.raises(ValueError, match="same items"):
    stats.paired_bootstrap({"a": np.ones(3), "b": np.ones(4)}, "a")


def test_report_pools_random_seeds_and_pairs_items(tmp_path):
  from selectit_jax.studies import report

  items = {f"q{i}": float(i % 2) for i in range(40)}
  flipped = {k: 1.0 - v for k, v in items.items()}
  results = [
      report.ArmResult("random_s0", "random", 8, 1000, 60.0, {"arc": items}),
      report.ArmResult("random_s1", "random", 8, 1200, 60.0, {"arc": flipped}),
      report.ArmResult("selectit", "selectit", 8, 900, 30.0, {"arc": dict(items, extra=1.0)}),
  ]
  items_, scores = report.group_scores(results, "arc")
  assert len(items_) == 40 and np.all(scores["random"] == 0.5)  # seeds averaged per item
  summary = report.summarize(results, ["arc"], num=200)
  assert summary["arc"]["selectit"]["delta"] == pytest.approx(0.0)
  path = report.write(str(tmp_path), results, summary, ["# study"])
  text = open(path).read()
  assert "| random (2 seeds) | 8 | 1,100 |" in text and "50.0 ±" in text
  assert (tmp_path / "study.png").stat().st_size > 1000


@pytest.mark.slow  # trains and evaluates a tiny model three times (~1 min)
def test_study_runs_every_arm_and_resumes(tiny_checkpoint, tmp_path, data_path, monkeypatch):
  import json

  from configs import train_tiny
  from selectit_jax.studies import runner
  from selectit_jax.training import trainer

  config = study_config.get_config()
  config.scores_dir = write_score_dir(tmp_path, "m", data_path, 100)
  config.select.proportion = 0.5
  config.arms = "base,selectit,random"
  config.seeds = "0,1"
  config.train = train_tiny.get_config()
  config.train.model.path = tiny_checkpoint
  config.train.data.val_fraction = 0.0
  config.train.train.epochs = 1
  config.train.export.enabled = False  # a study exports every arm regardless
  config.train.checkpoint.dir = str(tmp_path / "ckpt")  # shared: each arm gets its own subdir
  config.eval.tasks = "arc_easy"
  config.eval.limit = 3
  config.eval.engine.max_shapes = 1
  config.output_dir = str(tmp_path / "study")
  study = runner.run(config)

  arms = {a["name"]: a for a in study["arms"]}
  assert list(arms) == ["base", "selectit", "random_s0", "random_s1"]
  assert arms["base"]["train_tokens"] == 0 and arms["selectit"]["train_tokens"] > 0
  assert {a["num_records"] for n, a in arms.items() if n != "base"} == {5}  # ⌊10 rankable · 0.5⌋
  for name in ("selectit", "random_s0"):
    assert (tmp_path / "study" / "arms" / name / "train" / "hf" / "config.json").exists()
    assert (tmp_path / "study" / "arms" / name / "trained.json").exists()
    # Exported, so its checkpoints were deleted (study.keep_checkpoints=False).
    assert (tmp_path / "ckpt").is_dir() and not (tmp_path / "ckpt" / "arms" / name).exists()
  rows = study["summary"]["arc_easy_cloze"]
  assert set(rows) == {"base", "selectit", "random"} and rows["random"]["delta"] == 0
  assert all(r["n"] == 3 for r in rows.values())
  text = (tmp_path / "study" / "study.md").read_text()
  assert "| random (2 seeds) | 5 |" in text and "arc_easy_cloze" in text

  # Resumed: every arm is read back, nothing trains, the table is the same; an arm stopped
  # between its export and its evaluation is evaluated from the export, not trained again
  # (its checkpoints are gone).
  shutil.rmtree(tmp_path / "study" / "arms" / "random_s1" / "eval")
  os.remove(tmp_path / "study" / "arms" / "random_s1" / "done.json")
  monkeypatch.setattr(trainer, "run", lambda *a: pytest.fail("a trained arm trained again"))
  again = runner.run(config)
  assert json.dumps(again["summary"], sort_keys=True) == json.dumps(
      study["summary"], sort_keys=True
  )
