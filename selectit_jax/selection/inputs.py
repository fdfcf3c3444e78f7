"""What a selection reads: the scored input records (re-read as they were scored) and the
stored probabilities of one or more score dirs on one sample axis."""

import dataclasses
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from selectit_jax.data import records as records_lib
from selectit_jax.scoring import manifest as manifest_lib
from selectit_jax.scoring import store as store_lib


@dataclasses.dataclass
class Loaded:
  """Probabilities of one or more score dirs on one sample axis."""

  probs: np.ndarray  # [N, M, K, R] float64, NaN where missing
  present: np.ndarray  # [N, M, K] bool: a row is stored for the cell
  sample_index: np.ndarray  # [N]
  sample_id: list
  models: list
  num_params: np.ndarray  # [M]
  store_rejects: list
  notes: list
  truncated: np.ndarray = None  # [N] bool: its text was cut to engine.max_tokens (any model)


def _stored_models(man: Optional[manifest_lib.Manifest], table, notes: list, d: str):
  """The manifest's models that the store holds rows of, else every stored model."""
  stored = sorted(set(table.column("model").to_pylist()))
  listed = [key for key in (man.model_keys if man else []) if key in stored]
  if man and len(listed) < len(man.model_keys):
    notes.append(f"{d}: manifest models {man.model_keys} not all among stored models {stored}")
  return listed or stored


def current_rejects(
    st: store_lib.ScoreStore, man: Optional[manifest_lib.Manifest], notes: list
) -> list:
  """The dir's scoring rejects of the input records its manifest covers (index < its limit).
  A dir written before rejects.jsonl was rewritten per run may hold earlier runs' rejects of
  other records; they are left out with a note."""
  rejects = st.read_rejects()
  limit = man.limit if man else 0
  kept = [r for r in rejects if not limit or int(r["index"]) < limit]
  if len(kept) < len(rejects):
    notes.append(
        f"{st.dir}: {len(rejects) - len(kept)} rejects in rejects.jsonl are of records "
        f"beyond the {limit} the manifest covers (an earlier run); not counted"
    )
  return kept


