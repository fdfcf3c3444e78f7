"""Eq. 5 with several raters: each model's θ and digit mass, and how far the raters agree.

Agreement is per pair of models (a, b), on the sentence scores (Eq. 4) each model gives alone:
spearman is Spearman's rho over the samples both can score; top_overlap is |A ∩ B| / |A|, A
and B the top ⌊N · p⌋ sets each model would select alone at sentence level (its own rankable
samples, the run's mode, proportion / top_n and count_from).
"""

import itertools
import math
from typing import Optional

import numpy as np
from scipy import stats

from selectit_jax.selection import formulas
from selectit_jax.selection import ranking
from selectit_jax.selection import report as report_lib
from selectit_jax.selection.inputs import Loaded


def _finite(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def alone_valid(loaded: Loaded) -> np.ndarray:
  """[N, M] bool: model j can score sample i at sentence level (all K cells valid)."""
  cell = formulas.cell_reasons(loaded.probs, loaded.present)  # [N, M, K]
  return np.all(cell == "", axis=-1)


def top_set(sentence: np.ndarray, valid: np.ndarray, sample_index: np.ndarray, config) -> set:
  """Positions a model would select alone: select's ranking and count on one score column."""
  mode = config.mode
  pos = np.nonzero(valid)[0]
  order = pos[ranking.rank_order(sentence[pos], sample_index[pos], mode)]
  counted = ranking.count_base(pos.size, valid.size, config.get("count_from", "rankable"))
  kept = min(
      ranking.num_selected(counted, float(config.proportion), int(config.top_n), mode), pos.size
  )
  return set(order[:kept].tolist())


def rater_stats(loaded: Loaded, sentence: np.ndarray, config) -> dict:
  """{'raters': [{model, num_params, digit_mass_mean, digit_mass_min, num_scored}],
  'agreement': [{models: [a, b], n_common, spearman, top_overlap}]} for sentence [N, M]."""
  valid = alone_valid(loaded)
  mass = np.sum(loaded.probs, axis=-1)  # [N, M, K]; NaN where missing
  raters, tops = [], []
  for j, name in enumerate(loaded.models):
    st = report_lib.digit_mass_stats(mass[:, j])
    raters.append(
        {
            "model": name,
            "num_params": int(loaded.num_params[j]),
            "num_scored": int(valid[:, j].sum()),
            "digit_mass_mean": st.get("mean"),
            "digit_mass_min": st.get("min"),
        }
    )
    tops.append(top_set(sentence[:, j], valid[:, j], loaded.sample_index, config))
  agreement = []
  for a, b in itertools.combinations(range(len(loaded.models)), 2):
    common = valid[:, a] & valid[:, b]
    rho = float("nan")
    if common.sum() >= 2:
      with np.errstate(all="ignore"):  # a constant column gives NaN, reported as null
        rho = stats.spearmanr(sentence[common, a], sentence[common, b]).statistic
    agreement.append(
        {
            "models": [loaded.models[a], loaded.models[b]],
            "n_common": int(common.sum()),
            "spearman": _finite(rho),
            "top_overlap": len(tops[a] & tops[b]) / len(tops[a]) if tops[a] else None,
            "top_sizes": [len(tops[a]), len(tops[b])],
        }
    )
  return {"raters": raters, "agreement": agreement}
