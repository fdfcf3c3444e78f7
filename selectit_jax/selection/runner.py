"""Ranking and selection from stored rating probabilities.

Decisions (see also formulas.py):
- Scores are computed in float64 (`jax.enable_x64` around the jnp formulas), so
  exact ties are real ties and match a numpy float64 reference.
- Tie-break. paper mode: higher score first; among equal scores the EARLIER
  sample index first (stable; our choice). code mode: the released order, a
  descending sort on (score, sample index), so the LATER index wins ties.
- Count kept: floor(N * proportion) over the N samples that can be ranked;
  paper mode floors exactly (decimal proportion, so 100 * 0.29 keeps 29), code
  mode uses the released int(N * proportion) (keeps 28 there). top_n > 0
  overrides the proportion.
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
import dataclasses
import fractions
import math
import os
from typing import Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from selectit_jax import fileio
from selectit_jax.selection import formulas
from selectit_jax.data import containers
from selectit_jax.data import records as records_lib
from selectit_jax.selection import report as report_lib
from selectit_jax.scoring import manifest as manifest_lib
from selectit_jax.scoring import store as store_lib

REASON_MISSING = formulas.REASON_MISSING


def num_selected(n: int, proportion: float, top_n: int = 0, mode: str = 'paper') -> int:
  """How many of n rankable samples to keep."""
  if top_n and top_n > 0:
    return min(int(top_n), n)
  if not 0.0 <= proportion <= 1.0:
    raise ValueError(f'proportion must be in [0, 1], got {proportion}')
  if mode == 'code':
    return int(n * proportion)  # released: float product, truncated
  return math.floor(n * fractions.Fraction(repr(float(proportion))))


def rank_order(score: np.ndarray, sample_index: np.ndarray, mode: str = 'paper') -> np.ndarray:
  """Positions of the samples in rank order (best first). Scores must be finite."""
  score = np.asarray(score, np.float64)
  idx = np.asarray(sample_index, np.int64)
  if not np.all(np.isfinite(score)):
    raise ValueError('rank_order got non-finite scores; reject them first')
  if mode == 'code':
    # sorted(zip(score, index), reverse=True): later index first on ties.
    return np.lexsort((-idx, -score))
  if mode == 'paper':
    return np.lexsort((idx, -score))
  raise ValueError(f'unknown mode {mode!r}')


@dataclasses.dataclass
class Loaded:
  """Probabilities of one or more score dirs on one sample axis."""
  probs: np.ndarray          # [N, M, K, 5] float64, NaN where missing
  present: np.ndarray        # [N, M, K] bool: a row is stored for the cell
  sample_index: np.ndarray   # [N]
  sample_id: list
  models: list
  num_params: np.ndarray     # [M]
  store_rejects: list
  notes: list


def _stored_models(man: Optional[manifest_lib.Manifest], table, notes: list, d: str):
  """The manifest's models that the store holds rows of, else every stored model."""
  stored = sorted(set(table.column('model').to_pylist()))
  listed = [key for key in (man.model_keys if man else []) if key in stored]
  if man and len(listed) < len(man.model_keys):
    notes.append(f'{d}: manifest models {man.model_keys} not all among stored models {stored}')
  return listed or stored