def load_scores(scores_dirs: Sequence[str], k: int = 0, samples=None) -> Loaded:
  """Reads each score dir onto one sample axis.

  samples: the input Records (preferred): cells are matched by content hash, so
  samples stored once under a duplicate text, and samples never scored, are
  handled (the latter are missing, hence rejected). Without records the axis is
  the union of stored sample indices.
  """
  parts, notes = [], []
  for d in scores_dirs:
    if not os.path.isdir(os.path.join(d, "shards")):
      raise FileNotFoundError(f"{d}: not a score dir (no shards/)")
    st = store_lib.ScoreStore(d)
    man = st.read_manifest()
    table = st.read_table()
    if table.num_rows == 0:
      raise ValueError(f"{d}: score store is empty")
    pa_ = store_lib.probs_array(
        table,
        models=_stored_models(man, table, notes, d),
        prompt_hashes=man.prompt_hashes if man else None,
        samples=samples,
    )
    keys = set(
        zip(
            table.column("model").to_pylist(),
            table.column("prompt_hash").to_pylist(),
            table.column("content_hash" if samples is not None else "sample_index").to_pylist(),
        )
    )
    if samples is not None:
      row_key = [records_lib.content_hash(r) for r in samples]
    else:
      row_key = [int(i) for i in pa_.sample_index]
    present = np.array(
        [
            [[(mname, ph, rk) in keys for ph in pa_.prompt_hashes] for mname in pa_.models]
            for rk in row_key
        ],
        bool,
    )
    present = present.reshape(len(row_key), len(pa_.models), len(pa_.prompt_hashes))
    cut = table.filter(table.column("truncated"))
    cut_keys = {
        (mname, rk)
        for mname, rk in zip(
            cut.column("model").to_pylist(),
            cut.column("content_hash" if samples is not None else "sample_index").to_pylist(),
        )
    }
    truncated = np.array(
        [any((mname, rk) in cut_keys for mname in pa_.models) for rk in row_key], bool
    )
    probs = np.asarray(pa_.probs, np.float64)
    if k:
      if probs.shape[2] < k:
        raise ValueError(f"{d}: k={k} but only {probs.shape[2]} prompts stored")
      probs, present = probs[:, :, :k], present[:, :, :k]
    parts.append(
        dict(
            dir=d,
            probs=probs,
            present=present,
            sidx=np.asarray(pa_.sample_index, np.int64),
            sid=list(pa_.sample_id),
            models=list(pa_.models),
            nparams=np.asarray(pa_.num_params, np.int64),
            rejects=current_rejects(st, man, notes),
            truncated=truncated,
        )
    )
  scales = {p["probs"].shape[3] for p in parts}
  if len(scales) != 1:
    raise ValueError(
        f"score dirs rate on different scales {sorted(scales)} "
        f'({[p["dir"] for p in parts]}); select them separately'
    )
  ks = {p["probs"].shape[2] for p in parts}
  if len(ks) != 1:
    raise ValueError(f"score dirs have different prompt counts {sorted(ks)}; set config.k")
  kk = ks.pop()
  all_idx = np.unique(np.concatenate([p["sidx"] for p in parts]))
  n = all_idx.size
  m = sum(len(p["models"]) for p in parts)
  probs = np.full((n, m, kk, scales.pop()), np.nan)
  present = np.zeros((n, m, kk), bool)
  truncated = np.zeros(n, bool)
  ids = [None] * n
  col = 0
  for p in parts:
    pos = np.searchsorted(all_idx, p["sidx"])
    mm = len(p["models"])
    probs[pos, col : col + mm] = p["probs"]
    present[pos, col : col + mm] = p["present"]
    truncated[pos] |= p["truncated"]
    for q, i, s in zip(pos, p["sidx"], p["sid"]):
      if ids[q] is not None and ids[q] != s:
        raise ValueError(f'sample_index {i}: id {s!r} in {p["dir"]} vs {ids[q]!r}')
      ids[q] = s
    col += mm
  models = [name for p in parts for name in p["models"]]
  if len(set(models)) != len(models):
    notes.append(f"model names repeat across score dirs: {models}")
  return Loaded(
      probs=probs,
      present=present,
      sample_index=all_idx,
      sample_id=ids,
      models=models,
      num_params=np.concatenate([p["nparams"] for p in parts]),
      store_rejects=[dict(r, scores_dir=p["dir"]) for p in parts for r in p["rejects"]],
      notes=notes,
      truncated=truncated,
  )


def _data_config(manifests: list, notes: list) -> Optional[dict]:
  """The scored input's data config (turn policy, the records the runs covered...), so
  texts and content hashes are read exactly as they were scored."""
  datas = [m.data_config() for m in manifests if m is not None]
  if any(d != datas[0] for d in datas[1:]):
    notes.append(f"score dirs name different input data; using the first: {datas[0]}")
  if not datas or not (datas[0].get("path") or str(datas[0].get("format")).startswith("tfds:")):
    return None
  return datas[0]


def load_input_records(scores_dirs: Sequence[str], notes: list):
  """The scored input records by index, re-read as the scoring run read them, and their
  container (json, jsonl, parquet, tfds); (None, None) with a note when unavailable."""
  manifests = [manifest_lib.read(d) if os.path.isdir(d) else None for d in scores_dirs]
  data = _data_config(manifests, notes)
  if data is None:
    notes.append("manifest names no input data; selected records and lengths unavailable")
    return None, None
  if not str(data["format"]).startswith("tfds:") and not os.path.isfile(data["path"]):
    notes.append(
        f"input data {data['path']} not found; samples aligned by stored "
        "sample_index, selected records and lengths unavailable"
    )
    return None, None
  rec_list, _, info = records_lib.read_records(ml_collections.ConfigDict(data))
  return {r.index: r for r in rec_list}, info.container


def scores_dirs_of(config) -> list:
  """config.scores_dir (comma-separated) as a list; checks the output dir is set."""
  dirs = [d.strip() for d in str(config.scores_dir).split(",") if d.strip()]
  if not dirs:
    raise ValueError("config.scores_dir is required")
  if not config.output_dir:
    raise ValueError("config.output_dir is required")
  return dirs
