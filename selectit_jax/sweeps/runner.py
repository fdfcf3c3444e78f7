"""Sweeps over selection settings from stored probabilities (no model).

A setting is a score vector (mode, level, model, prompt subset, alpha, model
weights) plus a cut (proportion or top_n); grid.py builds them. Score vectors
are computed in blocks with the formulas.py functions broadcast over alphas and
vmapped over weight vectors, in float64 (as selection does), so each setting's
selection is the one selectit_jax.select writes. The blocks run as eager jnp
ops, not under jit: eager results are bit-identical to selection's scores, while
a jit'd block fuses mean/std differently (1-ulp differences that could reorder
near-ties); the price is a few seconds of per-shape op compilation once. Same
validity rules (ranking.sample_reasons' cells), same rank_order tie-break,
same num_selected. The cut is applied to a vector's ranking with cumulative
sums, so proportions cost O(1) each.

Every setting is compared with the default setting (config.default); the
columns are described in metrics.py. Samples a setting cannot rank (missing
cells, e.g. a sample one model never scored, or bad probabilities) count in
n_unranked; they are listed per model in missing.jsonl and the report, never
dropped silently.
"""

import dataclasses
import os
import time
from typing import Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from selectit_jax import fileio
from selectit_jax.selection import formulas
from selectit_jax.selection import inputs as selection_inputs
from selectit_jax.selection import ranking
from selectit_jax.sweeps import grid
from selectit_jax.sweeps import metrics
from selectit_jax.sweeps import report
from selectit_jax.sweeps.grid import ScoreSpec

# ---------------------------------------------------------------- loading


@dataclasses.dataclass
class Inputs:
  loaded: selection_inputs.Loaded
  ins_len: np.ndarray  # [N] characters, NaN without records
  res_len: np.ndarray
  bad: np.ndarray  # [N, M, K] cell cannot be used (missing or invalid)
  notes: list


def load_inputs(scores_dirs: Sequence[str], k: int = 0) -> Inputs:
  """Score dirs on one sample axis, with the records re-read as select does."""
  notes = []
  recs, _ = selection_inputs.load_input_records(scores_dirs, notes)
  loaded = selection_inputs.load_scores(
      scores_dirs, k=k, samples=None if recs is None else list(recs.values())
  )
  notes += loaded.notes
  n = loaded.sample_index.size
  ins_len = np.full(n, np.nan)
  res_len = np.full(n, np.nan)
  if recs is not None:
    for i, x in enumerate(loaded.sample_index):
      r = recs.get(int(x))
      if r is not None:
        ins_len[i], res_len[i] = len(r.instruction), len(r.response)
  with jax.enable_x64(True):
    bad = formulas.cell_reasons(loaded.probs, loaded.present) != ""
  return Inputs(loaded, ins_len, res_len, bad, notes)


def missing_report(inputs: Inputs) -> list:
  """One row per (sample, model) with a missing or unusable cell."""
  ld = inputs.loaded
  why = {}
  for r in ld.store_rejects:
    why.setdefault(r.get("index"), r.get("reason"))
  rows = []
  for i, j in np.argwhere(inputs.bad.any(axis=2)):
    miss = np.nonzero(~ld.present[i, j])[0].tolist()
    rows.append(
        {
            "sample_index": int(ld.sample_index[i]),
            "sample_id": ld.sample_id[i],
            "model": ld.models[j],
            "missing_prompts": miss,
            "invalid_prompts": np.nonzero(inputs.bad[i, j] & ld.present[i, j])[0].tolist(),
            "store_reject": why.get(int(ld.sample_index[i])),
        }
    )
  return rows


# ------------------------------------------------------------ score blocks


def _sentence_block(tok, idx, alphas):
  """tok [N, M, K], idx [S, k], alphas [A] -> [A, N, M, S] (Eq. 4, broadcast)."""
  return formulas.sentence_scores(tok[:, :, idx], alphas[:, None, None, None])


def _model_block(sent, weights):
  """sent [A, N, M, S], weights [W, M] -> [W, A, N, S] (Eq. 5, vmapped over weights)."""
  return jax.vmap(formulas.model_scores, in_axes=(None, 0))(jnp.moveaxis(sent, 2, -1), weights)


