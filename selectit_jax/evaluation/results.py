"""Per-item results (Parquet shards, resumable by key), the summary with 95 % intervals, and
its markdown table.

Layout under an eval dir:
  items/{seq:06d}.parquet  one row per (task, item, form, model), written atomically
  summary.json, summary.md  over every stored row of this run's items and model
Key of a row = (task, id, form, model): a re-run skips items whose forms are all stored.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from selectit_jax import fileio

KEY_COLUMNS = ("task", "id", "form", "model")
SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("id", pa.string()),
        ("form", pa.string()),  # letter | cloze | bpb | generate
        ("model", pa.string()),  # name@weights fingerprint, with the settings that matter
        ("prediction", pa.int64()),  # index of the chosen choice (generate: -1)
        ("gold", pa.int64()),  # (generate: -1)
        ("score", pa.float64()),  # letter, cloze, generate: 1 right / 0 wrong; bpb: bits per byte
        ("logliks", pa.list_(pa.float64())),  # per choice, summed log p in nats
        ("num_tokens", pa.list_(pa.int32())),  # per choice, tokens scored (generate: generated)
        ("num_bytes", pa.list_(pa.int32())),  # per choice, UTF-8 bytes of its text
        # generate: the continuation cut at its stop, the gold text (GSM8K's short answer,
        # HumanEval's canonical solution) and what was checked (the extracted final number;
        # the sandbox's status and error tail).
        ("prediction_text", pa.string()),
        ("gold_text", pa.string()),
        ("answer", pa.string()),
        ("max_new_tokens", pa.int32()),  # generate: the generation limit it ran with
    ]
)
# Columns added since the first shards were written, and their value in those shards.
DEFAULTS = {"prediction_text": "", "gold_text": "", "answer": "", "max_new_tokens": 0}
Z95 = 1.959963984540054
# Per form, what its mean score is.
METRICS = {"letter": "accuracy", "cloze": "accuracy (length-normalised)", "bpb": "bits per byte"}
# A generate form's metric, per task.
GENERATE_METRICS = {"gsm8k": "exact match (final number)", "humaneval": "pass@1 (greedy)"}


class ResultStore:

  def __init__(self, directory: str):
    self.dir = directory
    self.items_dir = os.path.join(directory, "items")
    self._shards = fileio.ParquetShards(self.items_dir, SCHEMA, KEY_COLUMNS, DEFAULTS)

  def shard_paths(self) -> list[str]:
    return self._shards.paths()

  def write(self, rows: Sequence[dict]) -> str | None:
    """One new shard of rows (dicts with every SCHEMA column; DEFAULTS may be left out)."""
    if not rows:
      return None
    return self._shards.write(
        pa.Table.from_pylist([{**DEFAULTS, **r} for r in rows], schema=SCHEMA)
    )

  def read_table(self) -> pa.Table:
    """Every shard, the first row of each key kept."""
    return self._shards.read_table()

  def stored_keys(self) -> set:
    return self._shards.keys()

  def generation_lengths(self, model: str) -> dict[tuple[str, str], int]:
    """{(task, id): max_new_tokens} of this model's stored generate rows."""
    t = self.read_table()
    cols = [t.column(c).to_pylist() for c in ("task", "id", "form", "model", "max_new_tokens")]
    return {(a, b): n for a, b, f, m, n in zip(*cols) if f == "generate" and m == model}


def wilson(successes: float, n: int) -> tuple[float, float]:
  """95 % Wilson score interval of a proportion (sane at 0 %, 100 % and small n)."""
  if n == 0:
    return (math.nan, math.nan)
  p = successes / n
  denom = 1 + Z95**2 / n
  centre = (p + Z95**2 / (2 * n)) / denom
  half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
  return (centre - half, centre + half)


def mean_interval(values: np.ndarray) -> tuple[float, float]:
  """Mean ± 1.96 standard errors (sample std)."""
  n = len(values)
  if n < 2:
    return (math.nan, math.nan)
  half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(n)
  mean = float(np.mean(values))
  return (mean - half, mean + half)


def summarise(table: pa.Table, keys: Iterable[tuple[str, str]], model: str) -> dict:
  """{task: {form: {metric, value, n, ci95}}} over the rows of these (task, id) items and
  model (items micro-averaged: MMLU over all its subjects' questions together)."""
  wanted = set(keys)
  scores: dict[str, dict[str, list[float]]] = {}
  cols = [table.column(c).to_pylist() for c in ("task", "id", "form", "model", "score")]
  for task, item_id, form, m, score in zip(*cols):
    if m == model and (task, item_id) in wanted:
      scores.setdefault(task, {}).setdefault(form, []).append(score)
  out = {}
  for task in sorted(scores):
    out[task] = {}
    for form, values in sorted(scores[task].items()):
      v = np.asarray(values, np.float64)
      ci = mean_interval(v) if form == "bpb" else wilson(float(v.sum()), len(v))
      metric = (
          GENERATE_METRICS.get(task, "accuracy") if form == "generate" else METRICS.get(form, form)
      )
      out[task][form] = dict(
          metric=metric,
          value=float(v.mean()),
          n=len(v),
          ci95=[None if math.isnan(x) else x for x in ci],
      )
  return out


def markdown(summary: dict, model: str, notes: Sequence[str] = ()) -> str:
  lines = [
      f"# Evaluation of `{model}`",
      "",
      "| task | form | metric | value | 95 % CI | n |",
      "|---|---|---|---|---|---|",
  ]
  for task, forms in summary.items():
    for form, s in forms.items():
      pct = form != "bpb"
      fmt = (lambda x: f"{100 * x:.1f} %") if pct else (lambda x: f"{x:.3f}")
      lo, hi = s["ci95"]
      ci = "n/a" if lo is None else f"{fmt(lo)} – {fmt(hi)}"
      lines.append(f"| {task} | {form} | {s['metric']} | {fmt(s['value'])} | {ci} | {s['n']} |")
  lines += [""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"
