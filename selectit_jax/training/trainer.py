"""`train`: fine-tune a LLaMA-family model on a SelectIT selection.

records -> template + response-only mask -> steps of `train.batch_size` examples (seeded
order per epoch) -> each step's examples packed into rows -> grain (resumable) -> jit'd
sharded AdamW step over the step's micro-batches -> orbax checkpoints (state + iterator)
-> optional validation loss -> HF export. A run that finds a checkpoint in the checkpoint
dir resumes from it and reproduces the uninterrupted run's losses.

The recipe is the paper's (released scripts: 128 sequences a step, no packing): packing
only changes how a step's examples are laid into rows, never which examples a step sees or
how many steps there are. The loss of a step is the mean NLL over all response tokens of
all its examples (one per-token mean over the whole step, however many micro-batches).

Outputs in output_dir: metrics.jsonl (one JSON per logged step / eval; a resumed run
appends, so the last line of a step wins), tb/ (tensorboardX), rejects.jsonl,
train_summary.json, checkpoints/ and hf/ (the exported model) unless checkpoint.dir /
export.dir put them elsewhere (e.g. gs://).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from selectit_jax import fileio
from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.data import records as records_lib
from selectit_jax.models import costs
from selectit_jax.parallel import devices
from selectit_jax.parallel import sharding
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.errors import UserError
from selectit_jax.training import checkpointing
from selectit_jax.training import data as data_lib
from selectit_jax.training import export as export_lib
from selectit_jax.training import loss as loss_lib
from selectit_jax.training import perf
from selectit_jax.training import step as step_lib


class MetricsLog:
  """metrics.jsonl plus tensorboardX scalars (process 0 only)."""

  def __init__(self, directory: str):
    self._on = jax.process_index() == 0
    self._file = self._tb = None
    if self._on:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._file = open(os.path.join(directory, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(directory, "tb"))

  def write(self, step: int, scalars: dict) -> None:
    if not self._on:
      return
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self):
    if self._on:
      self._file.close()
      self._tb.close()


def read_metrics(path: str) -> dict[int, dict]:
  """step -> the last train record of that step in metrics.jsonl (a resumed run's wins)."""
  out = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        out[rec["step"]] = rec
  return out


def _examples_digest(examples: list[data_lib.Example]) -> str:
  h = hashlib.sha256()
  for ex in examples:
    h.update(np.int64(len(ex.ids)).tobytes())
    h.update(np.ascontiguousarray(ex.ids, np.int32).tobytes())
    h.update(np.packbits(ex.target).tobytes())
  return h.hexdigest()[:16]


def _reject_summary(rejects) -> str:
  reasons = collections.Counter(r.reason for r in rejects)
  return "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(5))


def load_data(config, tokenizer):
  """Train examples, validation rows (None without a validation split), rejects and the
  report of everything dropped on the way."""
  records, rejects, info = records_lib.read_records(config.data)
  if rejects:
    logging.warning(
        "%d of %d records rejected: %s", len(rejects), info.num_read, _reject_summary(rejects)
    )
  if not records:
    raise ValueError(
        f"{info.path}: no usable records to train on (read {info.num_read}, "
        f"rejected {len(rejects)}" + (f": {_reject_summary(rejects)}" if rejects else "") + ")"
    )
  d = config.data
  train_recs, val_recs = data_lib.split(records, d.val_fraction, d.val_size, d.seed)
  train_ex, train_stats = data_lib.prepare(train_recs, tokenizer, d)
  val_ex, val_stats = data_lib.prepare(val_recs, tokenizer, d)
  for name, stats in (("train", train_stats), ("validation", val_stats)):
    for line in stats.lines():
      logging.info("%s: %s", name, line)
  if not train_ex:
    raise ValueError("no training examples left: " + "; ".join(train_stats.lines()))
  val_rows = data_lib.pack(val_ex, d.max_length, None, d.pack) if val_ex else None
  report = {
      "read": dataclasses.asdict(info),
      "rejected": len(rejects),
      "reject_reasons": dict(collections.Counter(r.reason for r in rejects)),
      "train": _stats_dict(train_stats),
      "validation": _stats_dict(val_stats),
      "validation_rows": int(len(val_rows["inputs"])) if val_rows else 0,
  }
  return train_ex, val_rows, rejects, report


def _stats_dict(s: data_lib.PrepStats) -> dict:
  d = dataclasses.asdict(s)
  d["dropped"] = dict(s.dropped)
  return d


def evaluate(eval_step, params, val_rows, micro: int, shard) -> dict:
  total, count = 0.0, 0.0
  for batch in data_lib.eval_batches(val_rows, micro):
    l, n = jax.device_get(
        eval_step(params, jax.tree.map(lambda v: sharding.global_array(v, shard), batch))
    )
    total, count = total + float(l), count + float(n)
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count}