def iter_scores(
    inputs: Inputs, specs: Sequence[ScoreSpec], weights: dict, block_elements: int = 1 << 24
):
  """Yields (spec, score [N] float64, valid [N] bool) for every spec, block by block.

  Token scores are computed once per mode; sentence and model scores for all
  alphas (and weight vectors) of a group of equal-size prompt subsets at once.
  """
  ld = inputs.loaded
  n, m, k, _ = ld.probs.shape
  mpos = {name: j for j, name in enumerate(ld.models)}
  by_mode = {}
  for s in specs:
    by_mode.setdefault(s.mode, []).append(s)
  with jax.enable_x64(True):
    for mode, mspecs in by_mode.items():
      tok = formulas.token_scores(jnp.asarray(ld.probs, jnp.float64), mode)  # [N, M, K]
      tok_np = None
      groups = {}
      for s in mspecs:
        if s.level == "token":
          if tok_np is None:
            tok_np = np.asarray(tok)
          j = mpos[s.model]
          yield s, tok_np[:, j, s.prompts[0]], _valid(inputs, [j], s.prompts)
        else:
          groups.setdefault((s.level, len(s.prompts)), []).append(s)
      for (level, _), gspecs in groups.items():
        subsets = list(dict.fromkeys(s.prompts for s in gspecs))
        alphas = list(dict.fromkeys(s.alpha for s in gspecs))
        wl = list(dict.fromkeys(s.weights for s in gspecs)) if level == "model" else []
        want = set(gspecs)
        # Blocks over subsets and alphas keep A * N * M * S floats under the cap.
        per_sub = max(1, n * m * max(1, len(wl)))
        s_chunk = max(1, min(len(subsets), block_elements // per_sub))
        a_chunk = max(1, min(len(alphas), block_elements // (per_sub * s_chunk)))
        for s0 in range(0, len(subsets), s_chunk):
          subs = subsets[s0 : s0 + s_chunk]
          idx = jnp.asarray(np.array(subs, np.int64))
          for a0 in range(0, len(alphas), a_chunk):
            al = alphas[a0 : a0 + a_chunk]
            sent = _sentence_block(tok, idx, jnp.asarray(al, jnp.float64))
            if level == "sentence":
              block = np.asarray(sent)  # [A, N, M, S]
              for ai, a in enumerate(al):
                for si, sub in enumerate(subs):
                  for mdl, j in mpos.items():
                    spec = ScoreSpec(mode, level, mdl, sub, a, "")
                    if spec in want:
                      yield spec, block[ai, :, j, si], _valid(inputs, [j], sub)
            else:
              w = jnp.asarray(np.stack([weights[x] for x in wl]), jnp.float64)
              block = np.asarray(_model_block(sent, w))  # [W, A, N, S]
              for wi, wlab in enumerate(wl):
                for ai, a in enumerate(al):
                  for si, sub in enumerate(subs):
                    spec = ScoreSpec(mode, level, "all", sub, a, wlab)
                    if spec in want:
                      yield spec, block[wi, ai, :, si], _valid(inputs, list(range(m)), sub)


def _valid(inputs: Inputs, model_pos: list, prompts: tuple) -> np.ndarray:
  """The cells select checks for this level (ranking.sample_reasons) are all usable."""
  return ~inputs.bad[:, model_pos][:, :, list(prompts)].any(axis=(1, 2))


def one_score(inputs: Inputs, spec: ScoreSpec, weights: dict) -> tuple:
  """(score [N], valid [N]) of one spec."""
  ((_, score, valid),) = iter_scores(inputs, [spec], weights)
  return score, valid


# ---------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepResult:
  rows: list  # one dict per setting
  default: dict  # the reference setting's description
  prompt_corr: dict  # mode -> [K, K] Spearman of token scores across prompts
  distributions: dict  # mode -> default-level scores (valid samples)
  missing: list
  notes: list
  timing: dict
  selections: Optional[dict] = None  # setting_id -> selected sample indices, rank order


def _spec_dict(s: ScoreSpec, weights: dict) -> dict:
  return {
      "mode": s.mode,
      "level": s.level,
      "model": s.model,
      "prompts": grid.subset_label(s.prompts),
      "k": len(s.prompts),
      "prompt_index": s.prompts[0] if s.level == "token" else -1,
      "alpha": s.alpha,
      "weights": s.weights,
      "weight_values": ",".join(f"{x:.6g}" for x in weights[s.weights]) if s.weights else "",
  }


def _weights_of(specs: Sequence[ScoreSpec], dspec: ScoreSpec, ld) -> dict:
  """label -> model weight vector, for the labels the grid and the default use."""
  wlabels = {s.weights for s in specs if s.weights} | ({dspec.weights} - {""})
  weights = dict(grid.parse_weights(";".join(sorted(wlabels)), ld.num_params)) if wlabels else {}
  if len(ld.models) > 1 and "theta" in weights and not np.all(ld.num_params > 0):
    raise ValueError(f"theta weights need num_params > 0, got {ld.num_params}")
  return weights


def _reference(
    inputs: Inputs, dspec: ScoreSpec, dcut: grid.Cut, weights: dict, seed: int
) -> metrics.Reference:
  """The default setting's score, ranking and selection."""
  ld = inputs.loaded
  n = ld.probs.shape[0]
  dscore, dvalid = one_score(inputs, dspec, weights)
  dorder = metrics.ranking(dscore, dvalid, ld.sample_index, dspec.mode)
  dkeep = ranking.num_selected(
      dorder.size, 0.0 if dcut.top_n else dcut.proportion, dcut.top_n, dspec.mode
  )
  dsel = np.zeros(n, bool)
  dsel[dorder[:dkeep]] = True
  perm = np.random.default_rng(seed).permutation(n)
  return metrics.Reference(
      dscore, dvalid, dorder, dsel, dspec.mode, perm, inputs.ins_len + inputs.res_len
  )


def _is_default_vector(spec: ScoreSpec, dspec: ScoreSpec) -> bool:
  """spec is the default's score vector up to the mode."""
  return (
      spec.level == dspec.level
      and spec.model == dspec.model
      and spec.prompts == dspec.prompts
      and spec.weights == dspec.weights
      and (spec.level == "token" or spec.alpha == dspec.alpha)
  )


def _setting_rows(
    inputs: Inputs, specs, cuts, weights: dict, ref: metrics.Reference, dspec: ScoreSpec, config
) -> tuple:
  """(rows, selections, distributions, timing): one row per score vector x cut;
  selections only with config.write_selections; distributions = the scores of
  the default's vector per mode that the grid holds."""
  ld = inputs.loaded
  n = ld.probs.shape[0]
  rows, selections = [], ({} if config.write_selections else None)
  dists = {}
  t_scores = t_rank = t_metric = 0.0
  ts = time.time()
  for spec, score, valid in iter_scores(inputs, specs, weights, int(config.block_elements)):
    t1 = time.time()
    t_scores += t1 - ts
    order = metrics.ranking(score, valid, ld.sample_index, spec.mode)
    t2 = time.time()
    vm = metrics.vector_metrics(score, valid, ref, int(config.kendall_max_samples))
    cm = metrics.cut_metrics(order, cuts, spec.mode, ref, inputs.ins_len, inputs.res_len)
    base = _spec_dict(spec, weights)
    for c, row in zip(cuts, cm):
      sid = len(rows)
      rows.append(
          dict(
              setting_id=sid,
              **base,
              proportion=c.proportion,
              top_n=c.top_n,
              n_samples=n,
              n_ranked=int(order.size),
              n_unranked=int(n - order.size),
              **row,
              **vm,
              score_mean=float(np.mean(score[valid])) if order.size else float("nan"),
              score_std=float(np.std(score[valid])) if order.size else float("nan"),
          )
      )
      if selections is not None:
        selections[sid] = ld.sample_index[order[: row["n_selected"]]].tolist()
    if _is_default_vector(spec, dspec):
      dists[spec.mode] = score[valid]
    ts = time.time()
    t_rank += t2 - t1
    t_metric += ts - t2
  timing = {"scores_s": t_scores, "rank_s": t_rank, "metrics_s": t_metric}
  return rows, selections, dists, timing


def _prompt_corr(inputs: Inputs, dspec: ScoreSpec, modes: Sequence[str]) -> dict:
  """mode -> [K, K] Spearman between prompts' token scores of the default's
  model (the first model at model level), on samples with every prompt usable."""
  ld = inputs.loaded
  jdef = ld.models.index(dspec.model) if dspec.model in ld.models else 0
  allv = ~inputs.bad[:, jdef].any(axis=1)
  out = {}
  with jax.enable_x64(True):
    for mode in modes:
      tok = np.asarray(formulas.token_scores(ld.probs[:, jdef], mode))[allv]  # [n, K]
      out[mode] = metrics.prompt_spearman(tok)
  return out


def sweep(inputs: Inputs, config) -> SweepResult:
  """Runs the grid of config over loaded inputs."""
  t0 = time.time()
  ld = inputs.loaded
  m, k = ld.probs.shape[1:3]
  if len(set(ld.models)) != m:
    raise ValueError(
        f"model names repeat across score dirs {ld.models}: settings are keyed "
        "by model name, so each dir must hold a different model"
    )
  specs, cuts = grid.build_grid(config, ld.models, k)
  dspec, dcut = grid.default_setting(config.default, ld.models, k)
  weights = _weights_of(specs, dspec, ld)
  ref = _reference(inputs, dspec, dcut, weights, int(config.seed))
  t_default = time.time()

  rows, selections, dists, t_loop = _setting_rows(inputs, specs, cuts, weights, ref, dspec, config)
  modes = grid.parse_list(config.modes, str)
  for mode in modes:
    if mode not in dists:  # the default's level/prompts under this mode
      s, v = one_score(inputs, dataclasses.replace(dspec, mode=mode), weights)
      dists[mode] = s[v]
  prompt_corr = _prompt_corr(inputs, dspec, modes)
  default = dict(
      _spec_dict(dspec, weights),
      proportion=dcut.proportion,
      top_n=dcut.top_n,
      n_selected=int(ref.selected.sum()),
      n_ranked=int(ref.n_ranked),
  )
  timing = {
      "default_s": t_default - t0,
      **t_loop,
      "total_s": time.time() - t0,
      "settings": len(rows),
      "score_vectors": len(specs),
  }
  return SweepResult(
      rows,
      default,
      prompt_corr,
      dists,
      missing_report(inputs),
      list(inputs.notes),
      timing,
      selections,
  )


# ------------------------------------------------------------------ outputs


def write_parquet(path: str, rows: list) -> None:
  cols = {key: [r[key] for r in rows] for key in rows[0]}
  fileio.write_parquet(path, pa.Table.from_pydict(cols))


def _write_selections(path: str, selections: dict) -> None:
  ids = sorted(selections)
  fileio.write_parquet(
      path,
      pa.Table.from_pydict(
          {"setting_id": ids, "selected_sample_index": [selections[i] for i in ids]}
      ),
  )


def run(config) -> dict:
  """Loads score dirs, sweeps the grid, writes sweep.parquet, sweep.md, plots."""
  dirs = selection_inputs.scores_dirs_of(config)
  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  inputs = load_inputs(dirs, k=int(config.k))
  t_load = time.time() - t0
  res = sweep(inputs, config)
  res.timing["load_s"] = t_load
  outputs = {
      "parquet": os.path.join(out_dir, "sweep.parquet"),
      "markdown": os.path.join(out_dir, "sweep.md"),
      "missing": os.path.join(out_dir, "missing.jsonl"),
  }
  write_parquet(outputs["parquet"], res.rows)
  fileio.write_jsonl(outputs["missing"], res.missing)
  if res.selections is not None:
    outputs["selections"] = os.path.join(out_dir, "selections.parquet")
    _write_selections(outputs["selections"], res.selections)
  plots = report.write_plots(out_dir, res) if config.plots else []
  report.write_markdown(
      outputs["markdown"], res, dirs, inputs.loaded.models, plots, int(config.max_table_rows)
  )
  res.timing["written_s"] = time.time() - t0
  summary = {
      "scores_dir": dirs,
      "models": inputs.loaded.models,
      "num_samples": int(inputs.loaded.sample_index.size),
      "num_prompts": int(inputs.loaded.probs.shape[2]),
      "default": res.default,
      "timing": res.timing,
      "notes": res.notes,
      "num_missing": len(res.missing),
      "outputs": outputs,
      "plots": plots,
  }
  fileio.write_json(os.path.join(out_dir, "summary.json"), summary, default=float)
  logging.info(
      "%d settings (%d score vectors) over %d samples in %.2f s -> %s",
      res.timing["settings"],
      res.timing["score_vectors"],
      inputs.loaded.sample_index.size,
      res.timing["written_s"],
      out_dir,
  )
  return summary
