"""sweep.md and the sweep's plots; table and plot helpers shared with the
selection report (selection/report.py)."""

import numpy as np

from selectit_jax import fileio
from selectit_jax.selection.report import fmt_value, md_table, pyplot, save_plot, score_hist

TABLE_COLS = [
    "setting_id",
    "mode",
    "level",
    "model",
    "prompts",
    "alpha",
    "weights",
    "proportion",
    "top_n",
    "n_ranked",
    "n_selected",
    "jaccard_default",
    "jaccard_same_cut",
    "spearman_default",
    "kendall_default",
    "instruction_len_selected",
    "instruction_len_rejected",
    "response_len_selected",
    "response_len_rejected",
    "spearman_length",
]
STABILITY_COLS = [
    "settings",
    "jaccard_mean",
    "jaccard_min",
    "same_cut_mean",
    "same_cut_min",
    "spearman_mean",
    "spearman_min",
]


# ----------------------------------------------------------------- markdown


def _fmt(x) -> str:
  # 4 digits and blank NaNs keep the wide settings table readable.
  return fmt_value(x, digits=4, nan="").replace("|", "\\|")


def _table(rows: list, cols: list) -> list:
  return md_table(cols, [[_fmt(r[c]) for c in cols] for r in rows])


def _group_stats(rows: list, key: str) -> list:
  groups = {}
  for r in rows:
    groups.setdefault(_fmt(r[key]) if isinstance(r[key], float) else r[key], []).append(r)
  out = []
  for g, rs in groups.items():
    j = np.array([r["jaccard_default"] for r in rs])
    jc = np.array([r["jaccard_same_cut"] for r in rs])
    s = np.array([r["spearman_default"] for r in rs], float)
    out.append(
        {
            key: g,
            "settings": len(rs),
            "jaccard_mean": float(np.mean(j)),
            "jaccard_min": float(np.min(j)),
            "same_cut_mean": float(np.mean(jc)),
            "same_cut_min": float(np.min(jc)),
            "spearman_mean": float(np.nanmean(s)) if np.isfinite(s).any() else float("nan"),
            "spearman_min": float(np.nanmin(s)) if np.isfinite(s).any() else float("nan"),
        }
    )
  return out


def _header(res, dirs, models) -> list:
  d = res.default
  return [
      "# SelectIT sweep",
      "",
      f'Score dirs: {", ".join(dirs)}; models: {", ".join(models)}; '
      f'{res.rows[0]["n_samples"]} samples; {res.timing["settings"]} settings from '
      f'{res.timing["score_vectors"]} score vectors in {res.timing["total_s"]:.2f} s.',
      "",
      f'Default (reference) setting: mode={d["mode"]} level={d["level"]} '
      f'model={d["model"]} prompts={d["prompts"]} alpha={_fmt(d["alpha"])} '
      f'weights={d["weights"] or "-"} proportion={_fmt(d["proportion"])} '
      f'top_n={d["top_n"]}: {d["n_selected"]} of {d["n_ranked"]} ranked selected.',
      "",
      'Lengths are characters of the instruction / response; "rejected" = ranked, '
      "not selected. Kendall tau-b may use a fixed random subsample (see config).",
      "",
  ]


def _missing_section(missing: list) -> list:
  lines = ["## Missing or unusable samples", ""]
  if not missing:
    return lines + ["None: every model has every prompt of every sample.", ""]
  per_model = {}
  for r in missing:
    per_model.setdefault(r["model"], []).append(r)
  for mdl, rs in per_model.items():
    lines.append(
        f"- {mdl}: {len(rs)} samples (first: "
        f'{", ".join(str(r["sample_index"]) for r in rs[:20])}); '
        "settings using this model do not rank them (see missing.jsonl)."
    )
    why = {}
    for r in rs:
      key = r["store_reject"] or (
          "invalid probabilities"
          if not r["missing_prompts"]
          else "no stored row (never scored or text changed)"
      )
      why[key] = why.get(key, 0) + 1
    lines += [f"  - {c} x {w}" for w, c in sorted(why.items(), key=lambda x: -x[1])]
  return lines + [""]


def _stability_sections(rows: list) -> list:
  lines = []
  for key in ("mode", "level", "k", "alpha", "proportion", "weights"):
    stats_rows = _group_stats(rows, key)
    if len(stats_rows) > 1 or key == "mode":
      lines += [f"## Stability by {key}", ""]
      lines += _table(stats_rows, [key] + STABILITY_COLS) + [""]
  return lines


def _prompt_section(prompt_corr: dict) -> list:
  lines = ["## Prompt sensitivity (Spearman of token scores between prompts)", ""]
  for mode, c in prompt_corr.items():
    kk = c.shape[0]
    lines += [f"{mode}:", ""]
    lines += md_table(
        ["prompt"] + [str(i) for i in range(kk)],
        [[str(i)] + [_fmt(float(x)) for x in c[i]] for i in range(kk)],
    )
    lines.append("")
  return lines