def load_scores(scores_dirs: Sequence[str], k: int = 0, samples=None) -> Loaded:
  """Reads each score dir onto one sample axis.

  samples: the input Records (preferred): cells are matched by content hash, so
  samples stored once under a duplicate text, and samples never scored, are
  handled (the latter are missing, hence rejected). Without records the axis is
  the union of stored sample indices.
  """
  parts, notes = [], []
  for d in scores_dirs:
    if not os.path.isdir(os.path.join(d, 'shards')):
      raise FileNotFoundError(f'{d}: not a score dir (no shards/)')
    st = store_lib.ScoreStore(d)
    man = st.read_manifest()
    table = st.read_table()
    if table.num_rows == 0:
      raise ValueError(f'{d}: score store is empty')
    pa_ = store_lib.probs_array(table, models=_stored_models(man, table, notes, d),
                                prompt_hashes=man.prompt_hashes if man else None,
                                samples=samples)
    keys = set(zip(table.column('model').to_pylist(), table.column('prompt_hash').to_pylist(),
                   table.column('content_hash' if samples is not None else 'sample_index')
                   .to_pylist()))
    if samples is not None:
      row_key = [records_lib.content_hash(r) for r in samples]
    else:
      row_key = [int(i) for i in pa_.sample_index]
    present = np.array([[[(mname, ph, rk) in keys for ph in pa_.prompt_hashes]
                         for mname in pa_.models] for rk in row_key], bool)
    present = present.reshape(len(row_key), len(pa_.models), len(pa_.prompt_hashes))
    probs = np.asarray(pa_.probs, np.float64)
    if k:
      if probs.shape[2] < k:
        raise ValueError(f'{d}: k={k} but only {probs.shape[2]} prompts stored')
      probs, present = probs[:, :, :k], present[:, :, :k]
    parts.append(dict(dir=d, probs=probs, present=present,
                      sidx=np.asarray(pa_.sample_index, np.int64), sid=list(pa_.sample_id),
                      models=list(pa_.models), nparams=np.asarray(pa_.num_params, np.int64),
                      rejects=st.read_rejects()))
  ks = {p['probs'].shape[2] for p in parts}
  if len(ks) != 1:
    raise ValueError(f'score dirs have different prompt counts {sorted(ks)}; set config.k')
  kk = ks.pop()
  all_idx = np.unique(np.concatenate([p['sidx'] for p in parts]))
  n = all_idx.size
  m = sum(len(p['models']) for p in parts)
  probs = np.full((n, m, kk, 5), np.nan)
  present = np.zeros((n, m, kk), bool)
  ids = [None] * n
  col = 0
  for p in parts:
    pos = np.searchsorted(all_idx, p['sidx'])
    mm = len(p['models'])
    probs[pos, col:col + mm] = p['probs']
    present[pos, col:col + mm] = p['present']
    for q, i, s in zip(pos, p['sidx'], p['sid']):
      if ids[q] is not None and ids[q] != s:
        raise ValueError(f'sample_index {i}: id {s!r} in {p["dir"]} vs {ids[q]!r}')
      ids[q] = s
    col += mm
  models = [name for p in parts for name in p['models']]
  if len(set(models)) != len(models):
    notes.append(f'model names repeat across score dirs: {models}')
  return Loaded(probs=probs, present=present, sample_index=all_idx, sample_id=ids,
                models=models, num_params=np.concatenate([p['nparams'] for p in parts]),
                store_rejects=[dict(r, scores_dir=p['dir']) for p in parts for r in p['rejects']],
                notes=notes)


def compute_scores(probs: np.ndarray, mode: str, level: str, alpha: float,
                   prompt_index: int, weights) -> dict:
  """formulas.scores in float64, returned as numpy."""
  with jax.enable_x64(True):
    out = formulas.scores(np.asarray(probs, np.float64), mode=mode, level=level,
                          alpha=alpha, prompt_index=prompt_index, weights=weights)
    return {k: np.asarray(v) for k, v in out.items()}


