"""Sweeps over selection settings from stored probabilities (no model).

A setting is a score vector (mode, level, model, prompt subset, alpha, model
weights) plus a cut (proportion or top_n). Score vectors are computed in
blocks with the formulas.py functions broadcast over alphas and vmapped over
weight vectors, in float64 (as selection.py), so each setting's selection is
the one selectit_jax.select writes. The blocks run as eager jnp ops, not
under jit: eager results are bit-identical to selection's scores, while a jit'd
block fuses mean/std differently (1-ulp differences that could reorder
near-ties); the price is a few seconds of per-shape op compilation once. Same
validity rules (selection.sample_reasons'
cells), same rank_order tie-break, same num_selected. The cut is applied to a
vector's ranking with cumulative sums, so proportions cost O(1) each.

Metrics per setting (all against the default setting, config.default):
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
Samples a setting cannot rank (missing cells, e.g. a sample one model never
scored, or bad probabilities) count in n_unranked; they are listed per model
in missing.jsonl and the report, never dropped silently.
"""
import dataclasses
import itertools
import math
import os
import time
from typing import Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from scipy import stats

from selectit_jax import fileio
from selectit_jax.selection import formulas
from selectit_jax.selection import runner as selection

NO_ALPHA = float('nan')


# ------------------------------------------------------------------ parsing

def _list(v, conv, sep=',') -> list:
  if v is None:
    return []
  if isinstance(v, (list, tuple)):
    return [conv(x) for x in v]
  if isinstance(v, (int, float)):
    return [conv(v)]
  return [conv(x.strip()) for x in str(v).split(sep) if x.strip()]


def parse_prompt_subsets(spec, k: int) -> list:
  """Prompt-index tuples from 'all' | 'first' (k = 1..K) | 'first:1,2' | 'all_k:3' |
  'set:0,2', ';'-separated."""
  out = []
  for part in _list(spec, str, sep=';'):
    kind, _, arg = part.partition(':')
    kind = kind.strip()
    if kind == 'all':
      subs = [tuple(range(k))]
    elif kind == 'first':   # 'first' alone: every k = 1..K
      subs = [tuple(range(int(n))) for n in (_list(arg, int) or range(1, k + 1))]
    elif kind == 'all_k':
      subs = list(itertools.combinations(range(k), int(arg)))
    elif kind == 'set':
      subs = [tuple(sorted(set(_list(arg, int))))]
    else:
      raise ValueError(f'prompt subset {part!r}: expected all, first:, all_k: or set:')
    for s in subs:
      if not s or min(s) < 0 or max(s) >= k:
        raise ValueError(f'prompt subset {part!r} -> {s} not within the K={k} stored prompts')
    out += subs
  return list(dict.fromkeys(out))


def parse_weights(spec, num_params) -> list:
  """[(label, weights [M])] from 'theta;uniform;7/20,13/20'."""
  out = []
  for part in _list(spec, str, sep=';'):
    w = formulas.resolve_weights('' if part == 'theta' else part, num_params)
    out.append((part, w))
  return list({lab: (lab, w) for lab, w in out}.values())


# --------------------------------------------------------------------- grid

@dataclasses.dataclass(frozen=True)
class ScoreSpec:
  """One distinct score vector."""
  mode: str
  level: str
  model: str          # token/sentence: the model; model level: 'all'
  prompts: tuple      # prompt indices used (token: one)
  alpha: float        # NaN at token level
  weights: str        # label; '' below model level


@dataclasses.dataclass(frozen=True)
class Cut:
  proportion: float   # NaN when top_n > 0
  top_n: int


def _subset_label(p: tuple) -> str:
  return ','.join(map(str, p))


