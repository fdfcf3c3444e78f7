"""Metrics of a sweep setting against the default (reference) setting.

jaccard_default    |S ∩ D| / |S ∪ D| of the selected sample sets.
jaccard_same_cut   the same with D = the default ranking cut at this
                   setting's proportion / top_n (isolates the score's effect).
spearman_default   Spearman rho of the scores, over samples ranked by both.
kendall_default    Kendall tau-b, the same samples, on at most
                   config.kendall_max_samples of them (fixed random subset).
*_len_selected / *_len_rejected  mean instruction / response length in
                   CHARACTERS (records re-read via the manifest, as select
                   does); 'rejected' = ranked but not selected. NaN without
                   records.
spearman_length    Spearman rho of score with instruction+response length.
"""

import math

import numpy as np
from scipy import stats

from selectit_jax.selection import ranking as ranking_lib


def ranking(score, valid, sample_index, mode) -> np.ndarray:
  """Positions of ranked samples, best first (ranking_lib.rank_order on the valid ones)."""
  pos = np.nonzero(valid)[0]
  return pos[ranking_lib.rank_order(score[pos], sample_index[pos], mode)]


def kendall(a, b) -> float:
  """Kendall tau-b (scipy's O(n log n) count, ties handled); NaN below 2 samples."""
  if a.size < 2:
    return float("nan")
  with np.errstate(all="ignore"):
    return float(stats.kendalltau(a, b).statistic)


class Reference:
  """The default setting's score, validity, ranking and selection; caches ranks
  (of the reference score and of lengths) per sample mask, as most settings
  rank the same samples."""

  def __init__(self, score, valid, order, selected, mode, sub_perm, length):
    self.score, self.valid, self.selected, self.mode = score, valid, selected, mode
    self.n_ranked = order.size
    self.rank = np.full(score.shape[0], np.iinfo(np.int64).max, np.int64)
    self.rank[order] = np.arange(order.size)
    self.sub_perm = sub_perm
    self.length = length
    self._cache = {}

  def _cached(self, what, mask, fn):
    key = (what, mask.tobytes())
    if key not in self._cache:
      if len(self._cache) > 8:
        self._cache.clear()
      self._cache[key] = fn()
    return self._cache[key]

  def ranks(self, common: np.ndarray):
    return self._cached("score", common, lambda: stats.rankdata(self.score[common]))

  def length_ranks(self, mask: np.ndarray):
    return self._cached("length", mask, lambda: stats.rankdata(self.length[mask]))


def vector_metrics(score, valid, ref: Reference, kendall_max: int) -> dict:
  """Spearman / Kendall with the reference and Spearman with length."""
  common = valid & ref.valid
  out = {"n_common": int(common.sum())}
  r_valid = stats.rankdata(score[valid]) if valid.sum() >= 2 else None

  def spearman_on(mask, other_ranks):
    # Most masks are `valid` itself: its ranks are computed once.
    if mask.sum() < 2:
      return float("nan")
    r = r_valid if np.array_equal(mask, valid) else stats.rankdata(score[mask])
    return _pearson(r, other_ranks(mask))

  out["spearman_default"] = spearman_on(common, ref.ranks)
  if kendall_max and common.sum() > kendall_max:
    pick = ref.sub_perm[common[ref.sub_perm]][:kendall_max]
    out["kendall_default"] = kendall(score[pick], ref.score[pick])
  else:
    out["kendall_default"] = kendall(score[common], ref.score[common])
  out["spearman_length"] = spearman_on(valid & np.isfinite(ref.length), ref.length_ranks)
  return out


def _pearson(x, y) -> float:
  # Plain sums, not np.dot: a threaded BLAS call costs far more than the
  # arithmetic on a busy CPU.
  x, y = x - x.mean(), y - y.mean()
  den = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
  return float(np.sum(x * y) / den) if den > 0 else float("nan")


def cut_metrics(order, cuts, mode, ref: Reference, ins_len, res_len) -> list:
  """Per cut: n_selected, Jaccard with the reference selection and with the
  reference's ranking cut at the same proportion/top_n, mean lengths in/out."""
  n_valid = order.size
  in_ref = np.concatenate([[0], np.cumsum(ref.selected[order])])
  ref_rank_here = ref.rank[order]
  ci = np.concatenate([[0.0], np.cumsum(ins_len[order])])
  cr = np.concatenate([[0.0], np.cumsum(res_len[order])])
  n_ref = int(ref.selected.sum())
  rows = []
  for c in cuts:
    n_keep = ranking_lib.num_selected(n_valid, 0.0 if c.top_n else c.proportion, c.top_n, mode)
    inter = int(in_ref[n_keep])
    union = n_keep + n_ref - inter
    # The reference ranking cut at this setting's proportion / top_n.
    n_ref_c = ranking_lib.num_selected(
        ref.n_ranked, 0.0 if c.top_n else c.proportion, c.top_n, ref.mode
    )
    inter_c = int(np.sum(ref_rank_here[:n_keep] < n_ref_c))
    union_c = n_keep + n_ref_c - inter_c
    rest = n_valid - n_keep
    rows.append(
        {
            "n_selected": n_keep,
            "jaccard_default": inter / union if union else 1.0,
            "jaccard_same_cut": inter_c / union_c if union_c else 1.0,
            "instruction_len_selected": ci[n_keep] / n_keep if n_keep else float("nan"),
            "response_len_selected": cr[n_keep] / n_keep if n_keep else float("nan"),
            "instruction_len_rejected": (ci[-1] - ci[n_keep]) / rest if rest else float("nan"),
            "response_len_rejected": (cr[-1] - cr[n_keep]) / rest if rest else float("nan"),
        }
    )
  return rows


def prompt_spearman(tok: np.ndarray) -> np.ndarray:
  """[K, K] Spearman rho between the prompts' columns of token scores tok [n, K]."""
  k = tok.shape[1]
  ranks = np.stack([stats.rankdata(tok[:, p]) for p in range(k)], 1) if tok.size else None
  return (
      np.corrcoef(ranks, rowvar=False).reshape(k, k)
      if tok.shape[0] >= 2
      else np.full((k, k), np.nan)
  )
