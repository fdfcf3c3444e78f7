"""`score`: records -> rating texts -> batched forward passes -> the Parquet score store."""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from absl import logging
from tqdm import tqdm

from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.scoring import engine
from selectit_jax.parallel import memory
from selectit_jax.data import prompts as prompts_lib
from selectit_jax.data import records as records_lib
from selectit_jax.selection import report
from selectit_jax.parallel import sharding
from selectit_jax.scoring import store as store_lib
from selectit_jax.checkpoints.tokenizer import load_tokenizer, rating_token_ids


@dataclasses.dataclass
class Summary:
  scored_rows: int = 0       # new rows this process wrote
  rated_rows: int = 0        # texts run through the model (whole batches, for throughput)
  skipped_rows: int = 0      # already in the store (resume)
  rejected: int = 0
  truncated_rows: int = 0
  tokens: int = 0             # tokens of the rated texts
  row_tokens: int = 0         # of them in the batch rows (not in a shared prefix)
  padded_tokens: int = 0      # row slots, padding included
  wall_seconds: float = 0.0
  loop_seconds: float = 0.0  # the rating loop alone (no loading, no tokenization)
  compile_seconds: float = 0.0
  compiled_shapes: int = 0
  digit_mass_mean: float = float("nan")
  digit_mass_min: float = float("nan")

  def lines(self) -> list[str]:
    steady = max(self.loop_seconds - self.compile_seconds, 1e-9)
    out = [f"scored {self.scored_rows} texts ({self.skipped_rows} already stored), "
           f"rejected {self.rejected} records, truncated {self.truncated_rows} texts",
           f"wall {self.wall_seconds:.1f}s, of it rating {self.loop_seconds:.1f}s (first calls "
           f"incl. compile {self.compile_seconds:.1f}s, {self.compiled_shapes} shapes); "
           f"{self.tokens / max(self.loop_seconds, 1e-9):.0f} tok/s overall, "
           f"{self.tokens / steady:.0f} tok/s steady; padding "
           f"{1 - self.row_tokens / max(self.padded_tokens, 1):.1%}, "
           f"{1 - self.row_tokens / max(self.tokens, 1):.1%} of the tokens in shared prefixes"]
    if self.rated_rows:
      out.append(f"digit mass (P(1..5) summed): mean {self.digit_mass_mean:.3f}, "
                 f"min {self.digit_mass_min:.3g}")
    return out


def resolve_paths(config):
  """Fills the embedded defaults for an empty model or data path."""
  model_path = config.model.path or assets.default_gguf_path()
  data_path = config.data.path or assets.default_sharegpt_path()
  return model_path, data_path


def check_same_input(store: store_lib.ScoreStore, data_cfg) -> None:
  """A scores dir holds the scores of one input: `select` re-reads the input its manifest
  names, so scoring other data into it would silently hide the earlier samples. Only
  `limit` may change (to extend or shorten a run over the same file)."""
  previous = store.read_manifest()
  if previous is None:
    return
  before = dict(previous["config"]["data"], path=previous["data"]["path"])
  now = data_cfg.to_dict()
  changed = sorted(k for k in set(before) | set(now)
                   if k != "limit" and before.get(k) != now.get(k))
  if changed:
    diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
    raise ValueError(f"{store.dir} holds scores of other input data ({diff}); "
                     "score it into a new output_dir")