def build_grid(config, models: Sequence[str], k: int) -> tuple:
  """(specs, cuts): the product of the axes that apply to each level."""
  modes = _list(config.modes, str)
  levels = _list(config.levels, str)
  for m in modes:
    if m not in formulas.MODES:
      raise ValueError(f'mode {m!r} not in {formulas.MODES}')
  for lv in levels:
    if lv not in formulas.LEVELS:
      raise ValueError(f'level {lv!r} not in {formulas.LEVELS}')
  alphas = _list(config.alphas, float)
  subsets = (parse_prompt_subsets(config.prompt_subsets, k)
             if {'sentence', 'model'} & set(levels) else [])
  tok_prompts = _list(config.token_prompts, int) or list(range(k))
  if any(not 0 <= p < k for p in tok_prompts):
    raise ValueError(f'token_prompts {tok_prompts} out of range for K={k}')
  wlabels = [lab for lab in _list(config.weights, str, sep=';')] or ['theta']
  specs = []
  for mode in modes:
    if 'token' in levels:
      specs += [ScoreSpec(mode, 'token', mdl, (p,), NO_ALPHA, '')
                for mdl in models for p in tok_prompts]
    if 'sentence' in levels:
      specs += [ScoreSpec(mode, 'sentence', mdl, s, float(a), '')
                for mdl in models for s in subsets for a in alphas]
    if 'model' in levels and len(models) > 1:
      specs += [ScoreSpec(mode, 'model', 'all', s, float(a), w)
                for s in subsets for a in alphas for w in dict.fromkeys(wlabels)]
  cuts = [Cut(float(p), 0) for p in _list(config.proportions, float)]
  cuts += [Cut(NO_ALPHA, int(n)) for n in _list(config.top_ns, int) if int(n) > 0]
  for c in cuts:
    if c.top_n == 0 and not 0.0 <= c.proportion <= 1.0:
      raise ValueError(f'proportion {c.proportion} not in [0, 1]')
  if not specs or not cuts:
    raise ValueError(f'empty grid: {len(specs)} score vectors x {len(cuts)} cuts')
  return list(dict.fromkeys(specs)), cuts


def default_setting(cfg_default, models: Sequence[str], k: int) -> tuple:
  """(ScoreSpec, Cut) of the reference setting."""
  d = cfg_default
  level = d.level if d.level != 'auto' else ('model' if len(models) > 1 else 'sentence')
  if level not in formulas.LEVELS or d.mode not in formulas.MODES:
    raise ValueError(f'bad default mode/level {d.mode!r}/{level!r}')
  model = d.model or models[0]
  if level != 'model' and model not in models:
    raise ValueError(f'default model {model!r} not in {list(models)}')
  if level == 'model' and len(models) < 1:
    raise ValueError('no models')
  if level == 'token':
    spec = ScoreSpec(d.mode, 'token', model, (int(d.prompt_index),), NO_ALPHA, '')
  else:
    subs = parse_prompt_subsets(d.prompts, k)
    if len(subs) != 1:
      raise ValueError(f'default.prompts {d.prompts!r} must name one subset')
    spec = ScoreSpec(d.mode, level, 'all' if level == 'model' else model, subs[0],
                     float(d.alpha), (d.weights or 'theta') if level == 'model' else '')
  cut = Cut(NO_ALPHA, int(d.top_n)) if int(d.top_n) > 0 else Cut(float(d.proportion), 0)
  return spec, cut


# ---------------------------------------------------------------- loading

@dataclasses.dataclass
class Inputs:
  loaded: selection.Loaded
  ins_len: np.ndarray      # [N] characters, NaN without records
  res_len: np.ndarray
  bad: np.ndarray          # [N, M, K] cell cannot be used (missing or invalid)
  notes: list


def load_inputs(scores_dirs: Sequence[str], k: int = 0) -> Inputs:
  """Score dirs on one sample axis, with the records re-read as select does."""
  notes = []
  recs, _ = selection.load_input_records(scores_dirs, notes)
  loaded = selection.load_scores(scores_dirs, k=k,
                                 samples=None if recs is None else list(recs.values()))
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
    bad = ~loaded.present | np.asarray(formulas.invalid_mask(loaded.probs))
  return Inputs(loaded, ins_len, res_len, bad, notes)


