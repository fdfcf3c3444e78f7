"""study.md and study.png: one row per arm, one column per metric, mean ± 95 % interval and the
paired difference from the random arm (seeds pooled per item)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from selectit_jax import fileio
from selectit_jax.selection import report as report_lib
from selectit_jax.studies import stats

REFERENCE = "random"


@dataclasses.dataclass
class ArmResult:
  """What one arm (or the seeds of one group) produced."""

  name: str
  group: str
  num_records: int
  train_tokens: int
  wall_seconds: float
  metrics: dict  # {metric: {item id: score}}; higher is better unless the name ends in bpb


def group_scores(results: list[ArmResult], metric: str) -> tuple[list, dict]:
  """(item ids every arm has, {group: per-item score}): a group's seeds averaged per item."""
  have = [r for r in results if metric in r.metrics]
  if not have:
    return [], {}
  items = sorted(set.intersection(*(set(r.metrics[metric]) for r in have)))
  by_group: dict[str, list] = {}
  for r in have:
    by_group.setdefault(r.group, []).append([r.metrics[metric][i] for i in items])
  return items, {g: np.mean(np.asarray(v, np.float64), axis=0) for g, v in by_group.items()}


def summarize(results: list[ArmResult], metrics: list[str], num: int = 2000) -> dict:
  """{metric: {group: paired_bootstrap row}} against the random group where there is one."""
  out = {}
  for metric in metrics:
    items, scores = group_scores(results, metric)
    out[metric] = stats.paired_bootstrap(scores, REFERENCE, num=num) if items else {}
  return out


def _cell(row: dict | None, percent: bool) -> str:
  if not row:
    return "-"
  f = 100.0 if percent else 1.0
  digits = 1 if percent else 3
  text = f"{row['mean'] * f:.{digits}f} ± {(row['hi'] - row['lo']) / 2 * f:.{digits}f}"
  if row["delta"] is not None:
    text += (
        f" (Δ {row['delta'] * f:+.{digits}f} [{row['delta_lo'] * f:+.{digits}f}, "
        f"{row['delta_hi'] * f:+.{digits}f}])"
    )
  return text


def _percent(metric: str) -> bool:
  return not metric.endswith("bpb")


def write(out_dir: str, results: list[ArmResult], summary: dict, header: list[str]) -> str:
  """Writes study.md (+ study.png); returns the markdown path."""
  groups = list(dict.fromkeys(r.group for r in results))
  metrics = list(summary)
  rows = []
  for g in groups:
    arms = [r for r in results if r.group == g]
    rows.append(
        [
            g + (f" ({len(arms)} seeds)" if len(arms) > 1 else ""),
            arms[0].num_records,
            f"{np.mean([a.train_tokens for a in arms]):,.0f}",
            f"{np.mean([a.wall_seconds for a in arms]) / 60:.1f}",
        ]
        + [_cell(summary[m].get(g), _percent(m)) for m in metrics]
    )
  lines = list(header) + [""]
  lines += report_lib.md_table(
      ["arm", "records", "train tokens", "wall min"] + metrics,
      rows,
      "lrrr" + "r" * len(metrics),
  )
  n = {m: next(iter(summary[m].values()))["n"] for m in metrics if summary[m]}
  lines += [
      "",
      "Cells: mean ± half the 95 % interval (accuracy in %, bits per byte as is: lower is "
      "better), and in brackets the difference from the random arm with its 95 % interval, "
      "from a paired bootstrap over the items (2,000 resamples; random seeds averaged per "
      f"item). Items per metric: {', '.join(f'{m} {k}' for m, k in n.items())}. "
      "Train tokens and wall time are per arm (mean over seeds).",
  ]
  if summary:
    lines += ["", f"![study]({_plot(out_dir, groups, summary)})"]
  return fileio.write_text(os.path.join(out_dir, "study.md"), "\n".join(lines) + "\n")


def _plot(out_dir: str, groups: list, summary: dict) -> str:
  plt = report_lib.pyplot()
  metrics = list(summary)
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3.2), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    rows = [summary[m].get(g) for g in groups]
    x = np.arange(len(groups))
    mean = np.array([r["mean"] if r else np.nan for r in rows])
    err = np.array([[r["mean"] - r["lo"], r["hi"] - r["mean"]] if r else [0, 0] for r in rows])
    ax.bar(x, mean, yerr=err.T, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_xticks(x, groups, rotation=45, ha="right")
    ax.set_title(m)
  fig.tight_layout()
  return report_lib.save_plot(fig, out_dir, "study.png")
