"""`train`: fine-tune a LLaMA-family model on a SelectIT selection.

records -> template + response-only mask -> packed rows -> grain (seeded, resumable) ->
jit'd sharded AdamW step with gradient accumulation -> orbax checkpoints (state + iterator)
-> validation loss / perplexity -> HF export. A run that finds a checkpoint in
<output_dir>/checkpoints resumes from it and reproduces the uninterrupted run's losses.

Outputs in output_dir: metrics.jsonl (one JSON per logged step / eval; a resumed run
appends, so the last line of a step wins), tb/ (tensorboardX), rejects.jsonl,
train_summary.json, checkpoints/, hf/ (the exported model).
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
from selectit_jax.parallel import sharding
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.training import checkpointing
from selectit_jax.training import data as data_lib
from selectit_jax.training import export as export_lib
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


def _rows_digest(rows: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(rows):
    h.update(k.encode())
    h.update(np.ascontiguousarray(rows[k]).tobytes())
  return h.hexdigest()[:16]


def _reject_summary(rejects) -> str:
  reasons = collections.Counter(r.reason for r in rejects)
  return "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(5))


def load_data(config, tokenizer):
  """Train / validation rows and the report of everything dropped on the way."""
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
  train_rows = data_lib.pack(train_ex, d.max_length, d.seed, d.pack)
  val_rows = data_lib.pack(val_ex, d.max_length, None, d.pack) if val_ex else None
  report = {
      "read": dataclasses.asdict(info),
      "rejected": len(rejects),
      "reject_reasons": dict(collections.Counter(r.reason for r in rejects)),
      "train": _stats_dict(train_stats),
      "validation": _stats_dict(val_stats),
      "train_rows": int(len(train_rows["inputs"])),
      "validation_rows": int(len(val_rows["inputs"])) if val_rows else 0,
  }
  return train_rows, val_rows, rejects, report


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
    "micro_batch_size",
)


def _batch_sizes(config, mesh) -> tuple[int, int, int]:
  """(global batch, micro-batch, accumulation steps), checked against the mesh."""
  t = config.train
  rows_per_shard = mesh.shape["data"] * mesh.shape["fsdp"]
  batch, micro = int(t.batch_size), int(t.micro_batch_size)
  if batch % micro:
    raise ValueError(
        f"train.batch_size={batch} is not a multiple of " f"train.micro_batch_size={micro}"
    )
  if micro % rows_per_shard:
    raise ValueError(
        f"train.micro_batch_size={micro} is not a multiple of the mesh's "
        f"data×fsdp={rows_per_shard}"
    )
  return batch, micro, batch // micro


def _start_state(model_path, cfg, tx, mesh, shardings, mngr, iterator, run_meta, out):
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
      raise ValueError(
          f"{out}/checkpoints holds a run with {k}={meta.get(k)!r}, this "
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
  accum: int
  micro: int
  train_shard: Any
  log_every: int
  eval_every: int


def _train_loop(loop: _Loop, state, step: int, last_step: int, iterator):
  """Steps to last_step: one global batch each (accum micro-batches), metrics, evaluation
  and checkpoints (the iterator's state saved with each)."""
  accum, micro, train_shard, log = loop.accum, loop.micro, loop.train_shard, loop.log
  eval_fn, eval_every, mngr, run_meta = loop.eval_fn, loop.eval_every, loop.mngr, loop.run_meta
  last_metrics, last_eval = {}, {}
  bar = tqdm(total=last_step, initial=step, desc="train", disable=jax.process_index() != 0)
  while step < last_step:
    host_batch = next(iterator)
    tokens = int((host_batch["segment_ids"] > 0).sum())
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


def _steps(config, num_rows: int, batch: int) -> tuple[int, int]:
  """(optimizer steps of the whole run, the step this invocation stops at)."""
  t = config.train
  total_steps = data_lib.steps_per_run(num_rows, int(t.epochs), batch)
  if total_steps == 0:
    raise ValueError(
        f"the selection packs into {num_rows} rows of {config.data.max_length} tokens, fewer "
        f"than one global batch (train.batch_size={batch}) over {t.epochs} epoch(s); lower "
        "train.batch_size"
    )
  return total_steps, (min(total_steps, int(t.max_steps)) if t.max_steps else total_steps)


def _model_config(config, model_path: str):
  """The checkpoint's architecture with the config's numerics."""
  _, cfg = checkpoints.tensor_source(model_path)
  m = config.model
  return dataclasses.replace(
      cfg,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      remat=bool(m.remat),
      attention=m.get("attention", "auto"),
  )


def run(config) -> dict:
  """Trains (or resumes) as configured; returns the summary also written to
  train_summary.json."""
  out = config.output_dir
  if not out:
    raise ValueError("config.output_dir is required")
  os.makedirs(out, exist_ok=True)
  t, d = config.train, config.data
  mesh = sharding.make_mesh(config.mesh)
  batch, micro, accum = _batch_sizes(config, mesh)

  model_path = assets.model_path(config.model)
  tokenizer = load_tokenizer(model_path)
  train_rows, val_rows, rejects, data_report = load_data(config, tokenizer)
  if rejects and jax.process_index() == 0:
    records_lib.write_rejects(os.path.join(out, "rejects.jsonl"), rejects)
  num_rows = data_report["train_rows"]
  total_steps, last_step = _steps(config, num_rows, batch)
  cfg = _model_config(config, model_path)
  sched = step_lib.schedule(t, total_steps)
  tx = step_lib.optimizer(t, sched)
  shardings = step_lib.state_shardings(cfg, tx, mesh)
  train_step = step_lib.make_train_step(cfg, tx, sched, mesh, shardings)
  eval_step = step_lib.make_eval_step(cfg, mesh, shardings)
  train_shard = step_lib.accumulation_sharding(mesh)
  eval_shard = sharding.batch_sharding(mesh)

  iterator = iter(
      data_lib.train_dataset(train_rows, int(t.epochs), batch, int(d.seed)).to_iter_dataset()
  )
  # Resuming is refused unless these match the saved run.
  run_meta = dict(
      train_rows_digest=_rows_digest(train_rows),
      total_steps=total_steps,
      batch_size=batch,
      model_fingerprint=checkpoints.fingerprint(model_path),
      optimizer=json.dumps({k: t[k] for k in _OPTIMIZER_FIELDS}, sort_keys=True),
  )
  mngr = checkpointing.manager(os.path.join(out, "checkpoints"), config.checkpoint)
  state, resumed_from = _start_state(
      model_path, cfg, tx, mesh, shardings, mngr, iterator, run_meta, out
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
      resumed_from=resumed_from,
      accumulation=accum,
      model=model_path,
      num_params=costs.num_params(cfg),
      flops_per_token=costs.train_flops_per_token(cfg, seq_len),
      peak_flops_per_device=peak,
      devices=jax.device_count(),
      device_kind=jax.devices()[0].device_kind,
  )
  logging.info(
      "%d train rows, %d steps (%d this run), global batch %d = %d x %d micro",
      num_rows,
      total_steps,
      last_step - step,
      batch,
      accum,
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
      accum,
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
    summary["export_dir"] = export_lib.export_hf(
        os.path.join(out, "hf"), cfg, state["params"], tokenizer
    )
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(out, "train_summary.json"), summary, indent=2, default=str)
  logging.info("done: step %d, %s", step, json.dumps(last_eval))
  return summary