def missing_report(inputs: Inputs) -> list:
  """One row per (sample, model) with a missing or unusable cell."""
  ld = inputs.loaded
  why = {}
  for r in ld.store_rejects:
    why.setdefault(r.get('index'), r.get('reason'))
  rows = []
  for i, j in np.argwhere(inputs.bad.any(axis=2)):
    miss = np.nonzero(~ld.present[i, j])[0].tolist()
    rows.append({'sample_index': int(ld.sample_index[i]), 'sample_id': ld.sample_id[i],
                 'model': ld.models[j], 'missing_prompts': miss,
                 'invalid_prompts': np.nonzero(inputs.bad[i, j] & ld.present[i, j])[0].tolist(),
                 'store_reject': why.get(int(ld.sample_index[i]))})
  return rows


# ------------------------------------------------------------ score blocks

def _sentence_block(tok, idx, alphas):
  """tok [N, M, K], idx [S, k], alphas [A] -> [A, N, M, S] (Eq. 4, broadcast)."""
  return formulas.sentence_scores(tok[:, :, idx], alphas[:, None, None, None])


def _model_block(sent, weights):
  """sent [A, N, M, S], weights [W, M] -> [W, A, N, S] (Eq. 5, vmapped over weights)."""
  return jax.vmap(formulas.model_scores, in_axes=(None, 0))(jnp.moveaxis(sent, 2, -1),
                                                            weights)