def run(config) -> Summary:
  """Scores config.data with config.model into config.output_dir (resumable)."""
  if not config.output_dir:
    raise ValueError("set --config.output_dir")
  start = time.perf_counter()
  model_path, data_path = resolve_paths(config)
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.path = data_path
  records, rejects, info = records_lib.read_records(data_cfg)
  logging.info("read %d records from %s (%d rejected%s)", info.num_read, data_path,
               info.num_rejected,
               f", incomplete tail at byte {info.truncated_at}" if info.truncated_at else "")
  template = prompts_lib.template_from_config(config.prompts)
  prompts = prompts_lib.prompts_from_config(config.prompts)
  store = store_lib.ScoreStore(config.output_dir, jax.process_index())
  check_same_input(store, data_cfg)

  mesh = sharding.make_mesh(config.mesh)
  # Refuse a run that cannot fit before reading any weights.
  memory.check_config(config, model_path, mesh)
  model = checkpoints.load_model(model_path, mesh, dtype=config.model.dtype,
                                 param_dtype=config.model.param_dtype)
  tokenizer = load_tokenizer(model_path)
  model_key = f"{config.model.name}@{model.fingerprint}"
  logging.info("model %s: %s, θ=%d", model_key, model_path, model.num_params)

  items, too_long = engine.prepare(records, prompts, template, tokenizer,
                                   config.engine.max_tokens, config.engine.too_long)
  rejects = list(rejects) + too_long
  lead = jax.process_index() == 0  # shared files (rejects, manifest) have one writer
  if lead:
    store.append_rejects(rejects)
  manifest = {
      "config": config.to_dict(),
      "data": {"path": data_path, "format": info.format or config.data.format,
               "container": info.container, "num_read": info.num_read,
               "truncated_at": info.truncated_at},
      "model": {"name": config.model.name, "key": model_key, "path": model_path,
                "fingerprint": model.fingerprint, "num_params": model.num_params},
      "prompts": prompts, "prompt_hashes": [prompts_lib.prompt_hash(p, template) for p in prompts],
      "template": template,
  }
  if lead:
    store.write_manifest(manifest)
  summary = Summary(rejected=len(rejects), truncated_rows=sum(it.truncated for it in items))
  if not items:
    logging.warning("nothing to score")
    return summary

  plan = engine.plan(items, config.engine, model.config)
  batches = plan.batches
  stored = store.stored_keys()
  pending = np.array([any((it.content_hash, model_key, it.prompt_hash) not in stored
                          for it in b.items) for b in batches])
  if jax.process_count() > 1:
    # Every process must run the same steps: process 0's view of the shared store decides,
    # read before anyone writes (the broadcast is a barrier).
    pending = np.asarray(multihost_utils.broadcast_one_to_all(pending))
  todo = [b for b, p in zip(batches, pending) if p]
  summary.skipped_rows = sum((it.content_hash, model_key, it.prompt_hash) in stored
                             for it in items)
  logging.info("%d texts in %d batches (buckets %s, shared prefixes %s tokens); %d batches "
               "to run", len(items), len(batches), plan.buckets,
               [len(p) for p in plan.prefixes], len(todo))

  rating_ids = rating_token_ids(tokenizer, prompts_lib.build_text(prompts[0], "", "", template))
  scorer = engine.Scorer(model.config, model.params, rating_ids, mesh, config.engine.batch_size,
                         plan.prefixes)
  logging.info("shared prefixes prefilled in %.1fs (compile included)", scorer.prefill_seconds)
  owned = scorer.owned_rows()
  rows, masses = [], []
  loop_start = time.perf_counter()
  bar = tqdm(todo, desc="scoring", unit="batch", disable=jax.process_index() != 0)
  for batch in bar:
    batch_rows = engine.pad_batch(batch, config.engine.batch_size, config.engine.max_segments,
                                  tokenizer.pad_id)
    probs, lse = scorer(batch_rows)
    for r, it in enumerate(batch.items):
      masses.append(probs[r].sum())
      if (not owned[batch_rows.item_row[r]]
          or (it.content_hash, model_key, it.prompt_hash) in stored):
        continue
      summary.scored_rows += 1
      rows.append(dict(sample_id=it.sample_id, sample_index=it.sample_index,
                       content_hash=it.content_hash, model=model_key,
                       num_params=model.num_params, prompt_index=it.prompt_index,
                       prompt_hash=it.prompt_hash, probs=probs[r], logsumexp=lse[r],
                       num_tokens=len(it.ids)))
    summary.rated_rows += len(batch.items)
    summary.tokens += batch.real_tokens
    summary.row_tokens += batch.row_tokens
    summary.padded_tokens += batch_rows.tokens.size
    # Whole batches only: a resumed run then replays exactly the batches not yet stored.
    if len(rows) >= config.engine.shard_rows:
      store.write_shard(rows)
      rows = []
    elapsed = bar.format_dict["elapsed"] or 1e-9
    bar.set_postfix(samples_s=f"{summary.rated_rows / elapsed:.1f}",
                    tok_s=f"{summary.tokens / elapsed:.0f}")
  store.write_shard(rows)

  summary.loop_seconds = time.perf_counter() - loop_start
  summary.wall_seconds = time.perf_counter() - start
  summary.compile_seconds = scorer.compile_seconds
  summary.compiled_shapes = len(scorer.compiled_shapes)
  if masses:
    summary.digit_mass_mean, summary.digit_mass_min = float(np.mean(masses)), float(np.min(masses))
    if summary.digit_mass_mean < report.LOW_MASS_WARN:
      logging.warning("mean digit mass %.3f is low: the model mostly does not answer with a "
                      "digit, so its ratings carry little signal", summary.digit_mass_mean)
  for line in summary.lines():
    logging.info("%s", line)
  return summary