def write_markdown(path: str, res, dirs, models, plots, max_rows: int) -> None:
  """sweep.md: the default, missing samples, stability per axis, prompt
  sensitivity, plots and the first max_rows settings; res is a SweepResult."""
  lines = _header(res, dirs, models)
  if res.notes:
    lines += ["## Notes", ""] + [f"- {x}" for x in res.notes] + [""]
  lines += _missing_section(res.missing)
  lines += _stability_sections(res.rows)
  lines += _prompt_section(res.prompt_corr)
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  lines += [f"## All settings ({len(res.rows)}; sweep.parquet has every column)", ""]
  lines += _table(res.rows[:max_rows], TABLE_COLS)
  if len(res.rows) > max_rows:
    lines.append(f"\n({len(res.rows) - max_rows} more rows in sweep.parquet)")
  fileio.write_text(path, "\n".join(lines) + "\n")


# -------------------------------------------------------------------- plots


def _annotate(ax, grid: np.ndarray, **text_kw) -> None:
  """Writes each finite cell's value on a heatmap."""
  for (i, j), v in np.ndenumerate(grid):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, **text_kw)


def _overlap_panels(res, level: str) -> list:
  """Per mode, (mode, alphas, proportions, Jaccard-same-cut grid) over the
  default's other axes; only modes with more than one cell."""
  d = res.default
  panels = []
  for mode in res.distributions:
    rs = [
        r
        for r in res.rows
        if r["mode"] == mode
        and r["level"] == level
        and r["top_n"] == 0
        and r["prompts"] == d["prompts"]
        and r["model"] == (d["model"] if level != "model" else "all")
        and (level != "model" or r["weights"] == d["weights"])
    ]
    alphas = sorted({r["alpha"] for r in rs})
    props = sorted({r["proportion"] for r in rs})
    if len(alphas) * len(props) > 1:
      grid = np.full((len(alphas), len(props)), np.nan)
      for r in rs:
        grid[alphas.index(r["alpha"]), props.index(r["proportion"])] = r["jaccard_same_cut"]
      panels.append((mode, alphas, props, grid))
  return panels


def _plot_overlap(plt, out_dir: str, res) -> list:
  """Overlap heatmap alpha x proportion, per mode; [] when no mode has a grid."""
  d = res.default
  level = d["level"] if d["level"] != "token" else "sentence"
  panels = _overlap_panels(res, level)
  if not panels:
    return []
  fig, axes = plt.subplots(
      1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False, constrained_layout=True
  )
  for ax, (mode, alphas, props, grid) in zip(axes[0], panels):
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(props)), [f"{p:g}" for p in props])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("proportion")
    ax.set_ylabel("alpha")
    ax.set_title(
        f"Jaccard vs default score, same cut: {mode}, {level},\n" f'prompts {d["prompts"]}',
        fontsize=8,
    )
    _annotate(ax, grid, color="w")
  fig.colorbar(im, ax=axes[0].tolist())
  return [save_plot(fig, out_dir, "overlap_alpha_proportion.png")]


def _plot_prompt_sensitivity(plt, out_dir: str, res) -> str:
  """Spearman between the prompts' token scores, per mode."""
  modes = list(res.distributions)
  fig, axes = plt.subplots(
      1, len(modes), figsize=(4.4 * len(modes), 3.8), squeeze=False, constrained_layout=True
  )
  for ax, mode in zip(axes[0], modes):
    c = res.prompt_corr[mode]
    im = ax.imshow(c, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_title(f"token-score Spearman between prompts: {mode}", fontsize=8)
    ax.set_xlabel("prompt")
    ax.set_ylabel("prompt")
    _annotate(ax, c)
  fig.colorbar(im, ax=axes[0].tolist())
  return save_plot(fig, out_dir, "prompt_sensitivity.png")


def _plot_distributions(plt, out_dir: str, res) -> str:
  """Score histograms per mode at the default's level/prompts/alpha."""
  modes = list(res.distributions)
  fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.5), squeeze=False)
  for ax, mode in zip(axes[0], modes):
    score_hist(ax, res.distributions[mode], max_bins=60)
    ax.set_title(f'{mode}: {res.default["level"]} scores', fontsize=9)
  fig.tight_layout()
  return save_plot(fig, out_dir, "score_distributions.png")


def write_plots(out_dir: str, res) -> list:
  """The sweep's PNGs in out_dir; returns their names."""
  plt = pyplot()
  made = _plot_overlap(plt, out_dir, res)
  made.append(_plot_prompt_sensitivity(plt, out_dir, res))
  made.append(_plot_distributions(plt, out_dir, res))
  return made
