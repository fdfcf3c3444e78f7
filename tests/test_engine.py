"""The rating engine: batching, buckets, truncation; probabilities independent of batching."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selectit_jax.models import costs
from selectit_jax import checkpoints
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine
from selectit_jax.data import prompts
from selectit_jax.data import records
from selectit_jax.parallel import sharding
from selectit_jax.models import llama as model_lib
from selectit_jax.checkpoints.tokenizer import load_tokenizer, rating_token_ids

ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def _record(i, instruction, response):
  return records.Record(id=f"r{i}", index=i, instruction=instruction, response=response, raw={})


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
  return checkpoints.load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)


def _score(model, tok, items, batch_size, buckets, prefixes=(), segments=1):
  mesh = sharding.make_mesh(ONE_DEVICE, jax.devices()[:1])
  digits = rating_token_ids(tok, prompts.build_text(prompts.default_prompts()[0], "", ""))
  scorer = engine.Scorer(
      model.config, model.params, digits, mesh, batch_size, prefixes, segments, tok.pad_id
  )
  out = {}
  for rated in scorer.rate(batching.plan_batches(items, batch_size, buckets, prefixes, segments)):
    for it, p, lse in zip(rated.batch.items, rated.probs, rated.logsumexp):
      out[(it.sample_index, it.prompt_index)] = (p, lse)
  return out, scorer


def _random_items(tok, num_records, num_prompts=3):
  rng = np.random.default_rng(0)
  words = "the sea is wide and deep poem write about waves sugar plants light".split()
  recs = [
      _record(
          i,
          " ".join(rng.choice(words, rng.integers(2, 30))),
          " ".join(rng.choice(words, rng.integers(1, 60))),
      )
      for i in range(num_records)
  ]
  items, rejects = batching.prepare(
      recs, prompts.default_prompts()[:num_prompts], prompts.DEFAULT_TEMPLATE, tok, max_tokens=512
  )
  assert not rejects
  return items


def test_probs_do_not_depend_on_batching_packing_or_prefix_cache(tiny):
  """Batch sizes and buckets, texts packed several to a row or not, with and without each
  prompt's shared prefix computed once (prompts of different prefix lengths share batches)."""
  model, tok = tiny
  items = _random_items(tok, 9)
  assert len({len(it.ids) for it in items}) > 10
  prefixes = batching.shared_prefixes(items)
  assert len({len(p) for p in prefixes}) == 3 and min(map(len, prefixes)) > 10
  results = {}
  for batch_size, buckets, prefix, segments in (
      (1, [512], (), 1),
      (8, [64, 128, 256, 512], (), 1),
      (13, [80, 512], (), 1),
      (1, [512], prefixes, 1),
      (8, [48, 96, 512], prefixes, 1),
      (2, [96, 512], prefixes, 4),
      (3, [512], (), 8),
  ):
    key = (batch_size, bool(prefix), segments)
    results[key], scorer = _score(model, tok, items, batch_size, buckets, prefix, segments)
    assert {s[1] for s in scorer.compiled_shapes} <= set(buckets)
    assert len(results[key]) == len(items)
  assert max(len(row) for b in batching.plan_batches(items, 3, [512], (), 8) for row in b.rows) >= 3
  for key, (p1, l1) in results[(1, False, 1)].items():
    for other in results:
      p, l = results[other][key]
      np.testing.assert_allclose(p, p1, atol=1e-6, rtol=0)
      np.testing.assert_allclose(l, l1, atol=1e-5, rtol=0)
  assert all(0 < p.sum() <= 1 for p, _ in results[(1, False, 1)].values())


