"""`evaluate`: benchmark items -> log-likelihoods through the scoring engine -> per-item
Parquet, summary.json and summary.md (resumable).

A form's kind decides who computes it: the log-likelihood kinds (letter, cloze, bpb) go
through `loglik` and `engine.Scorer`. Generation metrics (GSM8K exact match, HumanEval
pass@1) are meant as one more kind: a Form of kind `generate` with its stop sequences and a
scorer of the decoded text (the number after "So the answer is", or the sandboxed tests),
routed here to the decoder instead of `loglik`, its rows written to the same store under
form `generate` (prediction and gold as text columns added with defaults, as the score store
adds columns).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time

import jax
from absl import logging
from tqdm import tqdm

from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax import fileio
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.errors import UserError
from selectit_jax.evaluation import loglik
from selectit_jax.evaluation import results
from selectit_jax.evaluation import tasks as tasks_lib
from selectit_jax.parallel import sharding
from selectit_jax.scoring import engine
from selectit_jax.scoring.runner import with_effective_batch


@dataclasses.dataclass
class Summary:
  tasks: dict
  computed: int = 0  # items run through the model this time
  stored: int = 0  # items already in the output (resume)
  skipped: list = dataclasses.field(default_factory=list)  # too long, with the reason
  throughput: loglik.Throughput = dataclasses.field(default_factory=loglik.Throughput)
  compile_seconds: float = 0.0
  wall_seconds: float = 0.0

  def tokens_per_second(self, steady: bool = False) -> float:
    seconds = self.throughput.seconds - (self.compile_seconds if steady else 0.0)
    return self.throughput.tokens / max(seconds, 1e-9)


def model_key(config, fingerprint: str) -> str:
  """The model column: the weights and the settings that change a log-likelihood."""
  m = config.model
  return (
      f"{m.name or 'model'}@{fingerprint}:dtype={m.dtype},param_dtype={m.param_dtype},"
      f"max_tokens={int(config.engine.max_tokens)}"
  )


def run(config) -> Summary:
  """Evaluates config.model on config.tasks into config.output_dir."""
  if not config.output_dir:
    raise UserError("set --config.output_dir")
  names = tasks_lib.task_names(config.tasks)
  # Read every task before the weights: a missing package or file fails in seconds.
  items = {name: tasks_lib.load(name, int(config.limit)) for name in names}
  for name in names:
    logging.info("%s: %d items", name, len(items[name]))
  start = time.perf_counter()
  model_path = assets.model_path(config.model)
  mesh = sharding.make_mesh(config.mesh)
  config = with_effective_batch(config, mesh)
  model = checkpoints.load_model(
      model_path, mesh, dtype=config.model.dtype, param_dtype=config.model.param_dtype
  )
  tokenizer = load_tokenizer(model_path)
  key = model_key(config, model.fingerprint)
  logging.info("model %s: %s", key, model_path)
  writer = jax.process_index() == 0  # every process sees every result
  store = results.ResultStore(config.output_dir)
  stored = store.stored_keys()
  summary = Summary(tasks={})
  scorer = None
  evaluated = set()  # (task, id) of the items the summary covers
  for name in names:
    todo = []
    for it in items[name]:
      if all((name, it.id, f.name, key) in stored for f in it.forms):
        summary.stored += 1
        evaluated.add((name, it.id))
      else:
        todo.append(it)
    if not todo:
      logging.info("%s: all %d items already stored", name, len(items[name]))
      continue
    work, requests, skipped = loglik.work_items(todo, tokenizer, int(config.engine.max_tokens))
    for reason in skipped:
      logging.warning("left out: %s", reason)
    summary.skipped += skipped
    if not work:
      continue
    chunks = loglik.plan_chunks(work, config.engine, model.config)
    logging.info(
        "%s: %d items, %d texts in %d batches over %d prefix tables",
        name,
        len(todo) - len(skipped),
        len(work),
        sum(len(c.batches) for c in chunks),
        len(chunks),
    )
    if scorer is None:
      scorer = engine.Scorer(
          model.config,
          model.params,
          None,
          mesh,
          config.engine.batch_size,
          (),
          config.engine.max_segments,
          tokenizer.pad_id,
      )
    left = collections.Counter(r.item for r in requests)
    logps: dict[int, dict] = collections.defaultdict(dict)
    rows = []
    bar = tqdm(total=len(work), desc=name, unit="text", disable=not writer)
    for index, logp in loglik.run_chunks(scorer, chunks, summary.throughput):
      req = requests[index]
      logps[req.item][(req.form, req.choice)] = logp
      left[req.item] -= 1
      bar.update()
      if left[req.item]:
        continue
      item = todo[req.item]
      rows += item_rows(item, logps.pop(req.item), key)
      evaluated.add((name, item.id))
      summary.computed += 1
      if writer and len(rows) >= config.engine.shard_rows:
        store.write(rows)
        rows = []
    bar.close()
    if writer:
      store.write(rows)
  if scorer is not None:
    summary.compile_seconds = scorer.compile_seconds
  summary.tasks = results.summarise(store.read_table(), evaluated, key)
  summary.wall_seconds = time.perf_counter() - start
  if writer:
    write_summary(config.output_dir, summary, key)
  for line in summary_lines(summary):
    logging.info("%s", line)
  return summary


def item_rows(item: tasks_lib.Item, logps: dict, key: str) -> list[dict]:
  """The store rows of one item, a row per form."""
  rows = []
  for f, form in enumerate(item.forms):
    if form.kind == "letter":
      per_choice = [logps[(f, -1)]]
    else:
      per_choice = [logps[(f, c)] for c in range(len(form.choices))]
    r = loglik.form_result(form, per_choice)
    rows.append(
        dict(
            task=item.task,
            id=item.id,
            form=form.name,
            model=key,
            prediction=r.prediction,
            gold=r.gold,
            score=r.score,
            logliks=list(r.logliks),
            num_tokens=list(r.num_tokens),
            num_bytes=list(r.num_bytes),
        )
    )
  return rows


def summary_lines(summary: Summary) -> list[str]:
  out = []
  for task, forms in summary.tasks.items():
    for form, s in forms.items():
      lo, hi = s["ci95"]
      ci = "" if lo is None else f" (95 % CI {lo:.4f}-{hi:.4f})"
      out.append(f"{task} {form}: {s['metric']} {s['value']:.4f}{ci}, n={s['n']}")
  t = summary.throughput
  out.append(
      f"{summary.computed} items computed, {summary.stored} already stored, "
      f"{len(summary.skipped)} left out (too long); {t.texts} texts, {t.tokens} tokens "
      f"({t.prefix_tokens} prefilled in shared prefixes, {t.row_tokens} in rows, padding "
      f"{1 - t.row_tokens / max(t.padded_tokens, 1):.1%}) in {t.seconds:.1f}s: "
      f"{summary.tokens_per_second():.0f} tok/s overall, "
      f"{summary.tokens_per_second(steady=True):.0f} tok/s without the "
      f"{summary.compile_seconds:.1f}s of first calls (compiles)"
  )
  return out


def write_summary(directory: str, summary: Summary, key: str) -> None:
  t = summary.throughput
  fileio.write_json(
      os.path.join(directory, "summary.json"),
      dict(
          model=key,
          tasks=summary.tasks,
          computed=summary.computed,
          stored=summary.stored,
          left_out=summary.skipped,
          throughput=dict(
              dataclasses.asdict(t),
              tokens_per_second=summary.tokens_per_second(),
              steady_tokens_per_second=summary.tokens_per_second(steady=True),
              compile_seconds=summary.compile_seconds,
          ),
          wall_seconds=summary.wall_seconds,
      ),
  )
  notes = [
      'letter: open-instruct\'s MMLU (the most likely of " A".." D" after "Answer:"); '
      "cloze: the choice with the highest log-likelihood per UTF-8 byte; bpb: bits per byte "
      "of the gold continuation. CIs: Wilson (accuracies), mean ± 1.96 s.e. (bpb).",
  ]
  if summary.skipped:
    notes.append(f"{len(summary.skipped)} items left out as too long (summary.json: left_out)")
  fileio.write_text(
      os.path.join(directory, "summary.md"), results.markdown(summary.tasks, key, notes)
  )
