r"""Same-process A/B of the rating loop: waiting for each batch vs keeping the next in flight.

    python bench/bench_loop.py                      # bench_score's 16-record setting, 3 rounds

The texts, plan, compiled steps and weights are shared; only the loop differs, on the real
`runner.rate_into_store` path:
  A "waiting": each batch padded, run and read back before the next is padded, shards written
     inline (the loop before the pipelining);
  B "pipelined": `Scorer.rate` as it is (batch i+1 dispatched before batch i is read back) and
     `store.ShardWriter` (shards written on a background thread).
The plan's batches are cut into chunks; each chunk runs under A and B back to back, the order
alternating from chunk to chunk and round to round, so load changes on a shared machine hit both
alike. Prints seconds per side, tokens/s, B/A, the 1-minute load average, and checks that both
stored the same probabilities.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectit_jax import cli  # noqa: E402
from bench import common  # noqa: E402

_NUM_RECORDS = flags.DEFINE_integer("num_records", 16, "First N usable ShareGPT records.")
_K = flags.DEFINE_integer("k", 5, "Rating prompts per record.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file",
    os.path.normpath(
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "..",
            "shared",
            "reference",
            "rating_prompt.txt",
        )
    ),
    "Prompt file (released layout); '' = our own default prompts.",
)
_CONFIG = flags.DEFINE_string("config", "configs/smollm2_135m.py", "Scoring config.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Passes over the plan per side.")
_CHUNK = flags.DEFINE_integer("chunk", 6, "Batches per A/B chunk.")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 8, "Rows per shard (small: writes count).")


class _InlineWriter:
  """A's shard writer: `store.write_shard` in the loop, as before the background writer."""

  def __init__(self, store):
    self.store = store

  def submit(self, rows):
    self.store.write_shard(rows)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def _waiting_rate(scorer):
  """A's `Scorer.rate`: each batch read back before the next is padded."""
  from selectit_jax.scoring import engine

  def rate(batches):
    for batch in batches:
      start = time.perf_counter()
      arrays = engine.pad_batch(batch, scorer.batch_size, scorer.max_segments, scorer.pad_id)
      host_seconds = time.perf_counter() - start
      yield engine.Rated(batch, arrays, *scorer(arrays), host_seconds)

  return rate


def main(argv):
  del argv
  import numpy as np

  from selectit_jax import checkpoints
  from selectit_jax.parallel import sharding
  from selectit_jax.scoring import runner
  from selectit_jax.scoring import store as store_lib

  config = common.load_config(_CONFIG.value)
  work = common.bench_items(config, _NUM_RECORDS.value, _PROMPTS_FILE.value, _K.value)
  items, tokenizer, rating_ids = work["items"], work["tokenizer"], work["rating_ids"]
  model = checkpoints.load_model(work["model_path"])
  mesh = sharding.make_mesh(config.mesh)
  scorer, plan, _ = common.compiled_scorer(config, model, mesh, items, rating_ids, tokenizer.pad_id)
  pipelined_rate = scorer.rate
  chunks = [plan.batches[i : i + _CHUNK.value] for i in range(0, len(plan.batches), _CHUNK.value)]
  tokens = sum(b.real_tokens for b in plan.batches)
  print(
      f"[bench] {len(items)} texts, {tokens} tokens, {len(plan.batches)} batches in "
      f"{len(chunks)} chunks; load {os.getloadavg()[0]:.1f}",
      flush=True,
  )

  seconds = {"A waiting": 0.0, "B pipelined": 0.0}
  ratios, loads = [], []
  with tempfile.TemporaryDirectory(prefix="bench_loop_") as workdir:
    stores = {side: store_lib.ScoreStore(os.path.join(workdir, side[0])) for side in seconds}
    for r in range(_ROUNDS.value):
      for c, chunk in enumerate(chunks):
        took = {}
        order = list(seconds) if (r + c) % 2 == 0 else list(seconds)[::-1]
        for side in order:
          waiting = side.startswith("A")
          scorer.rate = _waiting_rate(scorer) if waiting else pipelined_rate
          writer = store_lib.ShardWriter
          store_lib.ShardWriter = _InlineWriter if waiting else writer
          try:
            start = time.perf_counter()
            runner.rate_into_store(
                scorer,
                chunk,
                stores[side],
                set(),
                "bench",
                model.num_params,
                _SHARD_ROWS.value,
                runner.Summary(),
            )
            took[side] = time.perf_counter() - start
          finally:
            store_lib.ShardWriter = writer
        for side, s in took.items():
          seconds[side] += s
        ratios.append(took["B pipelined"] / took["A waiting"])
      loads.append(os.getloadavg()[0])
      print(f"[bench] round {r + 1}: {seconds}, load {loads[-1]:.1f}", flush=True)
    tables = {
        side: st.read_table().sort_by(
            [("sample_index", "ascending"), ("prompt_index", "ascending")]
        )
        for side, st in stores.items()
    }
  probs = [
      np.asarray(t.column("probs").combine_chunks().flatten()).reshape(-1, 5)
      for t in tables.values()
  ]
  same = probs[0].shape == probs[1].shape and np.array_equal(probs[0], probs[1])
  a, b = seconds["A waiting"], seconds["B pipelined"]
  n = _ROUNDS.value
  print(
      f"\nA waiting:   {a:.1f} s ({n * tokens / a:.0f} tok/s)\n"
      f"B pipelined: {b:.1f} s ({n * tokens / b:.0f} tok/s)\n"
      f"B/A: {b / a:.3f} overall, per-chunk median {np.median(ratios):.3f} "
      f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} chunks); "
      f"1-minute load average after each round {', '.join(f'{x:.1f}' for x in loads)} "
      f"on {os.cpu_count()} cores; stored probabilities identical: {same}"
  )
  if not same:
    raise SystemExit("A and B stored different probabilities")


if __name__ == "__main__":
  cli.run_main(main)