def test_shared_prefixes_are_exact_and_leave_the_last_token():
  item = lambda k, ids: batching.WorkItem(0, "r", "c", k, "h", tuple(ids))
  items = [
      item(0, [5, 6, 7, 8]),
      item(0, [5, 6, 9]),
      item(1, [5, 6, 7]),
      item(2, [1, 2]),
      item(2, [1, 2, 3]),
  ]
  assert batching.shared_prefixes(items) == ((5, 6), (5, 6), (1,))
  assert batching.shared_prefixes([item(1, [4])]) == ((), ())
  batches = batching.plan_batches(items, 2, [4], batching.shared_prefixes(items))
  rows = [engine.pad_batch(b, 2, 1, 0) for b in batches]
  assert [r.tokens[:, :2].tolist() for r in rows] == [
      [[9, 0], [7, 0]],
      [[2, 0], [7, 8]],
      [[2, 3], [0, 0]],
  ]
  assert [r.prompt.tolist() for r in rows] == [[0, 1], [2, 0], [2, 0]]


def test_packing_fills_rows_best_fit_and_lays_out_segments():
  item = lambda i, k, n: batching.WorkItem(i, f"r{i}", f"c{i}", k, "h", tuple(range(10, 10 + n)))
  items = [item(0, 0, 9), item(1, 0, 5), item(2, 0, 4), item(3, 0, 3), item(4, 1, 2), item(5, 0, 2)]
  rows = batching.pack_rows(items, [8, 16], (), max_segments=3)
  # Longest first: 9 opens a 16-row (7 free), 5 joins it (2 free); 4 opens an 8-row, 3 takes
  # its best fit (the 8-row, 4 free); 2 fills the 16-row; prompt 1's text gets its own row.
  layout = {(b, tuple(it.sample_index for it in row)) for b, row in rows}
  assert layout == {(16, (0, 1, 5)), (8, (2, 3)), (8, (4,))}
  batch = batching.plan_batches(items, 2, [8, 16], (), max_segments=3)[1]
  r = engine.pad_batch(batch, 2, 3, pad_id=0)
  assert r.tokens.shape == (2, 16) and r.last.shape == (2, 3)
  assert r.segments[0].tolist() == [1] * 9 + [2] * 5 + [3] * 2
  assert r.positions[0].tolist() == list(range(9)) + list(range(5)) + list(range(2))
  assert r.last[0].tolist() == [8, 13, 15] and r.item_slot.tolist() == [0, 1, 2]


def test_fit_buckets_chooses_shapes_for_packed_rows():
  """Texts of 100, 50, 50, 40, 40 tokens in two shapes. Fitting the texts gives {50, 100}:
  the 40s each pad a 50-row (300 tokens planned). Fitting the packed rows finds {40, 100}:
  the two 50s share a 100-row, no padding at all (280)."""
  item = lambda i, n: batching.WorkItem(i, f"r{i}", f"c{i}", 0, "h", tuple(range(n)))
  items = [item(i, n) for i, n in enumerate([100, 50, 50, 40, 40])]
  start = batching.choose_buckets([len(it.ids) for it in items], 2, 10, 100)
  assert start == [50, 100]
  tokens = lambda length, prefix: length
  planned = lambda buckets: sum(b.length for b in batching.plan_batches(items, 1, buckets, (), 8))
  assert planned(start) == 300
  fitted = batching.fit_buckets(items, start, 1, (), 8, 10, tokens)
  assert fitted == [40, 100] and planned(fitted) == 280
  # Subsampled search (every other sample) still keeps the largest shape for the longest text.
  assert batching.fit_buckets(items, start, 1, (), 8, 10, tokens, max_items=3)[-1] == 100


def test_row_flops_matches_what_xla_compiles():
  """The cost model's FLOPs of a row (blocked attention as it runs, with its masked pairs)
  against XLA's own count of the compiled forward: within 2 % (XLA adds the elementwise ops),
  for query blocks and for the full square, which differ by 7 %."""
  cfg = model_lib.LlamaConfig(
      vocab_size=64,
      hidden_size=256,
      intermediate_size=512,
      num_layers=1,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      attention_block=128,
  )
  tokens = jnp.zeros((1, 300), jnp.int32)
  positions = jnp.arange(300)[None]
  for c in (cfg, dataclasses.replace(cfg, attention_block=0)):
    model = model_lib.Llama(c)
    params = model.init(jax.random.PRNGKey(0), tokens, positions, tokens + 1)
    forward = jax.jit(lambda p, t, model=model: model.apply(p, t, positions, t + 1))
    analysis = forward.lower(params, tokens).compile().cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    assert xla_flops == pytest.approx(costs.row_flops(c, 300), rel=0.02)


