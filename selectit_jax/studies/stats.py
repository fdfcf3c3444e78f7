"""Paired bootstrap over benchmark items: each arm's mean with a 95 % interval, and its
difference from a reference arm (random) with the same resampled items, so item difficulty
cancels out of the difference."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(
    scores: dict[str, np.ndarray], reference: str, num: int = 2000, seed: int = 0, level=0.95
) -> dict[str, dict]:
  """scores: {arm: per-item score [n]} on the same items in the same order.

  Returns {arm: mean, lo, hi (percentile interval of the mean), delta, delta_lo, delta_hi
  (arm − reference, the same resamples)}; delta is None without the reference arm."""
  if not scores:
    return {}
  n = {len(v) for v in scores.values()}
  if len(n) != 1:
    raise ValueError(f"paired bootstrap needs the same items in every arm, got sizes {n}")
  n = n.pop()
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(num, n)) if n else np.zeros((num, 0), np.int64)
  tail = (1 - level) / 2 * 100
  ref = scores.get(reference)
  out = {}
  for arm, v in scores.items():
    v = np.asarray(v, np.float64)
    means = v[idx].mean(axis=1) if n else np.full(num, np.nan)
    row = dict(
        mean=float(v.mean()) if n else float("nan"),
        lo=float(np.percentile(means, tail)),
        hi=float(np.percentile(means, 100 - tail)),
        delta=None,
        delta_lo=None,
        delta_hi=None,
        n=int(n),
    )
    if ref is not None:
      diff = v - np.asarray(ref, np.float64)
      deltas = diff[idx].mean(axis=1) if n else np.full(num, np.nan)
      row.update(
          delta=float(diff.mean()) if n else float("nan"),
          delta_lo=float(np.percentile(deltas, tail)),
          delta_hi=float(np.percentile(deltas, 100 - tail)),
      )
    out[arm] = row
  return out
