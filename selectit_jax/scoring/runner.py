"""`score`: records -> rating texts -> batched forward passes -> the Parquet score store."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from absl import logging
from tqdm import tqdm

from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.checkpoints.tokenizer import load_tokenizer, rating_token_ids
from selectit_jax.data import prompts as prompts_lib
from selectit_jax.data import records as records_lib
from selectit_jax.models import attention
from selectit_jax.parallel import devices
from selectit_jax.parallel import memory
from selectit_jax.parallel import sharding
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine
from selectit_jax.scoring import manifest as manifest_lib
from selectit_jax.scoring import store as store_lib
from selectit_jax.selection import report


@dataclasses.dataclass
class Summary:
  scored_rows: int = 0  # new rows this process wrote
  rated_rows: int = 0  # texts run through the model (whole batches, for throughput)
  skipped_rows: int = 0  # already in the store (resume)
  rejected: int = 0
  truncated_rows: int = 0
  truncated_samples: int = 0  # cut to engine.max_tokens (the same cut for all its texts)
  tokens: int = 0  # tokens of the rated texts
  row_tokens: int = 0  # of them in the batch rows (not in a shared prefix)
  padded_tokens: int = 0  # row slots, padding included
  wall_seconds: float = 0.0
  loop_seconds: float = 0.0  # the rating loop alone (no loading, no tokenization)
  compile_seconds: float = 0.0  # dispatches of new shapes (trace + compile; runs are async)
  compiled_shapes: int = 0
  digit_mass_mean: float = float("nan")
  digit_mass_min: float = float("nan")

  def lines(self) -> list[str]:
    steady = max(self.loop_seconds - self.compile_seconds, 1e-9)
    out = [
        f"scored {self.scored_rows} texts ({self.skipped_rows} already stored), "
        f"rejected {self.rejected} records, truncated {self.truncated_samples} samples "
        f"({self.truncated_rows} texts)",
        f"wall {self.wall_seconds:.1f}s, of it rating {self.loop_seconds:.1f}s (tracing and "
        f"compiling {self.compile_seconds:.1f}s, {self.compiled_shapes} shapes); "
        f"{self.tokens / max(self.loop_seconds, 1e-9):.0f} tok/s overall, "
        f"{self.tokens / steady:.0f} tok/s steady; padding "
        f"{1 - self.row_tokens / max(self.padded_tokens, 1):.1%}, "
        f"{1 - self.row_tokens / max(self.tokens, 1):.1%} of the tokens in shared prefixes",
    ]
    if self.rated_rows:
      out.append(
          f"digit mass (P(1..K) summed): mean {self.digit_mass_mean:.3f}, "
          f"min {self.digit_mass_min:.3g}"
      )
    return out


def model_settings(config) -> dict:
  """The settings besides the weights that change a stored probability: a dir's rows of one
  model key must all be made with the same ones (`Manifest.check_compatible`)."""
  e = config.engine
  settings = {
      "model.dtype": config.model.dtype,
      "model.param_dtype": config.model.param_dtype,
      "engine.max_tokens": int(e.max_tokens),
      "engine.too_long": e.too_long,
  }
  if e.too_long == "truncate":
    # Truncated rows made before the one shared cut (a cut per prompt, the response only)
    # mean other texts under the same keys: such a dir is refused, not silently reused.
    settings["engine.truncation"] = "shared_cut"
  return settings


def turn_counts(data_cfg, info: records_lib.ReadInfo) -> dict:
  """How many of the records read each turn policy accepts (chat formats; counted while
  reading), logged so a user sees what data.turns chose among."""
  if info.turn_counts:
    logging.info(
        "turn policies over the %d records read: %s (data.turns=%s)",
        info.num_read,
        ", ".join(f"{k} {v}" for k, v in info.turn_counts.items()),
        data_cfg.turns,
    )
  return info.turn_counts


def run_manifest(
    config,
    data_cfg,
    info: records_lib.ReadInfo,
    model_key: str,
    model: checkpoints.LoadedModel,
    model_path: str,
    prompts,
    template,
    scale: int = 5,
) -> manifest_lib.Manifest:
  """This run's manifest: what its rows will mean."""
  hashes = [prompts_lib.prompt_hash(p, template) for p in prompts]
  data = {k: data_cfg.get(k) for k in manifest_lib.DATA_KEYS if k in data_cfg}
  data.update(shape=info.format or data_cfg.format, container=info.container)
  entry = manifest_lib.ModelEntry(
      key=model_key,
      name=config.model.name,
      path=model_path,
      fingerprint=model.fingerprint,
      num_params=model.num_params,
      settings=model_settings(config),
  )
  run_entry = manifest_lib.RunEntry(
      model=model_key,
      prompt_hashes=tuple(hashes),
      limit=int(data_cfg.limit),
      num_read=info.num_read,
      truncated_at=info.truncated_at,
      turn_counts=turn_counts(data_cfg, info),
  )
  return manifest_lib.Manifest(
      data=data,
      template=template,
      scale=scale,
      prompts=dict(zip(hashes, prompts)),
      models=[entry],
      runs=[run_entry],
  )