# The settings a resumed run must share with the saved one (max_steps, logging and eval
# cadence may change between runs).
_OPTIMIZER_FIELDS = (
    "learning_rate",
    "epochs",
    "warmup_ratio",
    "schedule",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "max_grad_norm",
)


def _batch_size(config, num_examples: int) -> int:
  """Examples per optimizer step: train.batch_size, capped by the selection (with a warning),
  so a small selection trains out of the box (every step then sees all of it)."""
  batch = int(config.train.batch_size)
  if batch < 1:
    raise UserError(f"train.batch_size={batch}; expected examples per step, >= 1")
  if num_examples < batch:
    logging.warning(
        "train.batch_size=%d examples but the selection has %d: each step takes all %d "
        "(%d optimizer steps over %d epoch(s))",
        batch,
        num_examples,
        num_examples,
        int(config.train.epochs),
        int(config.train.epochs),
    )
    batch = num_examples
  return batch


def _micro_batch_size(config, mesh, max_rows: int) -> int:
  """Rows per forward/backward: train.micro_batch_size rounded up to a multiple of the mesh's
  data×fsdp (each shard its share of rows), and capped by the most rows any step packs into
  (no micro-batch of empty rows)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  asked = int(config.train.micro_batch_size)
  if asked < 1:
    raise UserError(f"train.micro_batch_size={asked}; expected rows per micro-batch, >= 1")
  micro = -(-asked // shards) * shards
  if micro != asked:
    logging.info("train.micro_batch_size=%d rounded up to %d (data×fsdp=%d)", asked, micro, shards)
  cap = -(-max_rows // shards) * shards
  if cap < micro:
    logging.warning(
        "train.micro_batch_size=%d rows but no step packs into more than %d: micro-batches of "
        "%d rows",
        micro,
        max_rows,
        cap,
    )
    micro = cap
  return micro


def _start_state(model_path, cfg, tx, mesh, shardings, mngr, iterator, run_meta, ckpt_dir):
  """(state, resumed_from): the latest checkpoint of the same run, else the loaded weights.
  Resuming continues the saved optimizer state, so it is refused under other data, weights
  or optimisation settings rather than mixing two runs."""
  resumed_from = mngr.latest_step()
  if resumed_from is None:
    loaded = checkpoints.load_model(
        model_path, mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat
    )
    return step_lib.init_state(loaded.params, tx, shardings), None
  state, meta = checkpointing.restore(
      mngr, step_lib.abstract_state(cfg, tx, shardings), resumed_from
  )
  for k, v in run_meta.items():
    if meta.get(k) != v:
      raise UserError(
          f"{ckpt_dir} holds a run with {k}={meta.get(k)!r}, this "
          f"config gives {v!r}; use a new output_dir or the same data/config"
      )
  iterator.set_state(meta["iterator"])
  logging.info("resumed from step %d", resumed_from)
  return state, resumed_from


class _Throughput:
  """Tokens/s and MFU per step; the steady rate leaves out each process's first (compiling)
  step."""

  def __init__(self, cfg, seq_len: int, peak: float):
    self.cfg, self.seq_len, self.peak = cfg, seq_len, peak
    self.tokens, self.seconds, self.first = 0, 0.0, True

  def mfu(self, tokens_per_second: float) -> float:
    return perf.mfu(tokens_per_second, self.cfg, self.seq_len, self.peak, jax.device_count())

  def step(self, tokens: int, seconds: float) -> dict:
    if not self.first:
      self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
    self.first = False
    tok_s = tokens / seconds
    return dict(tokens=tokens, tokens_per_second=tok_s, step_seconds=seconds, mfu=self.mfu(tok_s))

  def steady(self) -> dict:
    if not self.seconds:
      return dict(steady_tokens_per_second=float("nan"), steady_mfu=float("nan"))
    rate = self.tokens / self.seconds
    return dict(steady_tokens_per_second=rate, steady_mfu=self.mfu(rate))


@dataclasses.dataclass
class _Loop:
  """What every training step uses: the jit'd step, evaluation, metrics, checkpoints."""

  train_step: Any
  eval_fn: Any  # params -> eval metrics, or None without a validation split
  speed: _Throughput
  log: MetricsLog
  mngr: Any
  run_meta: dict
  micro: int
  train_shard: Any
  log_every: int
  eval_every: int


