"""Sweeps: grid, equality with selectit_jax.select, metrics vs scipy, multi-model, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from configs import sweep as sweep_config
from selectit_jax.selection import ranking
from selectit_jax.selection import runner as selection
from selectit_jax.sweeps import grid
from selectit_jax.sweeps import metrics
from selectit_jax.sweeps import runner as sweep_runner
from conftest import read_jsonl, select_cfg, write_score_dir

# ------------------------------------------------------------------ grid


def _cfg(**kw):
  c = sweep_config.get_config()
  c.plots = False
  c.update(kw)
  return c


def test_parse_prompt_subsets():
  assert grid.parse_prompt_subsets("first:1,3", 4) == [(0,), (0, 1, 2)]
  assert grid.parse_prompt_subsets("all", 3) == [(0, 1, 2)]
  assert grid.parse_prompt_subsets("first", 3) == [(0,), (0, 1), (0, 1, 2)]
  assert grid.parse_prompt_subsets("all_k:2", 3) == [(0, 1), (0, 2), (1, 2)]
  # ';' joins specs; duplicates collapse; 'set:' sorts.
  assert grid.parse_prompt_subsets("set:2,0;first:1;all_k:1", 3) == [(0, 2), (0,), (1,), (2,)]
  with pytest.raises(ValueError):
    grid.parse_prompt_subsets("first:4", 3)
  with pytest.raises(ValueError):
    grid.parse_prompt_subsets("some:1", 3)


def test_build_grid_counts_and_default():
  c = _cfg(
      modes="paper,code",
      levels="token,sentence,model",
      alphas="0,0.2,1",
      prompt_subsets="first:1,2;all_k:2",
      token_prompts="",
      proportions="0.1,0.2",
      top_ns="5",
      weights="theta;uniform",
  )
  specs, cuts = grid.build_grid(c, ["a"], 3)
  # one model: token 3 + sentence (2 + 3 subsets, (0,1) shared -> 4) x 3 alphas; no model level
  assert len(specs) == 2 * (3 + 4 * 3)
  assert [(x.proportion, x.top_n) for x in cuts][:2] == [(0.1, 0), (0.2, 0)]
  assert cuts[2].top_n == 5 and np.isnan(cuts[2].proportion)
  specs2, _ = grid.build_grid(c, ["a", "b"], 3)
  assert len(specs2) == 2 * (2 * 3 + 2 * 4 * 3 + 4 * 3 * 2)
  assert {s.level for s in specs2} == {"token", "sentence", "model"}
  d, cut = grid.default_setting(c.default, ["a", "b"], 3)
  assert d.level == "model" and d.prompts == (0, 1, 2) and d.weights == "theta"
  assert cut.proportion == 0.2 and cut.top_n == 0
  d1, _ = grid.default_setting(c.default, ["a"], 3)
  assert d1.level == "sentence" and d1.model == "a"
  with pytest.raises(ValueError):
    grid.build_grid(_cfg(modes="paper,nope"), ["a"], 3)
  assert [lab for lab, _ in grid.parse_weights("theta;uniform;7/20,13/20", [7, 13])] == [
      "theta",
      "uniform",
      "7/20,13/20",
  ]


# ------------------------------------------------- equality with select


def _selections(out):
  t = pq.read_table(os.path.join(out, "selections.parquet")).to_pylist()
  return {r["setting_id"]: r["selected_sample_index"] for r in t}


def _select_run(tmp_path, name, row, sdir):
  """selectit_jax.select (run_selection) with the setting of one sweep row."""
  kw = dict(
      scores_dir=sdir,
      mode=row["mode"],
      level=row["level"],
      proportion=0.2 if row["top_n"] else row["proportion"],
      top_n=row["top_n"],
      output_dir=str(tmp_path / name),
  )
  if row["level"] == "token":
    kw["prompt_index"] = row["prompt_index"]
  else:
    kw["alpha"] = row["alpha"]
    kw["k"] = row["k"]
    assert row["prompts"] == ",".join(map(str, range(row["k"])))  # first-k subsets only
  if row["level"] == "model":
    kw["weights"] = "" if row["weights"] == "theta" else row["weights"]
  selection.run(select_cfg(allow_partial=True, **kw))  # stores with unscored samples
  rows = read_jsonl(os.path.join(str(tmp_path / name), "scores.jsonl"))
  return [r["sample_index"] for r in rows if r["selected"]]  # in rank order


def test_sweep_setting_equals_select_single_model(tmp_path, data_path):  # noqa: F811
  sdir = write_score_dir(tmp_path, "m", data_path, 1000, skip=(11,))
  out = str(tmp_path / "sweep")
  sweep_runner.run(
      _cfg(
          scores_dir=sdir,
          output_dir=out,
          alphas="0,0.3",
          prompt_subsets="first:2,3",
          proportions="0.2,0.5",
          top_ns="3",
          write_selections=True,
      )
  )
  rows = pq.read_table(os.path.join(out, "sweep.parquet")).to_pylist()
  sel = _selections(out)
  assert len(rows) == 2 * (3 + 2 * 2) * 3 == len(sel)
  # Every 5th setting (covers both modes, token and sentence, all cuts).
  for row in rows[::5]:
    got = _select_run(tmp_path, f's{row["setting_id"]}', row, sdir)
    assert sel[row["setting_id"]] == got, row
    assert row["n_selected"] == len(got)
  # 11 never scored, 5 and 8 have bad probabilities: not ranked at sentence level.
  sent = [r for r in rows if r["level"] == "sentence"]
  assert sent and all(r["n_ranked"] == 9 and r["n_unranked"] == 3 for r in sent)
  missing = read_jsonl(os.path.join(out, "missing.jsonl"))
  assert {r["sample_index"] for r in missing} == {5, 8, 11}


def test_sweep_model_level_equals_select_and_reports_missing(tmp_path, data_path):  # noqa: F811
  a = write_score_dir(tmp_path, "small", data_path, 7_000_000_000)
  b = write_score_dir(tmp_path, "big", data_path, 13_000_000_000, skip=(2,), model_shift=0.01)
  out = str(tmp_path / "sweep")
  summary = sweep_runner.run(
      _cfg(
          scores_dir=f"{a},{b}",
          output_dir=out,
          levels="sentence,model",
          alphas="0.2,1",
          prompt_subsets="first:3",
          proportions="0.3",
          weights="theta;uniform;7/20,13/20",
          write_selections=True,
      )
  )
  assert summary["models"] == ["small", "big"]
  rows = pq.read_table(os.path.join(out, "sweep.parquet")).to_pylist()
  sel = _selections(out)
  model_rows = [r for r in rows if r["level"] == "model"]
  assert len(model_rows) == 2 * 2 * 3
  for row in model_rows[::2]:
    assert sel[row["setting_id"]] == _select_run(
        tmp_path, f'm{row["setting_id"]}', row, f"{a},{b}"
    ), row
  # Sentence level of one model of the multi-model sweep = select on that dir alone.
  row = next(
      r for r in rows if r["level"] == "sentence" and r["model"] == "big" and r["mode"] == "code"
  )
  assert sel[row["setting_id"]] == _select_run(tmp_path, "big_only", row, b)
  # Sample 2 was never scored by 'big': reported, unranked at model level, still
  # ranked by 'small' alone; no sample is dropped or shifted.
  missing = read_jsonl(os.path.join(out, "missing.jsonl"))
  big_missing = [r for r in missing if r["model"] == "big" and r["sample_index"] == 2]
  assert big_missing and big_missing[0]["missing_prompts"] == [0, 1, 2]
  assert all(2 not in sel[r["setting_id"]] for r in model_rows)
  small = [r for r in rows if r["level"] == "sentence" and r["model"] == "small"]
  big = [r for r in rows if r["level"] == "sentence" and r["model"] == "big"]
  assert small[0]["n_ranked"] == big[0]["n_ranked"] + 1
  assert model_rows[0]["n_ranked"] == big[0]["n_ranked"]
  assert all(r["n_samples"] == 12 for r in rows)  # 13 records, 1 rejected by the reader
  with open(os.path.join(out, "sweep.md"), encoding="utf-8") as f:
    md = f.read()
  assert "big: " in md and "missing.jsonl" in md


def test_multi_model_without_records_aligns_by_index(tmp_path, data_path):  # noqa: F811
  a = write_score_dir(tmp_path, "small", data_path, 7)
  b = write_score_dir(tmp_path, "big", data_path, 13, skip=(2, 4))
  os.remove(data_path)
  inputs = sweep_runner.load_inputs([a, b])
  ld = inputs.loaded
  assert ld.models == ["small", "big"]
  miss = {(r["model"], r["sample_index"]) for r in sweep_runner.missing_report(inputs)}
  assert ("big", 2) in miss and ("big", 4) in miss and ("small", 2) not in miss
  # Rows of both models sit on the same sample (same probabilities, as written).
  i = int(np.nonzero(ld.sample_index == 12)[0][0])
  np.testing.assert_allclose(ld.probs[i, 0], ld.probs[i, 1])
  assert np.isnan(inputs.ins_len).all()


def test_scores_bit_identical_to_selection(tmp_path, data_path):  # noqa: F811
  a = write_score_dir(tmp_path, "small", data_path, 7)
  b = write_score_dir(tmp_path, "big", data_path, 13, model_shift=0.01)
  inputs = sweep_runner.load_inputs([a, b])
  ld = inputs.loaded
  c = _cfg(alphas="0,0.3,1", prompt_subsets="first;set:0,2", weights="theta;uniform;1,3")
  specs, _ = grid.build_grid(c, ld.models, 3)
  weights = dict(grid.parse_weights(c.weights, ld.num_params))
  seen = 0
  for spec, score, valid in sweep_runner.iter_scores(inputs, specs, weights, block_elements=40):
    j = ld.models.index(spec.model) if spec.level != "model" else slice(None)
    probs = ld.probs[:, [j]] if spec.level != "model" else ld.probs
    if spec.level != "token":
      probs = probs[:, :, list(spec.prompts)]
    want = ranking.compute_scores(
        probs,
        spec.mode,
        spec.level,
        0.0 if spec.level == "token" else spec.alpha,
        spec.prompts[0] if spec.level == "token" else 0,
        weights[spec.weights] if spec.weights else None,
    )["score"]
    np.testing.assert_array_equal(score[valid], want[valid])
    seen += 1
  assert seen == len(specs)


# ------------------------------------------------------- metrics vs scipy


def test_kendall_against_scipy_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 6, 200).astype(float)  # many ties
  b = a + rng.normal(0, 2, 200)
  assert metrics.kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_sweep_metrics_against_scipy(tmp_path, data_path):  # noqa: F811
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  out = str(tmp_path / "sweep")
  sweep_runner.run(
      _cfg(
          scores_dir=sdir,
          output_dir=out,
          modes="code",
          levels="token",
          token_prompts="1",
          proportions="0.3,0.5",
          kendall_max_samples=0,
          write_selections=True,
      )
  )
  rows = pq.read_table(os.path.join(out, "sweep.parquet")).to_pylist()
  sel = _selections(out)
  inputs = sweep_runner.load_inputs([sdir])
  ld = inputs.loaded
  # Reference: paper sentence level, alpha 0.2, all prompts, proportion 0.2.
  ref = ranking.compute_scores(ld.probs, "paper", "sentence", 0.2, 0, None)["score"]
  mine = ranking.compute_scores(ld.probs, "code", "token", 0.2, 1, None)["score"]
  ref_ok = ~inputs.bad[:, 0].any(axis=1)
  mine_ok = ~inputs.bad[:, 0, 1]
  common = ref_ok & mine_ok
  ref_order = metrics.ranking(ref, ref_ok, ld.sample_index, "paper")
  ref_sel = set(ld.sample_index[ref_order[: ranking.num_selected(ref_order.size, 0.2)]])
  length = inputs.ins_len + inputs.res_len
  for row in rows:
    s = set(sel[row["setting_id"]])
    assert row["jaccard_default"] == pytest.approx(len(s & ref_sel) / len(s | ref_sel))
    assert row["spearman_default"] == pytest.approx(
        stats.spearmanr(mine[common], ref[common]).statistic, abs=1e-12
    )
    assert row["kendall_default"] == pytest.approx(
        stats.kendalltau(mine[common], ref[common]).statistic, abs=1e-12
    )
    assert row["spearman_length"] == pytest.approx(
        stats.spearmanr(mine[mine_ok], length[mine_ok]).statistic, abs=1e-12
    )
    chosen = np.isin(ld.sample_index, list(s))
    rest = mine_ok & ~chosen
    assert row["instruction_len_selected"] == pytest.approx(inputs.ins_len[chosen].mean())
    assert row["response_len_rejected"] == pytest.approx(inputs.res_len[rest].mean())
    # Same-cut overlap: the reference ranking cut at this row's proportion.
    n_c = ranking.num_selected(ref_order.size, row["proportion"])
    ref_c = set(ld.sample_index[ref_order[:n_c]])
    assert row["jaccard_same_cut"] == pytest.approx(len(s & ref_c) / len(s | ref_c))
  # A Kendall subsample stays a valid tau.
  res = sweep_runner.sweep(
      inputs,
      _cfg(
          modes="code", levels="token", token_prompts="1", proportions="0.3", kendall_max_samples=4
      ),
  )
  assert -1.0 <= res.rows[0]["kendall_default"] <= 1.0


def test_default_setting_in_grid_is_identity(tmp_path, data_path):  # noqa: F811
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  inputs = sweep_runner.load_inputs([sdir])
  res = sweep_runner.sweep(
      inputs,
      _cfg(modes="paper", levels="sentence", alphas="0.2", prompt_subsets="all", proportions="0.2"),
  )
  (row,) = res.rows
  assert row["jaccard_default"] == 1.0 and row["jaccard_same_cut"] == 1.0
  assert row["spearman_default"] == pytest.approx(1.0)
  assert row["kendall_default"] == pytest.approx(1.0)


# ------------------------------------------------------------------ CLI


def test_cli_subprocess(tmp_path, data_path):  # noqa: F811
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  out = str(tmp_path / "cli")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
      sys.executable,
      "-m",
      "selectit_jax.sweep",
      "--config=configs/sweep.py",
      f"--config.scores_dir={sdir}",
      f"--config.output_dir={out}",
      "--config.alphas=0,0.2,0.5",
      "--config.prompt_subsets=first:1,2,3;all_k:2",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  t = pq.read_table(os.path.join(out, "sweep.parquet"))
  # 2 modes x (3 token + (3 + 3 - 1 shared) subsets x 3 alphas) x 5 proportions
  assert t.num_rows == 2 * (3 + 5 * 3) * 5
  for name in (
      "sweep.md",
      "overlap_alpha_proportion.png",
      "prompt_sensitivity.png",
      "score_distributions.png",
      "summary.json",
      "missing.jsonl",
  ):
    assert os.path.exists(os.path.join(out, name)), name
  with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
    assert json.load(f)["timing"]["settings"] == t.num_rows