def read_input(config):
  """(data config with the path resolved, records, rejects, ReadInfo)."""
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.path = assets.data_path(config.data)
  records, rejects, info = records_lib.read_records(data_cfg)
  logging.info(
      "read %d records from %s (%d rejected%s)",
      info.num_read,
      data_cfg.path,
      info.num_rejected,
      f", incomplete tail at byte {info.truncated_at}" if info.truncated_at else "",
  )
  return data_cfg, records, rejects, info


# What every process must agree on before the first scoring step, in digest order.
AGREEMENT_PARTS = ("input bytes", "records", "tokenizer", "prompts and template", "batch plan")


def plan_digest(plan: batching.Plan | None) -> bytes:
  """sha256 of everything a process will feed the jitted steps: the shared prefixes, the
  buckets and every batch's rows (sample, prompt, token ids, skips, length), in order."""
  h = hashlib.sha256()
  if plan is None:
    return h.digest()
  h.update(repr((plan.prefixes, tuple(plan.buckets))).encode())
  for b in plan.batches:
    h.update(repr((b.length, b.skips)).encode())
    for row in b.rows:
      for it in row:
        h.update(repr((it.sample_index, it.prompt_index, len(it.ids))).encode())
        h.update(np.ascontiguousarray(it.ids, "<i4").tobytes())
      h.update(b"|")  # row boundary
  return h.digest()


def _input_bytes_digest(info: records_lib.ReadInfo) -> bytes:
  """sha256 of the first `bytes_read` bytes of the input file (what parsing consumed); a
  non-file source (TFDS) is covered by the records digest alone."""
  h = hashlib.sha256(repr((info.format, info.container, info.num_read)).encode())
  if info.path and os.path.isfile(info.path):
    left = info.bytes_read
    with open(info.path, "rb") as f:
      while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
          break
        h.update(chunk)
        left -= len(chunk)
  return h.digest()


def _tokenizer_digest(tokenizer) -> bytes:
  """sha256 of the vocabulary and, for fast tokenizers, the whole pipeline (normalizer,
  pre-tokenizer, merges, post-processor) as serialised by the tokenizers library."""
  h = hashlib.sha256(repr(sorted(tokenizer.hf.get_vocab().items())).encode())
  backend = getattr(tokenizer.hf, "backend_tokenizer", None)
  if backend is not None:
    h.update(backend.to_str().encode())
  h.update(repr((tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)).encode())
  return h.digest()


def agreement_digests(info, records, tokenizer, prompts, template, plan) -> np.ndarray:
  """[len(AGREEMENT_PARTS), 32] uint8: one sha256 per part, in AGREEMENT_PARTS order."""
  rec = hashlib.sha256()
  for r in records:
    rec.update(repr((r.index, r.id, r.instruction, r.response)).encode())
  parts = (
      _input_bytes_digest(info),
      rec.digest(),
      _tokenizer_digest(tokenizer),
      hashlib.sha256(repr((tuple(prompts), template)).encode()).digest(),
      plan_digest(plan),
  )
  return np.frombuffer(b"".join(parts), np.uint8).reshape(len(parts), 32)


def differing_processes(gathered: np.ndarray) -> dict[int, list[str]]:
  """{process: the parts where its digests differ from process 0's} for [P, parts, 32]."""
  out = {}
  for p in range(1, gathered.shape[0]):
    parts = [
        AGREEMENT_PARTS[i]
        for i in range(gathered.shape[1])
        if (gathered[p, i] != gathered[0, i]).any()
    ]
    if parts:
      out[p] = parts
  return out


