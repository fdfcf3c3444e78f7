"""Markdown report of a selection run: plots, extremes, digit mass, rejects."""

import collections
import dataclasses
import math
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from selectit_jax import fileio

# Mean digit mass below this means the model rarely answers with a digit, so
# scores rest on tiny probabilities; worth a warning, not a failure.
LOW_MASS_WARN = 0.5
TRUNCATE = 160


@dataclasses.dataclass
class ReportData:
  """What select passes to the report; arrays are over samples [N]."""

  params: dict
  score: np.ndarray  # ranking score, NaN for rejected samples
  sample_index: np.ndarray
  sample_id: Sequence[str]
  rank: np.ndarray  # 0-based rank, -1 when rejected
  selected: np.ndarray  # bool
  digit_mass: np.ndarray  # [N, M, K] sum of the five probabilities
  models: Sequence[str]
  store_rejects: Sequence[dict]  # rejects.jsonl of the score dirs
  selection_rejects: Sequence[dict]  # {index, id, reason} made at selection
  instruction: Optional[Sequence[str]] = None  # None when records unavailable
  response: Optional[Sequence[str]] = None
  notes: Sequence[str] = ()
  outputs: dict = dataclasses.field(default_factory=dict)
  truncated: Optional[np.ndarray] = None  # [N] bool: text cut to engine.max_tokens
  num_counted: Optional[int] = None  # N of floor(N * proportion)
  warnings: Sequence[str] = ()
  raters: Optional[dict] = None  # raters.rater_stats, level=model with >= 2 models


def _trunc(s: str, n: int = TRUNCATE) -> str:
  s = " ".join(str(s).split())
  s = s if len(s) <= n else s[: n - 1] + "…"
  return s.replace("|", "\\|")


def fmt_value(x: Any, digits: int = 6, nan: str = "nan") -> str:
  """A table cell: floats to `digits` significant digits (NaN as `nan`), else str(x)."""
  if isinstance(x, (float, np.floating)):
    return nan if math.isnan(x) else f"{x:.{digits}g}"
  return str(x)


def md_row(cells: Sequence[Any]) -> str:
  """One markdown table row; cells are formatted (and '|'-escaped) already."""
  return "| " + " | ".join(map(str, cells)) + " |"