def sample_reasons(loaded: Loaded, level: str, prompt_index: int) -> list:
  """Per sample: '' if rankable, else the first reason found in the cells used."""
  probs, present = loaded.probs, loaded.present
  if level == 'token':
    probs = probs[:, :, prompt_index:prompt_index + 1]
    present = present[:, :, prompt_index:prompt_index + 1]
  cell = formulas.cell_reasons(probs, present)  # [N, M, K]
  several = len(loaded.models) > 1
  # A sample the scorer rejected (e.g. too long) has no rows; say why rather than 'missing'.
  scoring_reasons = {r['index']: r['reason'] for r in loaded.store_rejects}
  out = []
  for i in range(probs.shape[0]):
    reason = ''
    for j, name in enumerate(loaded.models):
      bad = sorted(r for r in cell[i, j] if r)  # 'missing_scores' sorts first
      reason = bad[0] if bad else ''
      why = scoring_reasons.get(int(loaded.sample_index[i]))
      if reason == REASON_MISSING and why:
        reason = f'{REASON_MISSING} (rejected while scoring: {why})'
      if reason:
        reason = f'{reason}:{name}' if several else reason
        break
    out.append(reason)
  return out


def _data_config(manifests: list, notes: list) -> Optional[dict]:
  """The scored input's data config (turn policy, the records the runs covered...), so
  texts and content hashes are read exactly as they were scored."""
  datas = [m.data_config() for m in manifests if m is not None]
  if any(d != datas[0] for d in datas[1:]):
    notes.append(f'score dirs name different input data; using the first: {datas[0]}')
  if not datas or not (datas[0].get('path') or str(datas[0].get('format')).startswith('tfds:')):
    return None
  return datas[0]


def load_input_records(scores_dirs: Sequence[str], notes: list):
  """The scored input records by index, re-read as the scoring run read them, and their
  container (json, jsonl, parquet, tfds); (None, None) with a note when unavailable."""
  manifests = [manifest_lib.read(d) if os.path.isdir(d) else None for d in scores_dirs]
  data = _data_config(manifests, notes)
  if data is None:
    notes.append('manifest names no input data; selected records and lengths unavailable')
    return None, None
  if not str(data['format']).startswith('tfds:') and not os.path.isfile(data['path']):
    notes.append(f"input data {data['path']} not found; samples aligned by stored "
                 'sample_index, selected records and lengths unavailable')
    return None, None
  rec_list, _, info = records_lib.read_records(ml_collections.ConfigDict(data))
  return {r.index: r for r in rec_list}, info.container


def scores_dirs_of(config) -> list:
  """config.scores_dir (comma-separated) as a list; checks the output dir is set."""
  dirs = [d.strip() for d in str(config.scores_dir).split(',') if d.strip()]
  if not dirs:
    raise ValueError('config.scores_dir is required')
  if not config.output_dir:
    raise ValueError('config.output_dir is required')
  return dirs


