"""`select`: score dirs -> ranking -> selected records, scores.jsonl, summary.json and a report."""

import dataclasses
import math
import os
from typing import Optional

from absl import logging
import numpy as np

from selectit_jax import fileio
from selectit_jax.data import containers
from selectit_jax.data import records as records_lib
from selectit_jax.scoring import manifest as manifest_lib
from selectit_jax.selection import formulas
from selectit_jax.selection import inputs
from selectit_jax.selection import ranking
from selectit_jax.selection import raters as raters_lib
from selectit_jax.selection import report as report_lib


def _finite(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def selected_path(out_dir: str, container: str) -> tuple:
  """(path, write_records fmt): selected records keep the input's container."""
  fmt = "jsonl" if container == "tfds" else container
  return os.path.join(out_dir, f"selected.{fmt}"), fmt


@dataclasses.dataclass
class Ranked:
  """A selection's ranking over the loaded samples (positions on the sample axis)."""

  scores: dict  # formulas.scores: 'token', 'sentence', ['model'], 'score'
  score: np.ndarray  # [N] the ranked score, NaN where not rankable
  reasons: list  # [N] '' or why a sample cannot be ranked
  order: np.ndarray  # rankable positions, best first
  num_kept: int
  num_counted: int = 0  # N of floor(N * proportion) (config.count_from)
  tie: tuple = (0, 0)  # (kept, dropped) samples tied at the cut score (ranking.tie_at_cut)

  @property
  def valid(self) -> np.ndarray:
    return np.array([not r for r in self.reasons], bool)

  @property
  def rank(self) -> np.ndarray:
    rank = np.full(len(self.reasons), -1, np.int64)
    rank[self.order] = np.arange(self.order.size)
    return rank

  @property
  def selected(self) -> np.ndarray:
    selected = np.zeros(len(self.reasons), bool)
    selected[self.order[: self.num_kept]] = True
    return selected


def rank_samples(loaded: inputs.Loaded, config, weights) -> Ranked:
  """Scores every sample at the config's level and ranks the valid ones."""
  mode = config.mode
  reasons = ranking.sample_reasons(loaded, config.level, int(config.prompt_index))
  sc = ranking.compute_scores(
      loaded.probs, mode, config.level, float(config.alpha), int(config.prompt_index), weights
  )
  valid = np.array([not r for r in reasons], bool)
  score = np.where(valid, sc["score"], np.nan)
  pos_valid = np.nonzero(valid)[0]
  order = pos_valid[ranking.rank_order(score[pos_valid], loaded.sample_index[pos_valid], mode)]
  counted = ranking.count_base(int(valid.sum()), len(reasons), config.get("count_from", "rankable"))
  kept = min(
      ranking.num_selected(counted, float(config.proportion), int(config.top_n), mode),
      int(valid.sum()),
  )
  return Ranked(sc, score, reasons, order, kept, counted, ranking.tie_at_cut(score[order], kept))


def score_rows(loaded: inputs.Loaded, ranked: Ranked) -> list[dict]:
  """scores.jsonl: ranked samples in rank order, then the rejected ones."""
  valid, rank, selected, sc = ranked.valid, ranked.rank, ranked.selected, ranked.scores
  single = len(loaded.models) == 1
  rows = []
  for i in list(ranked.order) + [i for i in range(len(valid)) if not valid[i]]:
    tok = sc["token"][i]
    row = {"sample_id": loaded.sample_id[i], "sample_index": int(loaded.sample_index[i])}
    if single:
      row["token_scores"] = [_finite(x) for x in tok[0]]
      row["sentence_score"] = _finite(sc["sentence"][i, 0])
    else:
      row["token_scores"] = {
          name: [_finite(x) for x in tok[j]] for j, name in enumerate(loaded.models)
      }
      row["sentence_score"] = {
          name: _finite(sc["sentence"][i, j]) for j, name in enumerate(loaded.models)
      }
    if "model" in sc:
      row["model_score"] = _finite(sc["model"][i])
    row["score"] = _finite(ranked.score[i])
    row["rank"] = int(rank[i]) if valid[i] else None
    row["selected"] = bool(selected[i])
    row["truncated"] = bool(loaded.truncated[i])
    if not valid[i]:
      row["reject_reason"] = ranked.reasons[i]
    rows.append(row)
  return rows


def _load(config, dirs: list, notes: list):
  """(input records by index or None, their container, Loaded) for the config."""
  recs, container = inputs.load_input_records(dirs, notes)
  loaded = inputs.load_scores(
      dirs, k=int(config.k), samples=None if recs is None else list(recs.values())
  )
  notes += loaded.notes
  m = len(loaded.models)
  if config.level != "model" and m != 1:
    raise ValueError(
        f"level={config.level!r} needs one model, got {m} ({loaded.models}); " "use level='model'"
    )
  return recs, container, loaded


def coverage(loaded: inputs.Loaded) -> dict:
  """How many samples have all K x M cells stored, and how many lack cells the scorer did
  not reject them for (a partial store: an interrupted or narrower run)."""
  complete = loaded.present.all(axis=(1, 2))
  rejected = {r["index"] for r in loaded.store_rejects}
  unexplained = [
      int(i) for i, ok in zip(loaded.sample_index, complete) if not ok and int(i) not in rejected
  ]
  return {
      "samples": int(complete.size),
      "complete": int(complete.sum()),
      "models": len(loaded.models),
      "prompts": int(loaded.present.shape[2]),
      "missing_unexplained": len(unexplained),
      "first_missing": unexplained[:5],
  }


def turn_policy_notes(dirs) -> list[str]:
  """Per score dir, how many of the records its widest run read each turn policy accepts."""
  out = []
  for d in dirs:
    m = manifest_lib.read(d)
    runs = [r for r in (m.runs if m else []) if r.turn_counts]
    if runs:
      run = max(runs, key=lambda r: r.num_read)
      counts = ", ".join(f"{k} {v}" for k, v in run.turn_counts.items())
      out.append(
          f"turn policies over the {run.num_read} records read: {counts} "
          f"(scored with data.turns={m.data.get('turns', 'first')})"
      )
  return out


def check_coverage(cov: dict, allow_partial: bool, notes: list) -> None:
  if not cov["missing_unexplained"]:
    return
  msg = (
      f"the scores cover {cov['complete']} of {cov['samples']} input records with all "
      f"{cov['prompts']} prompts x {cov['models']} models; {cov['missing_unexplained']} "
      f"lack rows the scorer did not reject them for (sample indices "
      f"{cov['first_missing']}...)"
  )
  if not allow_partial:
    raise ValueError(msg + ": finish scoring (score resumes) or set --config.allow_partial")
  notes.append(msg + "; ranked without them (allow_partial)")
  logging.warning("%s", msg)


def run(config) -> dict:
  """Reads score dirs, ranks, writes selected records, scores.jsonl and report.md."""
  dirs = inputs.scores_dirs_of(config)
  mode, level = config.mode, config.level
  if mode not in formulas.MODES or level not in formulas.LEVELS:
    raise ValueError(f"bad mode/level {mode!r}/{level!r}")
  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  notes = []
  recs, container, loaded = _load(config, dirs, notes)
  cov = coverage(loaded)
  notes.append(
      f"coverage: {cov['complete']} of {cov['samples']} input records have all "
      f"{cov['prompts']} prompts x {cov['models']} models stored"
  )
  check_coverage(cov, bool(config.get("allow_partial", False)), notes)
  notes += turn_policy_notes(dirs)
  weights = formulas.resolve_weights(config.weights, loaded.num_params)
  if mode == "paper" and str(config.weights).strip() and level == "model":
    notes.append(f"explicit model weights {config.weights!r} (Eq. 5 uses theta)")
  ranked = rank_samples(loaded, config, weights)
  n = len(ranked.reasons)
  # Eq. 5 mixes raters; how far they agree alone says what the mix is worth.
  rater = None
  if level == "model" and len(loaded.models) >= 2:
    rater = raters_lib.rater_stats(loaded, ranked.scores["sentence"], config)
  warnings = []
  tied_kept, tied_dropped = ranked.tie
  if tied_kept:
    cut = ranked.score[ranked.order[ranked.num_kept]]
    warnings.append(
        f"the cut falls inside a group of {tied_kept + tied_dropped} samples with "
        f"equal score {cut:.6g}: {tied_kept} kept, {tied_dropped} dropped by the "
        f"tie-break alone ({mode} mode)"
    )
    logging.warning("%s", warnings[-1])

  sel_rejects = [
      {"index": int(loaded.sample_index[i]), "id": loaded.sample_id[i], "reason": ranked.reasons[i]}
      for i in range(n)
      if ranked.reasons[i]
  ]
  records_lib.write_rejects(
      os.path.join(out_dir, "selection_rejects.jsonl"),
      [records_lib.Reject(**r) for r in sel_rejects],
  )
  outputs = {
      "scores": fileio.write_jsonl(
          os.path.join(out_dir, "scores.jsonl"), score_rows(loaded, ranked)
      )
  }
  instruction = response = None
  if recs is not None:
    chosen = [recs[int(loaded.sample_index[i])] for i in ranked.order[: ranked.num_kept]]
    sel_path, wfmt = selected_path(out_dir, container)
    containers.write_records(sel_path, chosen, wfmt)
    outputs["selected"] = sel_path
    instruction = [recs[int(x)].instruction if int(x) in recs else "" for x in loaded.sample_index]
    response = [recs[int(x)].response if int(x) in recs else "" for x in loaded.sample_index]

  params = {
      "scores_dir": ",".join(dirs),
      "mode": mode,
      "level": level,
      "alpha": float(config.alpha),
      "prompt_index": int(config.prompt_index),
      "k": int(loaded.probs.shape[2]),
      "proportion": float(config.proportion),
      "top_n": int(config.top_n),
      "count_from": config.get("count_from", "rankable"),
      "weights": [float(w) for w in weights],
      "models": loaded.models,
      "num_params": [int(x) for x in loaded.num_params],
      "num_selected": int(ranked.num_kept),
      "data_container": container,
  }
  summary = dict(
      params,
      num_samples=n,
      num_ranked=int(ranked.valid.sum()),
      coverage=cov,
      num_counted=ranked.num_counted,
      num_selection_rejects=len(sel_rejects),
      num_store_rejects=len(loaded.store_rejects),
      num_truncated=int(loaded.truncated.sum()),
      num_selected_truncated=int((loaded.truncated & ranked.selected).sum()),
      num_tied_at_cut=tied_kept + tied_dropped,
      num_tied_dropped=tied_dropped,
      outputs=outputs,
      notes=notes,
      warnings=warnings,
  )
  if rater is not None:
    summary.update(rater)
  fileio.write_json(os.path.join(out_dir, "summary.json"), summary)

  rep = report_lib.ReportData(
      params=params,
      score=ranked.score,
      sample_index=loaded.sample_index,
      sample_id=loaded.sample_id,
      rank=ranked.rank,
      selected=ranked.selected,
      digit_mass=np.sum(loaded.probs, axis=-1),
      models=loaded.models,
      store_rejects=loaded.store_rejects,
      selection_rejects=sel_rejects,
      instruction=instruction,
      response=response,
      notes=notes,
      outputs=outputs,
      truncated=loaded.truncated,
      num_counted=ranked.num_counted,
      warnings=warnings,
      raters=rater,
  )
  summary["report"] = report_lib.write_report(out_dir, rep)
  logging.info(
      "selected %d of %d ranked (%d samples, %d rejected) -> %s",
      ranked.num_kept,
      ranked.valid.sum(),
      n,
      len(sel_rejects),
      out_dir,
  )
  return summary
