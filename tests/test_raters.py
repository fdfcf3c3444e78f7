"""Model level with two raters: θ, digit mass and agreement (Spearman rho, top-set overlap) in
summary.json and report.md, checked against scipy and a plain Python ranking."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from selectit_jax.selection import runner as selection

from conftest import crafted_probs, ref_sentence, ref_token_paper, select_cfg, write_score_dir

SHIFT = 0.05  # model b: a shifted copy of a's probabilities, so the rankings differ a little


def _probs(i, shift=0.0):
  return crafted_probs(6 if i == 7 else i, shift)  # 7 repeats 6's text: stored once, as 6


def _sentence(i, shift):
  return ref_sentence([ref_token_paper(v) for v in _probs(i, shift)], 0.2)


def _top(scores: dict, proportion: float) -> set:
  """The top floor(N * p) sample indices; ties: earlier index first (paper mode)."""
  order = sorted(scores, key=lambda i: (-scores[i], i))
  return set(order[: math.floor(len(order) * proportion)])


@pytest.mark.parametrize("proportion", [0.2, 0.5])
def test_two_raters_agreement(tmp_path, data_path, proportion):
  a = write_score_dir(tmp_path, "a", data_path, 135_000_000)
  b = write_score_dir(tmp_path, "b", data_path, 268_000_000, skip=(2,), model_shift=SHIFT)
  out = str(tmp_path / "out")
  summary = selection.run(
      select_cfg(
          scores_dir=f"{a},{b}",
          level="model",
          proportion=proportion,
          output_dir=out,
          allow_partial=True,
      )
  )
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["agreement"] == summary["agreement"]
  # Input records 0..12; 3 rejected by the reader, 5 and 8 unscorable, 7 a duplicate of 6.
  idx = [i for i in range(13) if i not in (3, 5, 8)]
  sa = {i: _sentence(i, 0.0) for i in idx}
  sb = {i: _sentence(i, SHIFT) for i in idx if i != 2}
  common = sorted(sb)
  rho = stats.spearmanr([sa[i] for i in common], [sb[i] for i in common]).statistic
  top_a, top_b = _top(sa, proportion), _top(sb, proportion)
  (agr,) = summary["agreement"]
  assert agr["models"] == ["a", "b"] and agr["n_common"] == len(common)
  assert agr["spearman"] == pytest.approx(rho, rel=1e-12)
  assert agr["top_sizes"] == [len(top_a), len(top_b)]
  assert agr["top_overlap"] == pytest.approx(len(top_a & top_b) / len(top_a))
  ra, rb = summary["raters"]
  assert (ra["num_params"], rb["num_params"]) == (135_000_000, 268_000_000)
  mass_a = np.concatenate([_probs(i).sum(-1) for i in range(13) if i != 3])
  mass_a = mass_a[np.isfinite(mass_a)]  # sample 5's NaN cell has no mass
  assert ra["digit_mass_mean"] == pytest.approx(mass_a.mean()) and ra["digit_mass_min"] == 0.0
  with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
    report = f.read()
  assert "## Raters: digit mass and agreement" in report
  assert f"| a | b | {len(common)} | {rho:.4g} |" in report
  assert "| b | 268,000,000 |" in report
  section = report.split("## Raters")[1].split("\n## ")[0]
  pair_table = [x for x in section.splitlines() if x.startswith(("| model A", "| a | b |"))]
  assert len(pair_table) == 2 and {x.count("|") for x in pair_table} == {7}  # no stray pipes


def test_one_model_has_no_agreement(tmp_path, data_path):
  a = write_score_dir(tmp_path, "a", data_path, 1000)
  summary = selection.run(select_cfg(scores_dir=a, output_dir=str(tmp_path / "out")))
  assert "agreement" not in summary
  with open(os.path.join(tmp_path, "out", "report.md"), encoding="utf-8") as f:
    assert "Raters:" not in f.read()
