"""Tests for selectit_jax.scoring.store: shards, atomicity, resume keys, de-dup, dense probs."""

import dataclasses
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selectit_jax.data import records as R
from selectit_jax.scoring import manifest as M
from selectit_jax.scoring import store as S

PH = ["ph0", "ph1", "ph2"]


def rec(i, text=None):
  return R.Record(f"id{i}", i, text or f"ins{i}", f"res{i}", {})


def row(r, model="m", k=0, num_params=100, p=None):
  return {
      "sample_id": r.id,
      "sample_index": r.index,
      "content_hash": R.content_hash(r),
      "model": model,
      "num_params": num_params,
      "prompt_index": k,
      "prompt_hash": PH[k],
      "probs": p if p is not None else [r.index + k / 10, 0.1, 0.2, 0.3, 0.4],
      "logsumexp": 1.5,
      "num_tokens": 10 + k,
  }


def test_round_trip_and_shard_names(tmp_path):
  st = S.ScoreStore(str(tmp_path), process_index=3)
  rows = [row(rec(i), k=k) for i in range(4) for k in range(2)]
  p0 = st.write_shard(rows[:5])
  p1 = st.write_shard(rows[5:])
  assert st.write_shard([]) is None
  assert [os.path.basename(p) for p in (p0, p1)] == ["00003-000000.parquet", "00003-000001.parquet"]
  t = st.read_table()
  assert t.schema == S.SCHEMA
  assert t.to_pylist() == [
      {**r, "probs": [float(x) for x in r["probs"]], "truncated": False} for r in rows
  ]
  assert pq.read_schema(p0).field("probs").type == pa.list_(pa.float64())
  assert sorted(os.listdir(st.shards_dir)) == ["00003-000000.parquet", "00003-000001.parquet"]
  # A new store object continues the sequence; other processes keep their own.
  assert (
      os.path.basename(S.ScoreStore(str(tmp_path), 3).write_shard(rows[:1]))
      == "00003-000002.parquet"
  )
  assert (
      os.path.basename(S.ScoreStore(str(tmp_path), 0).write_shard(rows[:1]))
      == "00000-000000.parquet"
  )


