"""Markdown report of a selection run: plots, extremes, digit mass, rejects."""
import collections
import dataclasses
import os
from typing import Any, Optional, Sequence

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
  score: np.ndarray            # ranking score, NaN for rejected samples
  sample_index: np.ndarray
  sample_id: Sequence[str]
  rank: np.ndarray             # 0-based rank, -1 when rejected
  selected: np.ndarray         # bool
  digit_mass: np.ndarray       # [N, M, K] sum of the five probabilities
  models: Sequence[str]
  store_rejects: Sequence[dict]       # rejects.jsonl of the score dirs
  selection_rejects: Sequence[dict]   # {index, id, reason} made at selection
  instruction: Optional[Sequence[str]] = None  # None when records unavailable
  response: Optional[Sequence[str]] = None
  notes: Sequence[str] = ()
  outputs: dict = dataclasses.field(default_factory=dict)


def _trunc(s: str, n: int = TRUNCATE) -> str:
  s = ' '.join(str(s).split())
  s = s if len(s) <= n else s[:n - 1] + '…'
  return s.replace('|', '\\|')


def _fmt(x: Any) -> str:
  if isinstance(x, (float, np.floating)):
    return f'{x:.6g}'
  return str(x)


def digit_mass_stats(mass: np.ndarray) -> dict:
  """Statistics of sum(P1..P5) over finite cells."""
  m = np.asarray(mass, np.float64).ravel()
  m = m[np.isfinite(m)]
  if m.size == 0:
    return {'count': 0}
  q = np.quantile(m, [0.01, 0.05, 0.25, 0.5, 0.75])
  return {'count': int(m.size), 'mean': float(m.mean()), 'min': float(m.min()),
          'q01': q[0], 'q05': q[1], 'q25': q[2], 'median': q[3], 'q75': q[4],
          'max': float(m.max()), 'below_0.1': int((m < 0.1).sum())}


def _plots(out_dir: str, d: ReportData) -> list:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  made = []
  valid = d.rank >= 0
  s = np.asarray(d.score)[valid]
  if s.size:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(s, bins=min(50, max(5, s.size // 5)), color='tab:blue', alpha=0.8)
    if d.selected.any():
      ax.axvline(np.min(np.asarray(d.score)[d.selected]), color='tab:red',
                 linestyle='--', label='selection cut')
      ax.legend()
    ax.set_xlabel('score')
    ax.set_ylabel('samples')
    ax.set_title('Score histogram')
    fig.tight_layout()
    fileio.save_figure(fig, os.path.join(out_dir, 'score_hist.png'))
    plt.close(fig)
    made.append('score_hist.png')
  if s.size and d.instruction is not None:
    length = np.array([len(i) + len(r) for i, r in zip(d.instruction, d.response)])
    fig, ax = plt.subplots(figsize=(6, 4))
    sel = d.selected[valid]
    ax.scatter(length[valid][~sel], s[~sel], s=6, alpha=0.5, label='not selected')
    ax.scatter(length[valid][sel], s[sel], s=6, alpha=0.7, color='tab:red', label='selected')
    ax.set_xscale('log')
    ax.set_xlabel('instruction + response length (characters)')
    ax.set_ylabel('score')
    ax.set_title('Length vs score')
    ax.legend()
    fig.tight_layout()
    fileio.save_figure(fig, os.path.join(out_dir, 'length_vs_score.png'))
    plt.close(fig)
    made.append('length_vs_score.png')
  return made


def _extremes(d: ReportData, positions) -> list:
  lines = ['| rank | index | id | score | instruction | response |',
           '|---:|---:|---|---:|---|---|']
  for p in positions:
    ins = _trunc(d.instruction[p]) if d.instruction is not None else ''
    res = _trunc(d.response[p]) if d.response is not None else ''
    lines.append(f'| {d.rank[p]} | {d.sample_index[p]} | {_trunc(d.sample_id[p], 40)} '
                 f'| {d.score[p]:.6g} | {ins} | {res} |')
  return lines


def write_report(out_dir: str, d: ReportData) -> str:
  """Writes report.md (and PNGs) into out_dir; returns the report path."""
  os.makedirs(out_dir, exist_ok=True)
  plots = _plots(out_dir, d)
  n = len(d.sample_index)
  valid = d.rank >= 0
  order = np.argsort(np.where(valid, d.rank, np.iinfo(np.int64).max), kind='stable')
  ranked = order[:int(valid.sum())]
  L = ['# SelectIT selection report', '']
  L += ['## Counts', '',
        f'- samples considered (input records, or stored samples without input): {n}',
        f'- rejected at selection: {int((~valid).sum())}',
        f'- ranked: {int(valid.sum())}',
        f'- selected: {int(d.selected.sum())}',
        f'- rejected while scoring (rejects.jsonl): {len(d.store_rejects)}', '']
  L += ['## Parameters', '', '| key | value |', '|---|---|']
  L += [f'| {k} | {_trunc(_fmt(v), 200)} |' for k, v in d.params.items()]
  L.append('')
  if d.outputs:
    L += ['## Outputs', '']
    L += [f'- {k}: `{v}`' for k, v in d.outputs.items()]
    L.append('')
  if d.notes:
    L += ['## Notes', ''] + [f'- {x}' for x in d.notes] + ['']
  L += ['## Scores', '']
  if ranked.size:
    s = np.asarray(d.score)[ranked]
    L.append(f'mean {s.mean():.6g}, std {s.std():.6g}, min {s.min():.6g}, '
             f'median {np.median(s):.6g}, max {s.max():.6g}')
    L.append('')
  L += [f'![{p}]({p})' for p in plots] + ['']
  L += ['## Top 5', ''] + _extremes(d, ranked[:5]) + ['']
  L += ['## Bottom 5', ''] + _extremes(d, ranked[-5:][::-1]) + ['']

  L += ['## Digit mass (sum of P("1")..P("5"))', '',
        '| model | cells | mean | min | q01 | q05 | q25 | median | q75 | max | <0.1 |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  warnings = []
  for j, name in enumerate(d.models):
    st = digit_mass_stats(d.digit_mass[:, j])
    if not st['count']:
      L.append(f'| {name} | 0 | | | | | | | | | |')
      continue
    L.append(f"| {name} | {st['count']} | " + ' | '.join(
        f'{st[k]:.4g}' for k in ('mean', 'min', 'q01', 'q05', 'q25', 'median', 'q75', 'max'))
             + f" | {st['below_0.1']} |")
    if st['mean'] < LOW_MASS_WARN:
      warnings.append(f'**Warning**: model {name}: mean digit mass {st["mean"]:.3g} < '
                      f'{LOW_MASS_WARN}; the model rarely answers with a rating digit, so '
                      'scores rest on small probabilities.')
  L += [''] + warnings + ([''] if warnings else [])

  L += ['## Rejects by reason', '', '| stage | reason | count |', '|---|---|---:|']
  for stage, rows in (('scoring', d.store_rejects), ('selection', d.selection_rejects)):
    counts = collections.Counter(str(r.get('reason', '')) for r in rows)
    for reason, c in sorted(counts.items()):
      L.append(f'| {stage} | {_trunc(reason, 80)} | {c} |')
  if not d.store_rejects and not d.selection_rejects:
    L.append('| - | none | 0 |')
  L.append('')
  path = os.path.join(out_dir, 'report.md')
  return fileio.write_text(path, '\n'.join(L))