def _brute_force_padding(lengths, max_shapes, multiple, max_tokens):
  rounded = sorted({min(-(-n // multiple) * multiple, max_tokens) for n in lengths})
  best = None
  for s in range(1, max_shapes + 1):
    for combo in itertools.combinations(rounded, s):
      if combo[-1] != rounded[-1]:
        continue
      pad = sum(next(b for b in combo if b >= min(n, max_tokens)) - n for n in lengths)
      best = pad if best is None else min(best, pad)
  return best


@pytest.mark.parametrize("seed", range(4))
def test_choose_buckets_minimises_padding(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, 300, 40).tolist()
  buckets = batching.choose_buckets(lengths, max_shapes=3, multiple=16, max_tokens=320)
  assert len(buckets) <= 3 and buckets[-1] >= max(lengths)
  pad = sum(next(b for b in buckets if b >= n) - n for n in lengths)
  assert pad == _brute_force_padding(lengths, 3, 16, 320)


def test_truncation_keeps_the_closing_line(tiny):
  _, tok = tiny
  prompt = prompts.default_prompts()[0]
  long = _record(0, "Write a poem about the sea.", "The sea is wide and deep. " * 200)
  items, rejects = batching.prepare([long], [prompt], prompts.DEFAULT_TEMPLATE, tok, max_tokens=120)
  assert not rejects and len(items) == 1 and items[0].truncated
  assert 100 < len(items[0].ids) <= 120
  text = tok.decode(items[0].ids)
  assert text.endswith("\nThe answer is: \n") and "Instruction:Write a poem" in text


def _parts(tok, item):
  """(instruction, response) of a rated text, read back from its tokens."""
  text = tok.decode(item.ids)
  assert text.endswith("\nThe answer is: \n")
  instruction, response = text.split("\nInstruction:", 1)[1].split("\nResponse:", 1)
  return instruction, response[: -len("\nThe answer is: \n")]


def test_one_cut_for_all_prompts(tiny):
  """Prompts of different lengths rate the same cut text, fitted under the tightest prompt;
  the response is cut first, down to half the budget, then the instruction."""
  _, tok = tiny
  ps = prompts.default_prompts()[:4]
  frames = [len(tok.encode(prompts.build_text(p, "", ""))) for p in ps]
  assert len(set(frames)) > 1
  cases = {
      0: ("Write a poem about the sea.", "The sea is wide and deep. " * 200),
      1: ("Explain the sea. " * 200, "It is wide."),
      2: ("Explain the sea. " * 200, "The sea is wide and deep. " * 200),
  }
  recs = [_record(i, *texts) for i, texts in cases.items()]
  items, rejects = batching.prepare(recs, ps, prompts.DEFAULT_TEMPLATE, tok, max_tokens=200)
  assert not rejects and len(items) == 3 * len(ps) and all(it.truncated for it in items)
  for i, (instruction, response) in cases.items():
    mine = [it for it in items if it.sample_index == i]
    assert max(len(it.ids) for it in mine) <= 200
    parts = {_parts(tok, it) for it in mine}
    assert len(parts) == 1, parts  # the same instruction and response under every prompt
    ((cut_ins, cut_res),) = parts
    assert instruction.startswith(cut_ins) and response.startswith(cut_res)
    n_ins, n_res = len(tok.token_ends(cut_ins)), len(tok.token_ends(cut_res))
    budget = 200 - max(frames)
    if i == 0:  # short instruction: kept whole, the response fills the rest
      assert cut_ins == instruction and n_res > budget - n_ins - 8
    elif i == 1:  # short response: kept whole, the instruction cut
      assert cut_res == response and n_ins > budget - n_res - 8
    else:  # both long: the response keeps half the budget
      assert abs(n_res - budget // 2) <= 4 and n_ins > budget // 2 - 8


def test_split_budget():
  assert batching.split_budget(10, 500, 100) == (10, 90)
  assert batching.split_budget(500, 10, 100) == (90, 10)
  assert batching.split_budget(500, 500, 100) == (50, 50)
  assert batching.split_budget(30, 40, 100) == (30, 40)
  assert batching.split_budget(5, 5, -3) == (0, 0)


def test_too_long_records_are_truncated_or_rejected_whole(tiny):
  _, tok = tiny
  recs = [
      _record(0, "short", "fine"),
      _record(1, "Explain. " * 300, "ok"),
      _record(2, "short", "long answer " * 300),
  ]
  ps = prompts.default_prompts()[:2]
  items, rejects = batching.prepare(recs, ps, prompts.DEFAULT_TEMPLATE, tok, max_tokens=150)
  # An instruction alone over the budget is cut too, not rejected.
  assert not rejects and {it.sample_index for it in items} == {0, 1, 2}
  assert [it.truncated for it in items] == [False, False, True, True, True, True]
  assert all(len(it.ids) <= 150 for it in items)
  assert _parts(tok, items[2])[1] == "ok"
  items, rejects = batching.prepare(
      recs, ps, prompts.DEFAULT_TEMPLATE, tok, max_tokens=150, too_long="reject"
  )
  assert {it.sample_index for it in items} == {0}
  assert [r.index for r in rejects] == [1, 2] and "engine.max_tokens=150" in rejects[1].reason
  # Only a prompt and template that alone exceed the budget reject a record when truncating.
  items, rejects = batching.prepare(recs, ps, prompts.DEFAULT_TEMPLATE, tok, max_tokens=20)
  assert not items and [(r.index, "alone exceed" in r.reason) for r in rejects] == [
      (0, True),
      (1, True),
      (2, True),
  ]


def test_batch_size_must_divide_over_the_mesh(tiny):
  model, tok = tiny
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=1), jax.devices()[:4])
  with pytest.raises(ValueError, match="batch_size=6 is not a multiple"):
    engine.Scorer(model.config, model.params, np.arange(5), mesh, 6)


def test_repeated_texts_are_rated_once_and_share_rejects(tiny):
  _, tok = tiny
  recs = [
      _record(0, "short", "fine"),
      _record(1, "Explain. " * 300, "ok"),
      _record(2, "short", "fine"),
      _record(3, "Explain. " * 300, "ok"),
  ]
  items, rejects = batching.prepare(
      recs,
      prompts.default_prompts()[:2],
      prompts.DEFAULT_TEMPLATE,
      tok,
      max_tokens=150,
      too_long="reject",
  )
  assert [(it.sample_index, it.prompt_index) for it in items] == [(0, 0), (0, 1)]
  assert [r.index for r in rejects] == [1, 3] and rejects[0].reason == rejects[1].reason


def test_truncation_rule_is_a_model_setting():
  """A dir scored with the earlier per-prompt cut is refused rather than mixed with this one."""
  from configs import smollm2_135m
  from selectit_jax.scoring import manifest, runner

  config = smollm2_135m.get_config()
  assert runner.model_settings(config)["engine.truncation"] == "shared_cut"
  entry = lambda settings: manifest.Manifest(
      data={}, template="t", models=[manifest.ModelEntry("m", "m", "", "f", 1, settings)]
  )
  new = runner.model_settings(config)
  old = {k: v for k, v in new.items() if k != "engine.truncation"}
  with pytest.raises(ValueError, match="engine.truncation"):
    entry(old).check_compatible(entry(new))
  config.engine.too_long = "reject"  # unchanged by the cut: old reject dirs stay usable
  assert "engine.truncation" not in runner.model_settings(config)