def test_write_shard_validates(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  r = row(rec(0))
  with pytest.raises(ValueError, match="lack columns"):
    st.write_shard([{k: v for k, v in r.items() if k != "logsumexp"}])
  with pytest.raises(ValueError, match="probs"):
    st.write_shard([r, {**r, "probs": [0.1, 0.2]}])
  with pytest.raises(ValueError, match="null"):
    st.write_shard([{**r, "model": None}])
  assert st.shard_paths() == [] and os.listdir(st.shards_dir) == []
  # numpy values are accepted.
  st.write_shard(
      [{**r, "probs": np.arange(5.0), "sample_index": np.int64(0), "num_tokens": np.int32(3)}]
  )
  assert st.read_table().column("probs").to_pylist() == [[0.0, 1.0, 2.0, 3.0, 4.0]]


def test_atomic_no_tmp_left_and_partial_tmp_ignored(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  st.write_shard([row(rec(0))])
  assert [n for n in os.listdir(st.shards_dir) if not n.endswith(".parquet")] == []
  # A crash mid-write leaves a tmp file: it is never read, and never blocks a name.
  with open(os.path.join(st.shards_dir, ".00000-000001.parquet.tmp.999"), "wb") as f:
    f.write(b"PAR1 garbage, half written")
  assert st.read_table().num_rows == 1
  assert len(st.stored_keys()) == 1
  st2 = S.ScoreStore(str(tmp_path))
  assert os.path.basename(st2.write_shard([row(rec(1))])) == "00000-000001.parquet"
  assert st2.read_table().num_rows == 2


def test_write_failure_leaves_no_files(tmp_path, monkeypatch):
  st = S.ScoreStore(str(tmp_path))

  def boom(table, where, **kw):
    where.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(pq, "write_table", boom)
  with pytest.raises(OSError, match="disk full"):
    st.write_shard([row(rec(0))])
  assert os.listdir(st.shards_dir) == []


def test_stored_keys_for_resume(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  assert st.stored_keys() == set()
  a, b = rec(0), rec(1)
  st.write_shard([row(a, k=0), row(a, k=1), row(b, "big", 0)])
  assert st.stored_keys() == {
      (R.content_hash(a), "m", "ph0"),
      (R.content_hash(a), "m", "ph1"),
      (R.content_hash(b), "big", "ph0"),
  }


def test_read_table_dedups_keep_first(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  a, b = rec(0), rec(1)
  st.write_shard([row(a, p=[1, 0, 0, 0, 0]), row(b)])
  st.write_shard([row(a, p=[0, 0, 0, 0, 1]), row(a, k=1)])  # a resumed duplicate
  t = st.read_table()
  assert t.num_rows == 3
  assert t.column("probs").to_pylist()[0] == [1.0, 0, 0, 0, 0]
  assert [(r["sample_index"], r["prompt_index"]) for r in t.to_pylist()] == [(0, 0), (1, 0), (0, 1)]
  assert S.ScoreStore(str(tmp_path / "empty")).read_table().num_rows == 0


def test_probs_array_aligns_shuffled_rows_and_reports_missing(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  recs = [rec(i) for i in range(5)]
  models = {"small": 100, "big": 700}
  rows = [
      row(r, m, k, n, p=[r.index, k, len(m), 0.5, 0.25])
      for r in recs
      for m, n in models.items()
      for k in range(3)
  ]
  dropped = [x for x in rows if (x["sample_index"], x["model"], x["prompt_index"]) == (3, "big", 1)]
  rows = [x for x in rows if x not in dropped]
  random.Random(0).shuffle(rows)
  st.write_shard(rows[:13])
  st.write_shard(rows[13:])
  pa_ = S.probs_array(st.read_table())
  probs, sample_index, sample_id, names, num_params = (
      pa_.probs,
      pa_.sample_index,
      pa_.sample_id,
      pa_.models,
      pa_.num_params,
  )
  assert probs.shape == (5, 2, 3, 5) and probs.dtype == np.float64
  np.testing.assert_array_equal(sample_index, np.arange(5))
  assert list(sample_id) == [f"id{i}" for i in range(5)]
  assert names == ["big", "small"] and list(num_params) == [700, 100]
  assert pa_.prompt_hashes == PH
  assert pa_.missing == [(3, "big", 1)]
  assert np.isnan(probs[3, 0, 1]).all()
  for n in range(5):
    for j, m in enumerate(names):
      for k in range(3):
        if (n, m, k) != (3, "big", 1):
          np.testing.assert_array_equal(probs[n, j, k], [n, k, len(m), 0.5, 0.25])
  # Chosen model order and prompt subset.
  sub = S.probs_array(st.read_table(), models=["small"], prompt_hashes=["ph2", "ph0"])
  assert sub.probs.shape == (5, 1, 2, 5) and sub.missing == []
  np.testing.assert_array_equal(sub.probs[4, 0, 0], [4, 2, 5, 0.5, 0.25])
  # A model with no rows at all: every cell missing, num_params 0.
  none = S.probs_array(st.read_table(), models=["small", "absent"])
  assert len(none.missing) == 15 and list(none.num_params) == [100, 0]


def test_probs_array_with_samples_handles_duplicate_content(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  a, dup, c, unscored = rec(0, "same"), rec(1, "same"), rec(2), rec(3)
  dup = R.Record("id1", 1, "same", a.response, {})
  assert R.content_hash(a) == R.content_hash(dup)
  st.write_shard([row(a, k=k) for k in range(2)] + [row(c, k=k) for k in range(2)])
  out = S.probs_array(st.read_table(), prompt_hashes=PH[:2], samples=[c, a, dup, unscored])
  assert list(out.sample_index) == [2, 0, 1, 3]
  assert list(out.sample_id) == ["id2", "id0", "id1", "id3"]
  np.testing.assert_array_equal(out.probs[1], out.probs[2])
  assert not np.isnan(out.probs[:3]).any()
  assert out.missing == [(3, "m", 0), (3, "m", 1)]


def test_probs_array_errors(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  a = rec(0)
  st.write_shard([row(a), {**row(rec(1)), "num_params": 5}])
  with pytest.raises(ValueError, match="num_params"):
    S.probs_array(st.read_table())
  st2 = S.ScoreStore(str(tmp_path / "b"))
  st2.write_shard([row(a), row(rec(0, "other text"))])  # same index, different content
  with pytest.raises(ValueError, match="several rows"):
    S.probs_array(st2.read_table())
  st3 = S.ScoreStore(str(tmp_path / "c"))
  st3.write_shard([row(a), {**row(rec(1)), "prompt_hash": "changed"}])
  with pytest.raises(ValueError, match="prompt_hashes explicitly"):
    S.probs_array(st3.read_table())
  empty = S.probs_array(S.SCHEMA.empty_table())
  assert empty.probs.shape == (0, 0, 0, 5) and empty.missing == []


def test_manifest_and_rejects(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  assert st.read_manifest() is None
  m = M.Manifest(
      data={"path": "d", "format": "sharegpt"},
      template="t",
      prompts={"h": "p\n"},
      models=[M.ModelEntry("m@x", "m", "path", "x", 3)],
      runs=[M.RunEntry("m@x", ("h",), 0, 1)],
  )
  st.write_manifest(m)
  assert st.read_manifest() == m
  st.write_manifest(dataclasses.replace(m, template="u"))
  assert st.read_manifest().template == "u"
  assert sorted(os.listdir(tmp_path)) == ["manifest.json", "shards"]
  rej = [R.Reject(1, "x", "empty response"), R.Reject(4, None, "too long")]
  assert st.write_rejects(rej + rej[:1]) == 2  # no repeats
  assert st.read_rejects() == [
      {"index": 1, "id": "x", "reason": "empty response"},
      {"index": 4, "id": None, "reason": "too long"},
  ]
  # The next run's rejects replace them: each run's rejects are its own.
  assert st.write_rejects([R.Reject(5, "y", "too long")]) == 1
  assert st.read_rejects() == [{"index": 5, "id": "y", "reason": "too long"}]
  assert st.write_rejects([]) == 0 and st.read_rejects() == []
  with open(st.rejects_path) as f:
    assert all(json.loads(line) for line in f)


def test_shards_of_the_five_point_layout_still_read(tmp_path):
  """Shards written before the scale was a setting hold fixed-size lists of five."""
  st = S.ScoreStore(str(tmp_path))
  old = pa.schema(
      [
          f if f.name != "probs" else pa.field("probs", pa.list_(pa.float64(), 5))
          for f in S.SCHEMA
          if f.name != "truncated"
      ]
  )
  row = dict(
      sample_id="a",
      sample_index=0,
      content_hash="c",
      model="m",
      num_params=1,
      prompt_index=0,
      prompt_hash="h",
      probs=[0.1, 0.2, 0.3, 0.2, 0.1],
      logsumexp=0.0,
      num_tokens=3,
  )
  pq.write_table(
      pa.Table.from_pylist([row], schema=old), os.path.join(st.shards_dir, "00000-000000.parquet")
  )
  st.write_shard([dict(row, content_hash="d", sample_index=1)])
  out = S.probs_array(st.read_table())
  assert out.probs.shape == (2, 1, 1, 5) and S.rating_scale(st.read_table()) == 5
  st.write_shard([dict(row, content_hash="e", sample_index=2, probs=[0.5, 0.5, 0.0])])
  with pytest.raises(ValueError, match="mix rating scales"):
    S.probs_array(st.read_table())


def test_truncated_column_defaults_and_old_shards_read_false(tmp_path):
  st = S.ScoreStore(str(tmp_path))
  st.write_shard([dict(row(rec(0)), truncated=True), row(rec(1))])
  # A shard written before the column existed.
  old = [row(rec(2))]
  table = pa.Table.from_pylist(
      old, schema=pa.schema([f for f in S.SCHEMA if f.name != "truncated"])
  )
  pq.write_table(table, os.path.join(st.shards_dir, "00000-000009.parquet"))
  t = st.read_table()
  assert t.schema == S.SCHEMA
  assert dict(zip(t.column("sample_index").to_pylist(), t.column("truncated").to_pylist())) == {
      0: True,
      1: False,
      2: False,
  }