def _finite(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def _selected_path(out_dir: str, container: str) -> tuple:
  """(path, write_records fmt): selected records keep the input's container."""
  fmt = 'jsonl' if container == 'tfds' else container
  return os.path.join(out_dir, f'selected.{fmt}'), fmt


def run_selection(config) -> dict:
  """Reads score dirs, ranks, writes selected records, scores.jsonl and report.md."""
  dirs = scores_dirs_of(config)
  mode, level = config.mode, config.level
  if mode not in formulas.MODES or level not in formulas.LEVELS:
    raise ValueError(f'bad mode/level {mode!r}/{level!r}')
  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)

  notes = []
  recs, container = load_input_records(dirs, notes)
  loaded = load_scores(dirs, k=int(config.k),
                       samples=None if recs is None else list(recs.values()))
  notes += loaded.notes
  n, m, k, _ = loaded.probs.shape
  if level != 'model' and m != 1:
    raise ValueError(f"level={level!r} needs one model, got {m} ({loaded.models}); "
                     "use level='model'")
  weights = formulas.resolve_weights(config.weights, loaded.num_params)
  if mode == 'paper' and str(config.weights).strip() and level == 'model':
    notes.append(f'explicit model weights {config.weights!r} (Eq. 5 uses theta)')
  reasons = sample_reasons(loaded, level, int(config.prompt_index))

  sc = compute_scores(loaded.probs, mode, level, float(config.alpha),
                      int(config.prompt_index), weights)
  valid = np.array([not r for r in reasons], bool)
  score = np.where(valid, sc['score'], np.nan)
  pos_valid = np.nonzero(valid)[0]
  order = pos_valid[rank_order(score[pos_valid], loaded.sample_index[pos_valid], mode)]
  n_keep = num_selected(int(valid.sum()), float(config.proportion), int(config.top_n), mode)
  rank = np.full(n, -1, np.int64)
  rank[order] = np.arange(order.size)
  selected = np.zeros(n, bool)
  selected[order[:n_keep]] = True

  sel_rejects = [{'index': int(loaded.sample_index[i]), 'id': loaded.sample_id[i],
                  'reason': reasons[i]} for i in range(n) if reasons[i]]
  records_lib.write_rejects(os.path.join(out_dir, 'selection_rejects.jsonl'),
                            [records_lib.Reject(**r) for r in sel_rejects])

  outputs = {}
  scores_path = os.path.join(out_dir, 'scores.jsonl')
  score_rows = []
  for i in list(order) + [i for i in range(n) if not valid[i]]:
    tok = sc['token'][i]
    row = {'sample_id': loaded.sample_id[i], 'sample_index': int(loaded.sample_index[i])}
    if m == 1:
      row['token_scores'] = [_finite(x) for x in tok[0]]
      row['sentence_score'] = _finite(sc['sentence'][i, 0])
    else:
      row['token_scores'] = {name: [_finite(x) for x in tok[j]]
                             for j, name in enumerate(loaded.models)}
      row['sentence_score'] = {name: _finite(sc['sentence'][i, j])
                               for j, name in enumerate(loaded.models)}
    if 'model' in sc:
      row['model_score'] = _finite(sc['model'][i])
    row['score'] = _finite(score[i])
    row['rank'] = int(rank[i]) if valid[i] else None
    row['selected'] = bool(selected[i])
    if not valid[i]:
      row['reject_reason'] = reasons[i]
    score_rows.append(row)
  fileio.write_jsonl(scores_path, score_rows)
  outputs['scores'] = scores_path

  instruction = response = None
  if recs is not None:
    chosen = [recs[int(loaded.sample_index[i])] for i in order[:n_keep]]
    sel_path, wfmt = _selected_path(out_dir, container)
    containers.write_records(sel_path, chosen, wfmt)
    outputs['selected'] = sel_path
    instruction = [recs[int(x)].instruction if int(x) in recs else '' for x in loaded.sample_index]
    response = [recs[int(x)].response if int(x) in recs else '' for x in loaded.sample_index]

  params = {'scores_dir': ','.join(dirs), 'mode': mode, 'level': level,
            'alpha': float(config.alpha), 'prompt_index': int(config.prompt_index),
            'k': k, 'proportion': float(config.proportion), 'top_n': int(config.top_n),
            'weights': [float(w) for w in weights], 'models': loaded.models,
            'num_params': [int(x) for x in loaded.num_params], 'num_selected': int(n_keep),
            'data_container': container}
  summary = dict(params, num_samples=n, num_ranked=int(valid.sum()),
                 num_selection_rejects=len(sel_rejects),
                 num_store_rejects=len(loaded.store_rejects), outputs=outputs, notes=notes)
  fileio.write_json(os.path.join(out_dir, 'summary.json'), summary)

  rep = report_lib.ReportData(
      params=params, score=score, sample_index=loaded.sample_index,
      sample_id=loaded.sample_id, rank=rank, selected=selected,
      digit_mass=np.sum(loaded.probs, axis=-1), models=loaded.models,
      store_rejects=loaded.store_rejects, selection_rejects=sel_rejects,
      instruction=instruction, response=response, notes=notes, outputs=outputs)
  summary['report'] = report_lib.write_report(out_dir, rep)
  logging.info('selected %d of %d ranked (%d samples, %d rejected) -> %s',
               n_keep, valid.sum(), n, len(sel_rejects), out_dir)
  return summary