def check_processes_agree(digests: np.ndarray) -> None:
  """Every process must run the same steps on the same inputs: a host that read other data
  (a stale copy, a different --config.data.limit), another tokenizer or prompts would either
  hang a collective or store rows under keys that mean something else. All processes gather
  every digest, so all raise the same error (none is left waiting)."""
  if jax.process_count() == 1:
    return
  gathered = np.asarray(multihost_utils.process_allgather(digests))
  gathered = gathered.reshape(jax.process_count(), *digests.shape)
  bad = differing_processes(gathered)
  if bad:
    detail = "; ".join(f"process {p}: {', '.join(parts)}" for p, parts in sorted(bad.items()))
    raise ValueError(
        f"processes disagree with process 0 before scoring ({detail}): every host must read "
        f"the same data, tokenizer, prompts and config"
    )
  logging.info(
      "all %d processes agree on inputs, tokenizer, prompts and batch plan", jax.process_count()
  )


def pending_batches(plan: batching.Plan, stored: set, model_key: str) -> list[batching.Batch]:
  """The plan's batches with a text not yet stored. Multi-process: every process must run
  the same steps, so process 0's view of the shared store decides, read before anyone
  writes (the broadcast is a barrier)."""
  pending = np.array([any(it.key(model_key) not in stored for it in b.items) for b in plan.batches])
  if jax.process_count() > 1:
    pending = np.asarray(multihost_utils.broadcast_one_to_all(pending))
  return [b for b, p in zip(plan.batches, pending) if p]


def with_effective_batch(config, mesh):
  """config with engine.batch_size rounded up to a multiple of the mesh's data×fsdp (see
  sharding.effective_batch_size), so the plan, the memory check and the steps share it."""
  sizes = dict(mesh.shape)
  batch_size = sharding.effective_batch_size(config.engine.batch_size, sizes)
  if batch_size == config.engine.batch_size:
    return config
  logging.info("%s", memory.batch_note(config.engine.batch_size, batch_size, sizes))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.engine.batch_size = batch_size
  return config


def run(config) -> Summary:
  """Scores config.data with config.model into config.output_dir (resumable)."""
  if not config.output_dir:
    raise ValueError("set --config.output_dir")
  start = time.perf_counter()
  model_path = assets.model_path(config.model)
  batching.check_too_long(config.engine.too_long)  # before minutes of weight loading
  attention.resolve(config.engine.get("attention", "auto"))  # a kernel this platform lacks
  data_cfg, records, rejects, info = read_input(config)
  template = prompts_lib.template_from_config(config.prompts)
  prompts = prompts_lib.prompts_from_config(config.prompts)
  scale = prompts_lib.check_scale(config.prompts.get("scale", 5))
  store = store_lib.ScoreStore(config.output_dir, jax.process_index())

  mesh = sharding.make_mesh(config.mesh)
  config = with_effective_batch(config, mesh)
  # model.dtype 'auto' -> this platform's dtype, before the memory check, the loader and the
  # manifest (which records the dtype that ran).
  config = devices.resolve_dtypes(config, mesh.devices.flat[0].platform)
  # Refuse a run that cannot fit before reading any weights.
  memory.check_config(config, model_path, mesh)
  model = checkpoints.load_model(
      model_path,
      mesh,
      dtype=config.model.dtype,
      param_dtype=config.model.param_dtype,
      attention=config.engine.get("attention", "auto"),
  )
  tokenizer = load_tokenizer(model_path)
  model_key = f"{config.model.name}@{model.fingerprint}"
  logging.info("model %s: %s, θ=%d", model_key, model_path, model.num_params)
  this_run = run_manifest(
      config, data_cfg, info, model_key, model, model_path, prompts, template, scale
  )
  stored_manifest = store.read_manifest()
  manifest = stored_manifest.merged(this_run) if stored_manifest else this_run

  items, too_long = batching.prepare(
      records, prompts, template, tokenizer, config.engine.max_tokens, config.engine.too_long
  )
  rejects = list(rejects) + too_long
  plan = batching.make_plan(items, config.engine, model.config) if items else None
  # Before anything is written or any step runs (an empty plan included: a process with
  # nothing to score must not leave the others waiting).
  if jax.process_count() > 1:  # hashing every input byte and token id is for pods only
    check_processes_agree(agreement_digests(info, records, tokenizer, prompts, template, plan))
  if jax.process_index() == 0:  # shared files (rejects, manifest) have one writer
    store.write_rejects(rejects, info.num_read)
    store.write_manifest(manifest)
  summary = Summary(
      rejected=len(rejects),
      truncated_rows=sum(it.truncated for it in items),
      truncated_samples=len({it.sample_index for it in items if it.truncated}),
  )
  if not items:
    logging.warning("nothing to score")
    return summary

  stored = store.stored_keys()
  todo = pending_batches(plan, stored, model_key)
  summary.skipped_rows = sum(it.key(model_key) in stored for it in items)
  logging.info(
      "%d texts in %d batches (buckets %s, shared prefixes %s tokens); %d batches " "to run",
      len(items),
      len(plan.batches),
      plan.buckets,
      [len(p) for p in plan.prefixes],
      len(todo),
  )

  rating_ids = rating_token_ids(
      tokenizer, prompts_lib.build_text(prompts[0], "", "", template), scale
  )
  scorer = engine.Scorer(
      model.config,
      model.params,
      rating_ids,
      mesh,
      config.engine.batch_size,
      plan.prefixes,
      config.engine.max_segments,
      tokenizer.pad_id,
  )
  logging.info("shared prefixes prefilled in %.1fs (compile included)", scorer.prefill_seconds)
  rate_into_store(
      scorer, todo, store, stored, model_key, model.num_params, config.engine.shard_rows, summary
  )
  summary.wall_seconds = time.perf_counter() - start
  if summary.rated_rows and summary.digit_mass_mean < report.LOW_MASS_WARN:
    logging.warning(
        "mean digit mass %.3f is low: the model mostly does not answer with a "
        "digit, so its ratings carry little signal",
        summary.digit_mass_mean,
    )
  for line in summary.lines():
    logging.info("%s", line)
  return summary