def _train_loop(loop: _Loop, state, step: int, last_step: int, iterator):
  """Steps to last_step: one step's examples each (its rows as micro-batches), metrics,
  evaluation and checkpoints (the iterator's state saved with each)."""
  micro, train_shard, log = loop.micro, loop.train_shard, loop.log
  eval_fn, eval_every, mngr, run_meta = loop.eval_fn, loop.eval_every, loop.mngr, loop.run_meta
  last_metrics, last_eval = {}, {}
  compiled = set()
  bar = tqdm(total=last_step, initial=step, desc="train", disable=jax.process_index() != 0)
  while step < last_step:
    host_batch = next(iterator)
    tokens = int((host_batch["segment_ids"] > 0).sum())
    # Steps pack into different row counts: one compiled step per micro-batch count.
    accum = len(host_batch["inputs"]) // micro
    if accum not in compiled:
      compiled.add(accum)
      logging.info(
          "step %d: %d micro-batch(es) of %d rows (compiling this shape)", step, accum, micro
      )
    device_batch = {
        k: sharding.global_array(v.reshape((accum, micro) + v.shape[1:]), train_shard)
        for k, v in host_batch.items()
    }
    start = time.perf_counter()
    state, metrics = loop.train_step(state, device_batch)
    metrics = jax.device_get(metrics)  # syncs: the step time below is real
    step += 1
    scalars = {k: float(v) for k, v in metrics.items()}
    scalars.update(loop.speed.step(tokens, time.perf_counter() - start))
    last_metrics = scalars
    if step % max(loop.log_every, 1) == 0 or step == last_step:
      log.write(step, scalars)
    bar.update(1)
    bar.set_postfix(
        loss=f"{scalars['loss']:.4f}",
        tok_s=f"{scalars['tokens_per_second']:.0f}",
        mfu=f"{scalars['mfu']:.2%}",
    )
    if eval_fn and ((eval_every and step % eval_every == 0) or step == last_step):
      last_eval = eval_fn(state["params"])
      log.write(step, last_eval)
      bar.write(
          f"step {step}: eval loss {last_eval['eval_loss']:.4f} "
          f"ppl {last_eval['eval_perplexity']:.2f}"
      )
    checkpointing.save(
        mngr,
        step,
        state,
        {**run_meta, "iterator": iterator.get_state(), "step": step},
        force=step == last_step,
    )
  bar.close()
  return state, step, last_metrics, last_eval


def _last_step(config, total_steps: int) -> int:
  """The step this invocation stops at (train.max_steps > 0 stops early)."""
  max_steps = int(config.train.max_steps)
  return min(total_steps, max_steps) if max_steps else total_steps