def md_table(cols: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list:
  """Header, separator and row lines; align: 'l' or 'r' per column ('' = all left)."""
  sep = "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(cols)))
  return [md_row(cols), "|" + sep] + [md_row(r) for r in rows]


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend; imported late, as only the
  reports plot."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save_plot(fig, out_dir: str, name: str) -> str:
  """Writes fig to out_dir/name (through fileio) and closes it; returns name."""
  fileio.save_figure(fig, os.path.join(out_dir, name))
  pyplot().close(fig)
  return name


def score_hist(ax, s: np.ndarray, max_bins: int) -> None:
  """Histogram of scores (nothing drawn for none), axes labelled."""
  if s.size:
    ax.hist(s, bins=min(max_bins, max(5, s.size // 5)), color="tab:blue", alpha=0.8)
  ax.set_xlabel("score")
  ax.set_ylabel("samples")


def digit_mass_stats(mass: np.ndarray) -> dict:
  """Statistics of sum(P1..P5) over finite cells."""
  m = np.asarray(mass, np.float64).ravel()
  m = m[np.isfinite(m)]
  if m.size == 0:
    return {"count": 0}
  q = np.quantile(m, [0.01, 0.05, 0.25, 0.5, 0.75])
  return {
      "count": int(m.size),
      "mean": float(m.mean()),
      "min": float(m.min()),
      "q01": q[0],
      "q05": q[1],
      "q25": q[2],
      "median": q[3],
      "q75": q[4],
      "max": float(m.max()),
      "below_0.1": int((m < 0.1).sum()),
  }


def _plots(out_dir: str, d: ReportData) -> list:
  plt = pyplot()
  made = []
  valid = d.rank >= 0
  s = np.asarray(d.score)[valid]
  if s.size:
    fig, ax = plt.subplots(figsize=(6, 4))
    score_hist(ax, s, max_bins=50)
    if d.selected.any():
      ax.axvline(
          np.min(np.asarray(d.score)[d.selected]),
          color="tab:red",
          linestyle="--",
          label="selection cut",
      )
      ax.legend()
    ax.set_title("Score histogram")
    fig.tight_layout()
    made.append(save_plot(fig, out_dir, "score_hist.png"))
  if s.size and d.instruction is not None:
    length = np.array([len(i) + len(r) for i, r in zip(d.instruction, d.response)])
    fig, ax = plt.subplots(figsize=(6, 4))
    sel = d.selected[valid]
    ax.scatter(length[valid][~sel], s[~sel], s=6, alpha=0.5, label="not selected")
    ax.scatter(length[valid][sel], s[sel], s=6, alpha=0.7, color="tab:red", label="selected")
    ax.set_xscale("log")
    ax.set_xlabel("instruction + response length (characters)")
    ax.set_ylabel("score")
    ax.set_title("Length vs score")
    ax.legend()
    fig.tight_layout()
    made.append(save_plot(fig, out_dir, "length_vs_score.png"))
  return made


def _extremes(d: ReportData, positions) -> list:
  rows = []
  for p in positions:
    ins = _trunc(d.instruction[p]) if d.instruction is not None else ""
    res = _trunc(d.response[p]) if d.response is not None else ""
    rows.append(
        [d.rank[p], d.sample_index[p], _trunc(d.sample_id[p], 40), f"{d.score[p]:.6g}", ins, res]
    )
  return md_table(["rank", "index", "id", "score", "instruction", "response"], rows, align="rrlrll")


def _opt(x, digits: int = 4) -> str:
  return "n/a" if x is None else fmt_value(float(x), digits)


def _raters_section(r: dict) -> list:
  """Per model θ and digit mass; per pair Spearman rho and top-set overlap (raters.py)."""
  L = ["## Raters: digit mass and agreement", ""]
  L += md_table(
      ["model", "θ (parameters)", "samples scored", "mean digit mass", "min digit mass"],
      [
          (x["model"], f'{x["num_params"]:,}', x["num_scored"])
          + (_opt(x["digit_mass_mean"]), _opt(x["digit_mass_min"]))
          for x in r["raters"]
      ],
      align="lrrrr",
  )
  L += [
      "",
      "Each model alone at sentence level (Eq. 4): Spearman rho of the scores over the "
      "samples both can score, and |A ∩ B| / |A| of the top sets each would select alone "
      "(same proportion / top_n).",
      "",
  ]
  L += md_table(
      ["model A", "model B", "samples", "Spearman rho", "top overlap", "top sizes A, B"],
      [
          (*a["models"], a["n_common"], _opt(a["spearman"]), _opt(a["top_overlap"]))
          + (", ".join(map(str, a["top_sizes"])),)
          for a in r["agreement"]
      ],
      align="llrrrr",
  )
  return L + [""]


def write_report(out_dir: str, d: ReportData) -> str:
  """Writes report.md (and PNGs) into out_dir; returns the report path."""
  os.makedirs(out_dir, exist_ok=True)
  plots = _plots(out_dir, d)
  n = len(d.sample_index)
  valid = d.rank >= 0
  order = np.argsort(np.where(valid, d.rank, np.iinfo(np.int64).max), kind="stable")
  ranked = order[: int(valid.sum())]
  L = ["# SelectIT selection report", ""]
  L += [
      "## Counts",
      "",
      f"- samples considered (input records, or stored samples without input): {n}",
      f"- rejected at selection: {int((~valid).sum())}",
      f"- ranked: {int(valid.sum())}",
      f"- selected: {int(d.selected.sum())}",
      f"- rejected while scoring (rejects.jsonl): {len(d.store_rejects)}",
  ]
  if d.truncated is not None:
    L.append(
        f"- truncated to engine.max_tokens while scoring: {int(d.truncated.sum())} "
        f"(selected: {int((d.truncated & d.selected).sum())})"
    )
  if d.num_counted is not None:
    base = d.params.get("count_from", "rankable")
    L.append(
        f"- N of floor(N * proportion): {d.num_counted} ("
        + (
            "ranked samples only; unrankable ones do not count"
            if base == "rankable"
            else "input samples, unrankable ones included"
        )
        + f"; count_from={base})"
    )
  L += [""] + [f"**Warning**: {w}" for w in d.warnings] + ([""] if d.warnings else [])
  L += ["## Parameters", ""]
  L += md_table(["key", "value"], [(k, _trunc(fmt_value(v), 200)) for k, v in d.params.items()])
  L.append("")
  if d.outputs:
    L += ["## Outputs", ""]
    L += [f"- {k}: `{v}`" for k, v in d.outputs.items()]
    L.append("")
  if d.notes:
    L += ["## Notes", ""] + [f"- {x}" for x in d.notes] + [""]
  L += ["## Scores", ""]
  if ranked.size:
    s = np.asarray(d.score)[ranked]
    L.append(
        f"mean {s.mean():.6g}, std {s.std():.6g}, min {s.min():.6g}, "
        f"median {np.median(s):.6g}, max {s.max():.6g}"
    )
    L.append("")
  L += [f"![{p}]({p})" for p in plots] + [""]
  L += ["## Top 5", ""] + _extremes(d, ranked[:5]) + [""]
  L += ["## Bottom 5", ""] + _extremes(d, ranked[-5:][::-1]) + [""]

  stat_keys = ("mean", "min", "q01", "q05", "q25", "median", "q75", "max")
  L += ['## Digit mass (sum of P("1")..P("5"))', ""]
  L += md_table(["model", "cells", *stat_keys, "<0.1"], [], align="l" + "r" * 10)
  warnings = []
  for j, name in enumerate(d.models):
    st = digit_mass_stats(d.digit_mass[:, j])
    if not st["count"]:  # one space per empty cell, as this row always had
      L.append(f"| {name} | 0 | | | | | | | | | |")
      continue
    L.append(md_row([name, st["count"], *(f"{st[k]:.4g}" for k in stat_keys), st["below_0.1"]]))
    if st["mean"] < LOW_MASS_WARN:
      warnings.append(
          f'**Warning**: model {name}: mean digit mass {st["mean"]:.3g} < '
          f"{LOW_MASS_WARN}; the model rarely answers with a rating digit, so "
          "scores rest on small probabilities."
      )
  L += [""] + warnings + ([""] if warnings else [])

  if d.raters:
    L += _raters_section(d.raters)

  rejects = []
  for stage, rows in (("scoring", d.store_rejects), ("selection", d.selection_rejects)):
    counts = collections.Counter(str(r.get("reason", "")) for r in rows)
    rejects += [(stage, _trunc(reason, 80), c) for reason, c in sorted(counts.items())]
  L += ["## Rejects by reason", ""]
  L += md_table(["stage", "reason", "count"], rejects or [("-", "none", 0)], align="llr")
  L.append("")
  path = os.path.join(out_dir, "report.md")
  return fileio.write_text(path, "\n".join(L))