def iter_scores(inputs: Inputs, specs: Sequence[ScoreSpec], weights: dict,
                block_elements: int = 1 << 24):
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
      tok = formulas.token_scores(jnp.asarray(ld.probs, jnp.float64), mode)   # [N, M, K]
      tok_np = None
      groups = {}
      for s in mspecs:
        if s.level == 'token':
          if tok_np is None:
            tok_np = np.asarray(tok)
          j = mpos[s.model]
          yield s, tok_np[:, j, s.prompts[0]], _valid(inputs, [j], s.prompts)
        else:
          groups.setdefault((s.level, len(s.prompts)), []).append(s)
      for (level, _), gspecs in groups.items():
        subsets = list(dict.fromkeys(s.prompts for s in gspecs))
        alphas = list(dict.fromkeys(s.alpha for s in gspecs))
        wl = list(dict.fromkeys(s.weights for s in gspecs)) if level == 'model' else []
        want = set(gspecs)
        # Blocks over subsets and alphas keep A * N * M * S floats under the cap.
        per_sub = max(1, n * m * max(1, len(wl)))
        s_chunk = max(1, min(len(subsets), block_elements // per_sub))
        a_chunk = max(1, min(len(alphas), block_elements // (per_sub * s_chunk)))
        for s0 in range(0, len(subsets), s_chunk):
          subs = subsets[s0:s0 + s_chunk]
          idx = jnp.asarray(np.array(subs, np.int64))
          for a0 in range(0, len(alphas), a_chunk):
            al = alphas[a0:a0 + a_chunk]
            sent = _sentence_block(tok, idx, jnp.asarray(al, jnp.float64))
            if level == 'sentence':
              block = np.asarray(sent)                       # [A, N, M, S]
              for ai, a in enumerate(al):
                for si, sub in enumerate(subs):
                  for mdl, j in mpos.items():
                    spec = ScoreSpec(mode, level, mdl, sub, a, '')
                    if spec in want:
                      yield spec, block[ai, :, j, si], _valid(inputs, [j], sub)
            else:
              w = jnp.asarray(np.stack([weights[x] for x in wl]), jnp.float64)
              block = np.asarray(_model_block(sent, w))      # [W, A, N, S]
              for wi, wlab in enumerate(wl):
                for ai, a in enumerate(al):
                  for si, sub in enumerate(subs):
                    spec = ScoreSpec(mode, level, 'all', sub, a, wlab)
                    if spec in want:
                      yield spec, block[wi, ai, :, si], _valid(inputs, list(range(m)), sub)


def _valid(inputs: Inputs, model_pos: list, prompts: tuple) -> np.ndarray:
  """The cells select checks for this level (selection.sample_reasons) are all usable."""
  return ~inputs.bad[:, model_pos][:, :, list(prompts)].any(axis=(1, 2))


def one_score(inputs: Inputs, spec: ScoreSpec, weights: dict) -> tuple:
  (_, score, valid), = iter_scores(inputs, [spec], weights)
  return score, valid


# ----------------------------------------------------------------- metrics

def ranking(score, valid, sample_index, mode) -> np.ndarray:
  """Positions of ranked samples, best first (selection.rank_order on the valid ones)."""
  pos = np.nonzero(valid)[0]
  return pos[selection.rank_order(score[pos], sample_index[pos], mode)]


def kendall(a, b) -> float:
  if a.size < 2:
    return float('nan')
  with np.errstate(all='ignore'):
    return float(stats.kendalltau(a, b).statistic)


class _Reference:
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
    return self._cached('score', common, lambda: stats.rankdata(self.score[common]))

  def length_ranks(self, mask: np.ndarray):
    return self._cached('length', mask, lambda: stats.rankdata(self.length[mask]))


def vector_metrics(score, valid, ref: _Reference, kendall_max: int) -> dict:
  """Spearman / Kendall with the reference and Spearman with length."""
  common = valid & ref.valid
  out = {'n_common': int(common.sum())}
  r_valid = stats.rankdata(score[valid]) if valid.sum() >= 2 else None
  if common.sum() >= 2:
    ra = r_valid if np.array_equal(common, valid) else stats.rankdata(score[common])
    out['spearman_default'] = _pearson(ra, ref.ranks(common))
  else:
    out['spearman_default'] = float('nan')
  if kendall_max and common.sum() > kendall_max:
    pick = ref.sub_perm[common[ref.sub_perm]][:kendall_max]
    out['kendall_default'] = kendall(score[pick], ref.score[pick])
  else:
    out['kendall_default'] = kendall(score[common], ref.score[common])
  lv = valid & np.isfinite(ref.length)
  if lv.sum() >= 2:
    rs = r_valid if np.array_equal(lv, valid) else stats.rankdata(score[lv])
    out['spearman_length'] = _pearson(rs, ref.length_ranks(lv))
  else:
    out['spearman_length'] = float('nan')
  return out


def _pearson(x, y) -> float:
  # Plain sums, not np.dot: a threaded BLAS call costs far more than the
  # arithmetic on a busy CPU.
  x, y = x - x.mean(), y - y.mean()
  den = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
  return float(np.sum(x * y) / den) if den > 0 else float('nan')


def cut_metrics(order, cuts, mode, ref: '_Reference', ins_len, res_len) -> list:
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
    n_keep = selection.num_selected(n_valid, 0.0 if c.top_n else c.proportion, c.top_n, mode)
    inter = int(in_ref[n_keep])
    union = n_keep + n_ref - inter
    # The reference ranking cut at this setting's proportion / top_n.
    n_ref_c = selection.num_selected(ref.n_ranked, 0.0 if c.top_n else c.proportion,
                                     c.top_n, ref.mode)
    inter_c = int(np.sum(ref_rank_here[:n_keep] < n_ref_c))
    union_c = n_keep + n_ref_c - inter_c
    rest = n_valid - n_keep
    rows.append({
        'n_selected': n_keep,
        'jaccard_default': inter / union if union else 1.0,
        'jaccard_same_cut': inter_c / union_c if union_c else 1.0,
        'instruction_len_selected': ci[n_keep] / n_keep if n_keep else float('nan'),
        'response_len_selected': cr[n_keep] / n_keep if n_keep else float('nan'),
        'instruction_len_rejected': (ci[-1] - ci[n_keep]) / rest if rest else float('nan'),
        'response_len_rejected': (cr[-1] - cr[n_keep]) / rest if rest else float('nan'),
    })
  return rows


# ---------------------------------------------------------------- the sweep

@dataclasses.dataclass
class SweepResult:
  rows: list                    # one dict per setting
  default: dict                 # the reference setting's description
  prompt_corr: dict             # mode -> [K, K] Spearman of token scores across prompts
  distributions: dict           # mode -> default-level scores (valid samples)
  missing: list
  notes: list
  timing: dict
  selections: Optional[dict] = None   # setting_id -> selected sample indices, rank order


def _spec_dict(s: ScoreSpec, weights: dict) -> dict:
  return {'mode': s.mode, 'level': s.level, 'model': s.model,
          'prompts': _subset_label(s.prompts), 'k': len(s.prompts),
          'prompt_index': s.prompts[0] if s.level == 'token' else -1,
          'alpha': s.alpha, 'weights': s.weights,
          'weight_values': ','.join(f'{x:.6g}' for x in weights[s.weights])
                           if s.weights else ''}


def sweep(inputs: Inputs, config) -> SweepResult:
  """Runs the grid of config over loaded inputs."""
  t0 = time.time()
  ld = inputs.loaded
  n, m, k, _ = ld.probs.shape
  if len(set(ld.models)) != m:
    raise ValueError(f'model names repeat across score dirs {ld.models}: settings are keyed '
                     'by model name, so each dir must hold a different model')
  specs, cuts = build_grid(config, ld.models, k)
  dspec, dcut = default_setting(config.default, ld.models, k)
  wlabels = {s.weights for s in specs if s.weights} | ({dspec.weights} - {''})
  weights = dict(parse_weights(';'.join(sorted(wlabels)), ld.num_params)) if wlabels else {}
  if m > 1 and 'theta' in weights and not np.all(ld.num_params > 0):
    raise ValueError(f'theta weights need num_params > 0, got {ld.num_params}')
  length = inputs.ins_len + inputs.res_len

  dscore, dvalid = one_score(inputs, dspec, weights)
  dorder = ranking(dscore, dvalid, ld.sample_index, dspec.mode)
  dkeep = selection.num_selected(dorder.size, 0.0 if dcut.top_n else dcut.proportion,
                                 dcut.top_n, dspec.mode)
  dsel = np.zeros(n, bool)
  dsel[dorder[:dkeep]] = True
  perm = np.random.default_rng(int(config.seed)).permutation(n)
  ref = _Reference(dscore, dvalid, dorder, dsel, dspec.mode, perm, length)
  t_default = time.time()

  rows, selections = [], ({} if config.write_selections else None)
  dists = {}
  t_scores = t_rank = t_metric = 0.0
  ts = time.time()
  for spec, score, valid in iter_scores(inputs, specs, weights, int(config.block_elements)):
    t1 = time.time()
    t_scores += t1 - ts
    order = ranking(score, valid, ld.sample_index, spec.mode)
    t2 = time.time()
    vm = vector_metrics(score, valid, ref, int(config.kendall_max_samples))
    cm = cut_metrics(order, cuts, spec.mode, ref, inputs.ins_len, inputs.res_len)
    base = _spec_dict(spec, weights)
    for c, row in zip(cuts, cm):
      sid = len(rows)
      rows.append(dict(setting_id=sid, **base, proportion=c.proportion, top_n=c.top_n,
                       n_samples=n, n_ranked=int(order.size),
                       n_unranked=int(n - order.size), **row, **vm,
                       score_mean=float(np.mean(score[valid])) if order.size else float('nan'),
                       score_std=float(np.std(score[valid])) if order.size else float('nan')))
      if selections is not None:
        selections[sid] = ld.sample_index[order[:row['n_selected']]].tolist()
    if (spec.level == dspec.level and spec.model == dspec.model
        and spec.prompts == dspec.prompts and spec.weights == dspec.weights
        and (spec.level == 'token' or spec.alpha == dspec.alpha)):
      dists[spec.mode] = score[valid]
    ts = time.time()
    t_rank += t2 - t1
    t_metric += ts - t2
  for mode in _list(config.modes, str):
    if mode not in dists:   # the default's level/prompts under this mode
      s, v = one_score(inputs, dataclasses.replace(dspec, mode=mode), weights)
      dists[mode] = s[v]

  prompt_corr = {}
  jdef = ld.models.index(dspec.model) if dspec.model in ld.models else 0
  allv = ~inputs.bad[:, jdef].any(axis=1)
  with jax.enable_x64(True):
    for mode in _list(config.modes, str):
      tok = np.asarray(formulas.token_scores(ld.probs[:, jdef], mode))[allv]   # [n, K]
      ranks = np.stack([stats.rankdata(tok[:, p]) for p in range(k)], 1) if tok.size else None
      prompt_corr[mode] = (np.corrcoef(ranks, rowvar=False).reshape(k, k)
                           if tok.shape[0] >= 2 else np.full((k, k), np.nan))
  default = dict(_spec_dict(dspec, weights), proportion=dcut.proportion, top_n=dcut.top_n,
                 n_selected=int(dkeep), n_ranked=int(dorder.size))
  timing = {'default_s': t_default - t0, 'scores_s': t_scores, 'rank_s': t_rank,
            'metrics_s': t_metric, 'total_s': time.time() - t0,
            'settings': len(rows), 'score_vectors': len(specs)}
  return SweepResult(rows, default, prompt_corr, dists, missing_report(inputs),
                     list(inputs.notes), timing, selections)


# ------------------------------------------------------------------ outputs

def write_parquet(path: str, rows: list) -> None:
  cols = {key: [r[key] for r in rows] for key in rows[0]}
  fileio.write_parquet(path, pa.Table.from_pydict(cols))


def _fmt(x) -> str:
  if isinstance(x, float):
    return '' if math.isnan(x) else f'{x:.4g}'
  return str(x).replace('|', '\\|')


def _md_table(rows: list, cols: list) -> list:
  out = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  out += ['| ' + ' | '.join(_fmt(r[c]) for c in cols) + ' |' for r in rows]
  return out


def _group_stats(rows: list, key: str) -> list:
  groups = {}
  for r in rows:
    groups.setdefault(_fmt(r[key]) if isinstance(r[key], float) else r[key], []).append(r)
  out = []
  for g, rs in groups.items():
    j = np.array([r['jaccard_default'] for r in rs])
    jc = np.array([r['jaccard_same_cut'] for r in rs])
    s = np.array([r['spearman_default'] for r in rs], float)
    out.append({key: g, 'settings': len(rs), 'jaccard_mean': float(np.mean(j)),
                'jaccard_min': float(np.min(j)), 'same_cut_mean': float(np.mean(jc)),
                'same_cut_min': float(np.min(jc)), 'spearman_mean': float(np.nanmean(s))
                if np.isfinite(s).any() else float('nan'),
                'spearman_min': float(np.nanmin(s)) if np.isfinite(s).any() else float('nan')})
  return out


TABLE_COLS = ['setting_id', 'mode', 'level', 'model', 'prompts', 'alpha', 'weights',
              'proportion', 'top_n', 'n_ranked', 'n_selected', 'jaccard_default',
              'jaccard_same_cut',
              'spearman_default', 'kendall_default', 'instruction_len_selected',
              'instruction_len_rejected', 'response_len_selected', 'response_len_rejected',
              'spearman_length']


def write_markdown(path: str, res: SweepResult, dirs, models, plots, max_rows: int) -> None:
  d = res.default
  lines = ['# SelectIT sweep', '',
           f'Score dirs: {", ".join(dirs)}; models: {", ".join(models)}; '
           f'{res.rows[0]["n_samples"]} samples; {res.timing["settings"]} settings from '
           f'{res.timing["score_vectors"]} score vectors in {res.timing["total_s"]:.2f} s.', '',
           f'Default (reference) setting: mode={d["mode"]} level={d["level"]} '
           f'model={d["model"]} prompts={d["prompts"]} alpha={_fmt(d["alpha"])} '
           f'weights={d["weights"] or "-"} proportion={_fmt(d["proportion"])} '
           f'top_n={d["top_n"]}: {d["n_selected"]} of {d["n_ranked"]} ranked selected.', '',
           'Lengths are characters of the instruction / response; "rejected" = ranked, '
           'not selected. Kendall tau-b may use a fixed random subsample (see config).', '']
  if res.notes:
    lines += ['## Notes', ''] + [f'- {x}' for x in res.notes] + ['']
  lines += ['## Missing or unusable samples', '']
  if res.missing:
    per_model = {}
    for r in res.missing:
      per_model.setdefault(r['model'], []).append(r)
    for mdl, rs in per_model.items():
      lines.append(f'- {mdl}: {len(rs)} samples (first: '
                   f'{", ".join(str(r["sample_index"]) for r in rs[:20])}); '
                   'settings using this model do not rank them (see missing.jsonl).')
      why = {}
      for r in rs:
        key = r['store_reject'] or ('invalid probabilities' if not r['missing_prompts']
                                    else 'no stored row (never scored or text changed)')
        why[key] = why.get(key, 0) + 1
      lines += [f'  - {c} x {w}' for w, c in sorted(why.items(), key=lambda x: -x[1])]
  else:
    lines.append('None: every model has every prompt of every sample.')
  lines.append('')
  for key in ('mode', 'level', 'k', 'alpha', 'proportion', 'weights'):
    stats_rows = _group_stats(res.rows, key)
    if len(stats_rows) > 1 or key == 'mode':
      lines += [f'## Stability by {key}', '']
      lines += _md_table(stats_rows, [key, 'settings', 'jaccard_mean', 'jaccard_min',
                                      'same_cut_mean', 'same_cut_min', 'spearman_mean',
                                      'spearman_min']) + ['']
  lines += ['## Prompt sensitivity (Spearman of token scores between prompts)', '']
  for mode, c in res.prompt_corr.items():
    kk = c.shape[0]
    lines += [f'{mode}:', '', '| prompt | ' + ' | '.join(map(str, range(kk))) + ' |',
              '|' + '---|' * (kk + 1)]
    lines += [f'| {i} | ' + ' | '.join(_fmt(float(x)) for x in c[i]) + ' |' for i in range(kk)]
    lines.append('')
  if plots:
    lines += ['## Plots', ''] + [f'![{p}]({p})' for p in plots] + ['']
  lines += [f'## All settings ({len(res.rows)}; sweep.parquet has every column)', '']
  lines += _md_table(res.rows[:max_rows], TABLE_COLS)
  if len(res.rows) > max_rows:
    lines.append(f'\n({len(res.rows) - max_rows} more rows in sweep.parquet)')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def write_plots(out_dir: str, res: SweepResult) -> list:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  made = []
  d = res.default
  modes = list(res.distributions)
  # 1. Overlap heatmap alpha x proportion, per mode, on the default's other axes.
  level = d['level'] if d['level'] != 'token' else 'sentence'
  panels = []
  for mode in modes:
    rs = [r for r in res.rows if r['mode'] == mode and r['level'] == level
          and r['top_n'] == 0 and r['prompts'] == d['prompts']
          and r['model'] == (d['model'] if level != 'model' else 'all')
          and (level != 'model' or r['weights'] == d['weights'])]
    alphas = sorted({r['alpha'] for r in rs})
    props = sorted({r['proportion'] for r in rs})
    if len(alphas) * len(props) > 1:
      grid = np.full((len(alphas), len(props)), np.nan)
      for r in rs:
        grid[alphas.index(r['alpha']), props.index(r['proportion'])] = r['jaccard_same_cut']
      panels.append((mode, alphas, props, grid))
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False,
                             constrained_layout=True)
    for ax, (mode, alphas, props, grid) in zip(axes[0], panels):
      im = ax.imshow(grid, vmin=0, vmax=1, cmap='viridis', aspect='auto', origin='lower')
      ax.set_xticks(range(len(props)), [f'{p:g}' for p in props])
      ax.set_yticks(range(len(alphas)), [f'{a:g}' for a in alphas])
      ax.set_xlabel('proportion')
      ax.set_ylabel('alpha')
      ax.set_title(f'Jaccard vs default score, same cut: {mode}, {level},\n'
                   f'prompts {d["prompts"]}', fontsize=8)
      for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
          ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7, color='w')
    fig.colorbar(im, ax=axes[0].tolist())
    fileio.save_figure(fig, os.path.join(out_dir, 'overlap_alpha_proportion.png'))
    plt.close(fig)
    made.append('overlap_alpha_proportion.png')
  # 2. Prompt sensitivity: Spearman between prompts' token scores.
  fig, axes = plt.subplots(1, len(modes), figsize=(4.4 * len(modes), 3.8), squeeze=False,
                           constrained_layout=True)
  for ax, mode in zip(axes[0], modes):
    c = res.prompt_corr[mode]
    im = ax.imshow(c, vmin=-1, vmax=1, cmap='coolwarm')
    ax.set_title(f'token-score Spearman between prompts: {mode}', fontsize=8)
    ax.set_xlabel('prompt')
    ax.set_ylabel('prompt')
    for (i, j), v in np.ndenumerate(c):
      if np.isfinite(v):
        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7)
  fig.colorbar(im, ax=axes[0].tolist())
  fileio.save_figure(fig, os.path.join(out_dir, 'prompt_sensitivity.png'))
  plt.close(fig)
  made.append('prompt_sensitivity.png')
  # 3. Score distributions per mode (default level/prompts/alpha).
  fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.5), squeeze=False)
  for ax, mode in zip(axes[0], modes):
    s = res.distributions[mode]
    if s.size:
      ax.hist(s, bins=min(60, max(5, s.size // 5)), color='tab:blue', alpha=0.8)
    ax.set_title(f'{mode}: {d["level"]} scores', fontsize=9)
    ax.set_xlabel('score')
    ax.set_ylabel('samples')
  fig.tight_layout()
  fileio.save_figure(fig, os.path.join(out_dir, 'score_distributions.png'))
  plt.close(fig)
  made.append('score_distributions.png')
  return made


def run_sweep(config) -> dict:
  """Loads score dirs, sweeps the grid, writes sweep.parquet, sweep.md, plots."""
  dirs = selection.scores_dirs_of(config)
  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  inputs = load_inputs(dirs, k=int(config.k))
  t_load = time.time() - t0
  res = sweep(inputs, config)
  res.timing['load_s'] = t_load
  outputs = {'parquet': os.path.join(out_dir, 'sweep.parquet'),
             'markdown': os.path.join(out_dir, 'sweep.md'),
             'missing': os.path.join(out_dir, 'missing.jsonl')}
  write_parquet(outputs['parquet'], res.rows)
  fileio.write_jsonl(outputs['missing'], res.missing)
  if res.selections is not None:
    outputs['selections'] = os.path.join(out_dir, 'selections.parquet')
    ids = sorted(res.selections)
    fileio.write_parquet(outputs['selections'], pa.Table.from_pydict(
        {'setting_id': ids, 'selected_sample_index': [res.selections[i] for i in ids]}))
  plots = write_plots(out_dir, res) if config.plots else []
  write_markdown(outputs['markdown'], res, dirs, inputs.loaded.models, plots,
                 int(config.max_table_rows))
  res.timing['written_s'] = time.time() - t0
  summary = {'scores_dir': dirs, 'models': inputs.loaded.models,
             'num_samples': int(inputs.loaded.sample_index.size),
             'num_prompts': int(inputs.loaded.probs.shape[2]),
             'default': res.default, 'timing': res.timing, 'notes': res.notes,
             'num_missing': len(res.missing), 'outputs': outputs, 'plots': plots}
  fileio.write_json(os.path.join(out_dir, 'summary.json'), summary, default=float)
  logging.info('%d settings (%d score vectors) over %d samples in %.2f s -> %s',
               res.timing['settings'], res.timing['score_vectors'],
               inputs.loaded.sample_index.size, res.timing['written_s'], out_dir)
  return summary
