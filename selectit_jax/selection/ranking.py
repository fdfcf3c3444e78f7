"""Ranking: scores from stored probabilities, which samples can be ranked and why not, the order
and the count kept.

Decisions (see also formulas.py):
- Scores are computed in float64 (`jax.enable_x64` around the jnp formulas), so
  exact ties are real ties and match a numpy float64 reference.
- Tie-break. paper mode: higher score first; among equal scores the EARLIER
  sample index first (stable; our choice). code mode: the released order, a
  descending sort on (score, sample index), so the LATER index wins ties.
- Count kept: floor(N * proportion); N is the samples that can be ranked
  (count_from='rankable', default), or all input samples, unrankable ones
  included (count_from='input'; never more than the rankable ones are kept).
  paper mode floors exactly (decimal proportion, so 100 * 0.29 keeps 29), code
  mode uses the released int(N * proportion) (keeps 28 there). top_n > 0
  overrides the proportion. A cut that splits a group of equal scores is
  warned about (`tie_at_cut`): the tie-break alone decides who is kept.
- A sample is never ranked on garbage. Reasons, checked over the cells the
  level uses (token level: only prompt_index): 'missing_scores' (no stored row:
  never scored, or the text changed since; cells are matched by content hash),
  'nonfinite_probs', 'negative_probs', 'zero_digit_mass'; with several models
  the reason ends in ':<model>'. Rejected samples go to selection_rejects.jsonl
  and to scores.jsonl with rank null.
- Samples are the input records re-read with the scoring run's data config
  (manifest), so duplicate texts (stored once) get their scores, and equal
  scores. If the input file is gone, the axis falls back to the stored sample
  indices and no selected file is written.
- scores.jsonl lists ranked samples in rank order, then rejected ones.
"""

import fractions
import math

import jax
import numpy as np

from selectit_jax.selection import formulas
from selectit_jax.selection.inputs import Loaded

REASON_MISSING = formulas.REASON_MISSING


def num_selected(n: int, proportion: float, top_n: int = 0, mode: str = "paper") -> int:
  """How many of n rankable samples to keep."""
  if top_n and top_n > 0:
    return min(int(top_n), n)
  if not 0.0 <= proportion <= 1.0:
    raise ValueError(f"proportion must be in [0, 1], got {proportion}")
  if mode == "code":
    return int(n * proportion)  # released: float product, truncated
  return math.floor(n * fractions.Fraction(repr(float(proportion))))


COUNT_FROM = ("rankable", "input")


def count_base(num_rankable: int, num_input: int, count_from: str) -> int:
  """N of floor(N * proportion): the rankable samples, or all input samples."""
  if count_from not in COUNT_FROM:
    raise ValueError(f"count_from={count_from!r}; expected one of {COUNT_FROM}")
  return num_rankable if count_from == "rankable" else num_input


def tie_at_cut(ordered_scores: np.ndarray, kept: int) -> tuple[int, int]:
  """(kept, dropped) samples of the cut's score when the last kept and the first dropped
  sample score equal (the cut splits a tie), else (0, 0). Scores in rank order."""
  s = np.asarray(ordered_scores, np.float64)
  if not 0 < kept < s.size or s[kept - 1] != s[kept]:
    return 0, 0
  return int((s[:kept] == s[kept]).sum()), int((s[kept:] == s[kept]).sum())


def rank_order(score: np.ndarray, sample_index: np.ndarray, mode: str = "paper") -> np.ndarray:
  """Positions of the samples in rank order (best first). Scores must be finite."""
  score = np.asarray(score, np.float64)
  idx = np.asarray(sample_index, np.int64)
  if not np.all(np.isfinite(score)):
    raise ValueError("rank_order got non-finite scores; reject them first")
  if mode == "code":
    # sorted(zip(score, index), reverse=True): later index first on ties.
    return np.lexsort((-idx, -score))
  if mode == "paper":
    return np.lexsort((idx, -score))
  raise ValueError(f"unknown mode {mode!r}")


def compute_scores(
    probs: np.ndarray, mode: str, level: str, alpha: float, prompt_index: int, weights
) -> dict:
  """formulas.scores in float64, returned as numpy."""
  with jax.enable_x64(True):
    out = formulas.scores(
        np.asarray(probs, np.float64),
        mode=mode,
        level=level,
        alpha=alpha,
        prompt_index=prompt_index,
        weights=weights,
    )
    return {k: np.asarray(v) for k, v in out.items()}


def sample_reasons(loaded: Loaded, level: str, prompt_index: int) -> list:
  """Per sample: '' if rankable, else the first reason found in the cells used."""
  probs, present = loaded.probs, loaded.present
  if level == "token":
    probs = probs[:, :, prompt_index : prompt_index + 1]
    present = present[:, :, prompt_index : prompt_index + 1]
  cell = formulas.cell_reasons(probs, present)  # [N, M, K]
  several = len(loaded.models) > 1
  # A sample the scorer rejected (e.g. too long) has no rows; say why rather than 'missing'.
  scoring_reasons = {r["index"]: r["reason"] for r in loaded.store_rejects}
  out = []
  for i in range(probs.shape[0]):
    reason = ""
    for j, name in enumerate(loaded.models):
      bad = sorted(r for r in cell[i, j] if r)  # 'missing_scores' sorts first
      reason = bad[0] if bad else ""
      why = scoring_reasons.get(int(loaded.sample_index[i]))
      if reason == REASON_MISSING and why:
        reason = f"{REASON_MISSING} (rejected while scoring: {why})"
      if reason:
        reason = f"{reason}:{name}" if several else reason
        break
    out.append(reason)
  return out
