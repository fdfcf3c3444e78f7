"""Ranking, selection counts and an end-to-end select run on a small score dir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selectit_jax.selection import ranking
from selectit_jax.selection import runner as selection

# ---------------------------------------------------------------- pure parts


def test_num_selected_floor_and_top_n():
  assert ranking.num_selected(10, 0.2) == 2
  assert ranking.num_selected(9, 0.2) == 1  # floor(1.8)
  assert ranking.num_selected(4, 0.2) == 0  # floor(0.8)
  assert ranking.num_selected(0, 0.2) == 0
  assert ranking.num_selected(7, 1.0) == 7
  # 100 * 0.29 == 28.999999999999996 in floats: the paper mode floors the
  # decimal product, code mode keeps the released int(N * p).
  assert ranking.num_selected(100, 0.29, mode="paper") == 29
  assert ranking.num_selected(100, 0.29, mode="code") == 28
  assert ranking.num_selected(10, 0.2, top_n=3) == 3
  assert ranking.num_selected(10, 0.2, top_n=30) == 10
  with pytest.raises(ValueError):
    ranking.num_selected(10, 1.5)


def test_count_base_and_tie_at_cut():
  assert ranking.count_base(9, 12, "rankable") == 9
  assert ranking.count_base(9, 12, "input") == 12
  with pytest.raises(ValueError, match="count_from"):
    ranking.count_base(9, 12, "all")
  s = np.array([5.0, 4.0, 3.0, 3.0, 3.0, 1.0])
  assert ranking.tie_at_cut(s, 3) == (1, 2)  # last kept 3.0 == first dropped 3.0
  assert ranking.tie_at_cut(s, 4) == (2, 1)
  assert ranking.tie_at_cut(s, 2) == (0, 0)  # 4.0 kept, 3.0 dropped: a clean cut
  assert ranking.tie_at_cut(s, 5) == (0, 0)
  assert ranking.tie_at_cut(s, 0) == ranking.tie_at_cut(s, 6) == (0, 0)


def test_rank_order_tie_break_both_modes():
  score = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5])
  idx = np.array([10, 11, 12, 13, 14, 15])
  paper = ranking.rank_order(score, idx, "paper")
  code = ranking.rank_order(score, idx, "code")
  # paper: ties -> earlier index first
  assert list(idx[paper]) == [11, 14, 10, 12, 15, 13]
  # code: the released sorted(zip(score, index), reverse=True)
  want = [i for _, i in sorted(zip(score.tolist(), idx.tolist()), reverse=True)]
  assert list(idx[code]) == want == [14, 11, 15, 12, 10, 13]
  with pytest.raises(ValueError):
    ranking.rank_order(np.array([0.1, np.nan]), np.array([0, 1]))


def test_rank_order_random_against_python_sort():
  rng = np.random.default_rng(0)
  score = rng.integers(0, 5, size=50).astype(np.float64) / 4  # many ties
  idx = rng.permutation(1000)[:50]
  code = ranking.rank_order(score, idx, "code")
  assert list(idx[code]) == [i for _, i in sorted(zip(score, idx), reverse=True)]
  paper = ranking.rank_order(score, idx, "paper")
  assert list(idx[paper]) == [i for _, i in sorted(zip(-score, idx))]


# ------------------------------------------------------------- end to end

from conftest import K, crafted_probs, read_jsonl, select_cfg, small_dataset, write_score_dir  # noqa: E402
from conftest import ref_sentence, ref_token_code, ref_token_paper  # noqa: E402

REF = {"paper": ref_token_paper, "code": ref_token_code}


def _src(i):
  return 6 if i == 7 else i  # 7 duplicates 6's text: scored once, as 6


def _expected_sentence(i, mode, alpha, k=K):
  p = crafted_probs(_src(i))[:k]
  return ref_sentence([REF[mode](v) for v in p], alpha)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_end_to_end_sentence(tmp_path, data_path, mode):
  sdir = write_score_dir(tmp_path, "m135", data_path, 135_000_000, skip=(11,))
  out = str(tmp_path / f"out_{mode}")
  with pytest.raises(ValueError, match=r"cover 11 of 12 input records.*allow_partial"):
    selection.run(select_cfg(scores_dir=sdir, mode=mode, output_dir=out))
  summary = selection.run(
      select_cfg(
          scores_dir=sdir, mode=mode, alpha=0.3, proportion=0.5, output_dir=out, allow_partial=True
      )
  )
  assert summary["coverage"]["missing_unexplained"] == 1
  rows = read_jsonl(os.path.join(out, "scores.jsonl"))
  by_idx = {r["sample_index"]: r for r in rows}
  # 12 readable records (3 rejected by the reader); 5 nan, 8 zero mass, 11 unscored.
  assert sorted(by_idx) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12]
  want_reasons = {5: "nonfinite_probs", 8: "zero_digit_mass", 11: "missing_scores"}
  assert {i: r["reject_reason"] for i, r in by_idx.items() if r["rank"] is None} == want_reasons
  assert [r["reason"] for r in read_jsonl(os.path.join(out, "selection_rejects.jsonl"))] == [
      want_reasons[i] for i in sorted(want_reasons)
  ]
  valid = [i for i in sorted(by_idx) if i not in want_reasons]
  want = {i: _expected_sentence(i, mode, 0.3) for i in valid}
  for i in valid:
    assert by_idx[i]["score"] == pytest.approx(want[i], rel=1e-12)
    assert by_idx[i]["sentence_score"] == by_idx[i]["score"]
    assert len(by_idx[i]["token_scores"]) == K
    assert by_idx[i]["token_scores"][2] == pytest.approx(
        REF[mode](crafted_probs(_src(i))[2]), rel=1e-12
    )
  # Ties: 1, 4, 9 identical; 6 and 7 identical text (stored once).
  assert want[1] == want[4] == want[9] and by_idx[6]["score"] == by_idx[7]["score"]
  if mode == "paper":
    ranked = sorted(valid, key=lambda i: (-want[i], i))
  else:
    ranked = [i for _, i in sorted(((want[i], i) for i in valid), reverse=True)]
  assert [r["sample_index"] for r in rows if r["rank"] is not None] == ranked
  assert [by_idx[i]["rank"] for i in ranked] == list(range(len(ranked)))
  n_keep = len(valid) // 2  # floor(9 * 0.5) = 4
  assert summary["num_selected"] == n_keep == 4
  assert [i for i in ranked if by_idx[i]["selected"]] == ranked[:n_keep]
  # Selected records: the input's own objects, JSON array, rank order.
  with open(os.path.join(out, "selected.json"), encoding="utf-8") as f:
    sel = json.load(f)
  assert sel == [small_dataset()[i] for i in ranked[:n_keep]]
  # Report.
  with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
    rep = f.read()
  for s in (
      "score_hist.png",
      "length_vs_score.png",
      "Top 5",
      "Bottom 5",
      "Digit mass",
      "| scoring | empty response | 1 |",
      "| selection | missing_scores | 1 |",
      f"| mode | {mode} |",
  ):
    assert s in rep, s
  assert os.path.getsize(os.path.join(out, "score_hist.png")) > 1000
  assert summary["num_store_rejects"] == 1 and summary["num_ranked"] == len(valid)


def test_end_to_end_token_level_top_n_and_k(tmp_path, data_path):
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  out = str(tmp_path / "out")
  selection.run(select_cfg(scores_dir=sdir, level="token", prompt_index=2, top_n=3, output_dir=out))
  rows = read_jsonl(os.path.join(out, "scores.jsonl"))
  # Token level uses only prompt 2: samples 5 (nan in prompt 1) and 8 (zero
  # mass in prompt 0) are rankable; the unusable cells show as null.
  assert all(r["rank"] is not None for r in rows)
  by_idx = {r["sample_index"]: r for r in rows}
  assert by_idx[5]["token_scores"][1] is None and by_idx[5]["sentence_score"] is None
  assert by_idx[8]["token_scores"][0] is None
  valid = [r["sample_index"] for r in rows if r["rank"] is not None]
  want = {i: ref_token_paper(crafted_probs(_src(i))[2]) for i in valid}
  assert valid == sorted(want, key=lambda i: (-want[i], i))
  assert sum(r["selected"] for r in rows) == 3
  # k=2: sentence level over the first two prompts only; sample 5 (nan in prompt 1) still bad.
  out2 = str(tmp_path / "out2")
  selection.run(select_cfg(scores_dir=sdir, k=2, output_dir=out2))
  rows = read_jsonl(os.path.join(out2, "scores.jsonl"))
  for r in rows:
    assert len(r["token_scores"]) == 2
    if r["rank"] is not None:
      assert r["score"] == pytest.approx(
          _expected_sentence(r["sample_index"], "paper", 0.2, k=2), rel=1e-12
      )
  assert {r["sample_index"] for r in rows if r["rank"] is None} == {5, 8}


def test_end_to_end_model_level(tmp_path, data_path):
  a = write_score_dir(tmp_path, "small", data_path, 7_000_000_000)
  b = write_score_dir(tmp_path, "big", data_path, 13_000_000_000, skip=(2,), model_shift=0.01)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="level"):
    selection.run(select_cfg(scores_dir=f"{a},{b}", output_dir=out))
  summary = selection.run(
      select_cfg(scores_dir=f"{a},{b}", level="model", output_dir=out, allow_partial=True)
  )
  assert summary["models"] == ["small", "big"] and summary["weights"] == [7e9, 13e9]
  rows = read_jsonl(os.path.join(out, "scores.jsonl"))
  by_idx = {r["sample_index"]: r for r in rows}
  assert by_idx[2]["reject_reason"] == "missing_scores:big"
  assert by_idx[5]["reject_reason"] == "nonfinite_probs:small"

  def sent(i, shift):
    p = crafted_probs(i, shift)
    return ref_sentence([ref_token_paper(v) for v in p], 0.2)

  for i in (0, 1, 12):
    r = by_idx[i]
    s_small, s_big = sent(i, 0.0), sent(i, 0.01)
    assert r["sentence_score"]["small"] == pytest.approx(s_small, rel=1e-12)
    assert r["sentence_score"]["big"] == pytest.approx(s_big, rel=1e-12)
    assert r["model_score"] == pytest.approx((7 * s_small + 13 * s_big) / 20, rel=1e-12)
    assert r["score"] == r["model_score"]
    assert set(r["token_scores"]) == {"small", "big"}
  # Explicit (released-style) weights, code mode.
  out2 = str(tmp_path / "out2")
  summary = selection.run(
      select_cfg(
          scores_dir=f"{a},{b}",
          level="model",
          mode="code",
          weights="7/20,13/20",
          output_dir=out2,
          allow_partial=True,
      )
  )
  r = {x["sample_index"]: x for x in read_jsonl(os.path.join(out2, "scores.jsonl"))}[0]
  sa = ref_sentence([ref_token_code(v) for v in crafted_probs(0)], 0.2)
  sb = ref_sentence([ref_token_code(v) for v in crafted_probs(0, 0.01)], 0.2)
  assert r["model_score"] == pytest.approx((0.35 * sa + 0.65 * sb) / 1.0, rel=1e-12)


def test_missing_input_data_still_ranks(tmp_path, data_path):
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  os.remove(data_path)
  out = str(tmp_path / "out")
  summary = selection.run(select_cfg(scores_dir=sdir, output_dir=out))
  assert "selected" not in summary["outputs"]
  assert any("not found" in n for n in summary["notes"])
  rows = read_jsonl(os.path.join(out, "scores.jsonl"))
  # Without the records the axis is the stored sample indices (7 stored once as 6).
  assert sorted(r["sample_index"] for r in rows) == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12]
  assert os.path.exists(os.path.join(out, "report.md"))


def test_cli_subprocess(tmp_path, data_path):
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  out = str(tmp_path / "cli_out")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
      sys.executable,
      "-m",
      "selectit_jax.select",
      "--config=configs/select.py",
      f"--config.scores_dir={sdir}",
      "--config.mode=paper",
      "--config.level=sentence",
      "--config.alpha=0.2",
      "--config.proportion=0.2",
      f"--config.output_dir={out}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = read_jsonl(os.path.join(out, "scores.jsonl"))
  ranked = [r for r in rows if r["rank"] is not None]
  assert len(ranked) == 10 and sum(r["selected"] for r in rows) == 2  # floor(10 * 0.2)
  with open(os.path.join(out, "selected.json"), encoding="utf-8") as f:
    assert [x["id"] for x in json.load(f)] == [r["sample_id"] for r in ranked[:2]]
  assert os.path.exists(os.path.join(out, "report.md"))
  # The selection step must not load (or even import) a model.
  probe = (
      "import sys, selectit_jax.select; "
      'bad = [m for m in sys.modules if m.startswith(("selectit_jax.models.llama", '
      '"selectit_jax.checkpoints", "selectit_jax.checkpoints.tokenizer", "torch", "transformers"))]; '
      "assert not bad, bad"
  )
  res = subprocess.run(
      [sys.executable, "-c", probe], cwd=repo, env=env, capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stderr[-3000:]


def _report(out):
  with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
    return f.read()


def test_count_from_input_counts_unrankable_samples(tmp_path, data_path):
  """12 readable samples, 9 rankable (5, 8 bad; 11 unscored): floor(N * 0.5) is 4 from the
  rankable ones (default) and 6 from all input samples."""
  sdir = write_score_dir(tmp_path, "m", data_path, 1000, skip=(11,))
  summary = selection.run(
      select_cfg(
          scores_dir=sdir, proportion=0.5, allow_partial=True, output_dir=str(tmp_path / "a")
      )
  )
  assert (summary["num_counted"], summary["num_selected"], summary["count_from"]) == (
      9,
      4,
      "rankable",
  )
  assert (
      "- N of floor(N * proportion): 9 (ranked samples only; unrankable ones do not "
      "count; count_from=rankable)"
  ) in _report(tmp_path / "a")
  summary = selection.run(
      select_cfg(
          scores_dir=sdir,
          proportion=0.5,
          count_from="input",
          allow_partial=True,
          output_dir=str(tmp_path / "b"),
      )
  )
  assert (summary["num_counted"], summary["num_selected"]) == (12, 6)
  assert sum(r["selected"] for r in read_jsonl(tmp_path / "b" / "scores.jsonl")) == 6
  assert "N of floor(N * proportion): 12 (input samples, unrankable ones included" in _report(
      tmp_path / "b"
  )
  # Never more than the rankable samples.
  summary = selection.run(
      select_cfg(
          scores_dir=sdir,
          proportion=1.0,
          count_from="input",
          allow_partial=True,
          output_dir=str(tmp_path / "c"),
      )
  )
  assert (summary["num_counted"], summary["num_selected"]) == (12, 9)
  with pytest.raises(ValueError, match="count_from"):
    selection.run(
        select_cfg(
            scores_dir=sdir,
            count_from="records",
            allow_partial=True,
            output_dir=str(tmp_path / "d"),
        )
    )


def test_cut_inside_equal_scores_warns(tmp_path, data_path, caplog):
  """Samples 1, 4 and 9 score equal: a cut between them is decided by the tie-break alone."""
  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  summary = selection.run(select_cfg(scores_dir=sdir, output_dir=str(tmp_path / "all")))
  rank = {r["sample_index"]: r["rank"] for r in read_jsonl(tmp_path / "all" / "scores.jsonl")}
  first = min(rank[1], rank[4], rank[9])
  assert sorted((rank[1], rank[4], rank[9])) == [first, first + 1, first + 2]
  with caplog.at_level("WARNING"):
    summary = selection.run(
        select_cfg(scores_dir=sdir, top_n=first + 1, output_dir=str(tmp_path / "tie"))
    )
  assert (summary["num_tied_at_cut"], summary["num_tied_dropped"]) == (3, 2)
  assert "group of 3 samples with equal score" in summary["warnings"][0]
  assert any("group of 3 samples with equal score" in r.getMessage() for r in caplog.records)
  assert "**Warning**: the cut falls inside a group of 3 samples" in _report(tmp_path / "tie")
  # The group wholly kept, or wholly dropped (top_n=0 is off, so proportion 0 drops all).
  for n, cut in enumerate(
      (dict(top_n=first + 3), dict(top_n=first) if first else dict(proportion=0.0))
  ):
    summary = selection.run(select_cfg(scores_dir=sdir, output_dir=str(tmp_path / f"c{n}"), **cut))
    assert summary["num_tied_at_cut"] == 0 and not summary["warnings"]
    assert "**Warning**: the cut" not in _report(tmp_path / f"c{n}")


def test_truncated_samples_are_counted(tmp_path, data_path):
  sdir = write_score_dir(tmp_path, "m", data_path, 1000, truncated=(2, 6, 12))
  summary = selection.run(
      select_cfg(scores_dir=sdir, proportion=0.5, output_dir=str(tmp_path / "out"))
  )
  rows = {r["sample_index"]: r for r in read_jsonl(tmp_path / "out" / "scores.jsonl")}
  # 7 repeats 6's text: stored once, as 6, so it shares the cut.
  assert {i for i, r in rows.items() if r["truncated"]} == {2, 6, 7, 12}
  chosen = {i for i, r in rows.items() if r["selected"] and r["truncated"]}
  assert summary["num_truncated"] == 4 and summary["num_selected_truncated"] == len(chosen)
  assert f"- truncated to engine.max_tokens while scoring: 4 (selected: {len(chosen)})" in _report(
      tmp_path / "out"
  )


def test_select_counts_rejects_of_the_covered_records_only(tmp_path, data_path):
  """A dir whose rejects.jsonl still holds an earlier, longer run's rejects (written before
  it was rewritten per run) counts only those of the records its manifest covers."""
  from selectit_jax.data import records as records_lib
  from selectit_jax.scoring import manifest as manifest_lib
  from selectit_jax.scoring import store as store_lib

  sdir = write_score_dir(tmp_path, "m", data_path, 1000)
  st = store_lib.ScoreStore(sdir)
  man = st.read_manifest()
  st.write_manifest(
      manifest_lib.Manifest(
          data=man.data,
          template=man.template,
          prompts=man.prompts,
          models=man.models,
          runs=[manifest_lib.RunEntry("m", tuple(man.prompts), 6, 6)],
      )
  )
  records_lib.write_rejects(
      st.rejects_path,
      [
          records_lib.Reject(3, "s3", "empty response"),
          records_lib.Reject(9, "s9", "900 tokens with prompt 0, more than engine.max_tokens=512"),
      ],
  )
  summary = selection.run(select_cfg(scores_dir=sdir, output_dir=str(tmp_path / "out")))
  assert summary["num_store_rejects"] == 1 and summary["num_samples"] == 5
  assert any(
      "1 rejects in rejects.jsonl are of records beyond the 6" in n for n in summary["notes"]
  )
  assert "max_tokens=512" not in _report(tmp_path / "out")