def _steps_report(plan: data_lib.StepPlan, rows: np.ndarray, micro: int) -> dict:
  """Rows per step and how full they are (empty rows pad a step to whole micro-batches)."""
  padded = -(-rows // micro) * micro
  return dict(
      examples=len(plan.examples),
      steps_per_epoch=plan.steps_per_epoch,
      rows_per_step_min=int(rows.min()),
      rows_per_step_mean=float(rows.mean()),
      rows_per_step_max=int(rows.max()),
      token_fill=float(plan.lengths.sum() * plan.epochs / (padded.sum() * plan.max_length)),
      tokens=int(plan.lengths.sum() * plan.epochs),  # every epoch's example tokens
  )


def _model_config(config, model_path: str):
  """The checkpoint's architecture with the config's numerics."""
  _, cfg = checkpoints.tensor_source(model_path)
  m = config.model
  return dataclasses.replace(
      cfg,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      remat=m.remat,
      attention=m.get("attention", "auto"),
  )


def run(config) -> dict:
  """Trains (or resumes) as configured; returns the summary also written to
  train_summary.json."""
  out = config.output_dir
  if not out:
    raise UserError("config.output_dir is required")
  os.makedirs(out, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  config = devices.resolve_dtypes(config, mesh.devices.flat[0].platform)
  t, d = config.train, config.data

  model_path = assets.model_path(config.model)
  tokenizer = load_tokenizer(model_path)
  train_ex, val_rows, rejects, data_report = load_data(config, tokenizer)
  if rejects and jax.process_index() == 0:
    records_lib.write_rejects(os.path.join(out, "rejects.jsonl"), rejects)
  batch = _batch_size(config, len(train_ex))
  plan = data_lib.StepPlan(train_ex, batch, t.epochs, d.seed, d.max_length, d.pack)
  rows_per_step = plan.rows_per_step()
  micro = _micro_batch_size(config, mesh, int(rows_per_step.max()))
  total_steps = len(plan)
  last_step = _last_step(config, total_steps)
  data_report["steps"] = _steps_report(plan, rows_per_step, micro)
  cfg = _model_config(config, model_path)
  sched = step_lib.schedule(t, total_steps)
  tx = step_lib.optimizer(t, sched)
  shardings = step_lib.state_shardings(cfg, tx, mesh)
  chunk = loss_lib.configured_chunk(config.train)
  train_step = step_lib.make_train_step(cfg, tx, sched, mesh, shardings, chunk)
  eval_step = step_lib.make_eval_step(cfg, mesh, shardings, chunk)
  train_shard = step_lib.accumulation_sharding(mesh)
  eval_shard = sharding.batch_sharding(mesh)

  iterator = iter(data_lib.train_dataset(plan, micro).to_iter_dataset())
  # Resuming is refused unless these match the saved run.
  run_meta = dict(
      train_examples_digest=_examples_digest(train_ex),
      total_steps=total_steps,
      batch_size=batch,
      micro_batch_size=micro,
      model_fingerprint=checkpoints.fingerprint(model_path),
      optimizer=json.dumps({k: t[k] for k in _OPTIMIZER_FIELDS}, sort_keys=True),
  )
  ckpt_dir = checkpointing.resolve(config.checkpoint.dir or os.path.join(out, "checkpoints"))
  mngr = checkpointing.manager(ckpt_dir, config.checkpoint)
  state, resumed_from = _start_state(
      model_path, cfg, tx, mesh, shardings, mngr, iterator, run_meta, ckpt_dir
  )
  step = int(jax.device_get(state["step"]))

  seq_len = int(d.max_length)
  peak = perf.peak_flops_per_device(float(t.peak_flops_per_device))
  speed = _Throughput(cfg, seq_len, peak)
  log = MetricsLog(out)
  eval_every = int(t.eval_every)
  summary = dict(
      data=data_report,
      total_steps=total_steps,
      last_step=last_step,
      train_tokens=data_report["steps"]["tokens"],  # the whole schedule's (all epochs)
      resumed_from=resumed_from,
      batch_size=batch,
      micro_batch_size=micro,
      checkpoint_dir=str(ckpt_dir),
      model=model_path,
      num_params=costs.num_params(cfg),
      flops_per_token=costs.train_flops_per_token(cfg, seq_len),
      peak_flops_per_device=peak,
      devices=jax.device_count(),
      processes=jax.process_count(),
      device_kind=jax.devices()[0].device_kind,
  )
  logging.info(
      "%d examples, %d steps of %d examples (%d this run), packed into %d-%d rows of %d "
      "tokens a step (micro-batches of %d rows)",
      len(train_ex),
      total_steps,
      batch,
      last_step - step,
      int(rows_per_step.min()),
      int(rows_per_step.max()),
      seq_len,
      micro,
  )

  eval_fn = None
  if val_rows is not None:
    eval_fn = lambda params: evaluate(eval_step, params, val_rows, micro, eval_shard)
  if eval_fn and resumed_from is None:
    log.write(step, eval_fn(state["params"]))
  loop = _Loop(
      train_step,
      eval_fn,
      speed,
      log,
      mngr,
      run_meta,
      micro,
      train_shard,
      int(t.log_every),
      eval_every,
  )
  state, step, last_metrics, last_eval = _train_loop(loop, state, step, last_step, iterator)
  mngr.wait_until_finished()
  mngr.close()
  log.close()

  summary.update(final_step=step, final=last_metrics, final_eval=last_eval, **speed.steady())
  if config.export.enabled:
    template = data_lib.resolve_template(tokenizer, d)
    summary["export_dir"] = export_lib.export_hf(
        config.export.dir or os.path.join(out, "hf"),
        cfg,
        state["params"],
        tokenizer,
        eos_ids=data_lib.end_token_ids(tokenizer, template),
        dtype=config.export.dtype,
    )
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(out, "train_summary.json"), summary, indent=2, default=str)
  logging.info("done: step %d, %s", step, json.dumps(last_eval))
  return summary