def rate_into_store(
    scorer: engine.Scorer,
    batches,
    store: store_lib.ScoreStore,
    stored: set,
    model_key: str,
    num_params: int,
    shard_rows: int,
    summary: Summary,
) -> None:
  """Rates the batches, writing this process's new rows in whole-batch shards (a resumed
  run then replays exactly the batches not yet stored)."""
  owned = scorer.owned_rows()
  rows, masses = [], []
  loop_start = time.perf_counter()
  bar = tqdm(batches, desc="scoring", unit="batch", disable=jax.process_index() != 0)
  # Shards are written by a background thread while the next steps run.
  with store_lib.ShardWriter(store) as writer:
    for out in scorer.rate(bar):
      batch = out.batch
      for r, it in enumerate(batch.items):
        masses.append(out.probs[r].sum())
        if not owned[out.arrays.item_row[r]] or it.key(model_key) in stored:
          continue
        rows.append(
            dict(
                sample_id=it.sample_id,
                sample_index=it.sample_index,
                content_hash=it.content_hash,
                model=model_key,
                num_params=num_params,
                prompt_index=it.prompt_index,
                prompt_hash=it.prompt_hash,
                probs=out.probs[r],
                logsumexp=out.logsumexp[r],
                num_tokens=len(it.ids),
                truncated=it.truncated,
            )
        )
      summary.rated_rows += len(batch.items)
      summary.tokens += batch.real_tokens
      summary.row_tokens += batch.row_tokens
      summary.padded_tokens += out.arrays.tokens.size
      if len(rows) >= shard_rows:
        summary.scored_rows += len(rows)
        writer.submit(rows)
        rows = []
      elapsed = bar.format_dict["elapsed"] or 1e-9
      bar.set_postfix(
          samples_s=f"{summary.rated_rows / elapsed:.1f}", tok_s=f"{summary.tokens / elapsed:.0f}"
      )
    summary.scored_rows += len(rows)
    writer.submit(rows)
  summary.loop_seconds = time.perf_counter() - loop_start
  summary.compile_seconds = scorer.compile_seconds
  summary.compiled_shapes = len(scorer.compiled_shapes)
  if masses:
    summary.digit_mass_mean, summary.digit_mass_min = float(np.mean(masses)), float(np.min(masses))
