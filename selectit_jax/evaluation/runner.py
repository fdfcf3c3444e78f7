"""`evaluate`: benchmark items -> log-likelihoods through the scoring engine, greedy
generations through the KV-cache decoder -> per-item Parquet, summary.json and summary.md
(resumable).

A form's kind decides who computes it: the log-likelihood kinds (letter, cloze, bpb) go
through `loglik` and `engine.Scorer`; the `generate` forms (GSM8K exact match, HumanEval
pass@1) through `models.decode.Generator` and `generation` (the decoded text scored, HumanEval
in the sandbox). Both write rows to the same store, keyed (task, id, form, model), so either
part resumes on its own.
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
from selectit_jax.evaluation import generation
from selectit_jax.evaluation import loglik
from selectit_jax.evaluation import results
from selectit_jax.evaluation import tasks as tasks_lib
from selectit_jax.models.decode import DecodeStats, Generator
from selectit_jax.parallel import devices
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
  generation: DecodeStats = dataclasses.field(default_factory=DecodeStats)
  check_seconds: float = 0.0  # scoring generations (HumanEval: the sandboxed tests)

  def tokens_per_second(self, steady: bool = False) -> float:
    seconds = self.throughput.seconds - (self.compile_seconds if steady else 0.0)
    return self.throughput.tokens / max(seconds, 1e-9)

  def generated_per_second(self, steady: bool = False) -> float:
    """New tokens per second of prefill and decoding (steady: of the decode loop alone)."""
    g = self.generation
    seconds = g.decode_seconds + (0.0 if steady else g.prefill_seconds)
    return g.new_tokens / max(seconds, 1e-9)


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
  limits = tasks_lib.task_limits(config.tasks, int(config.limit))
  names = list(limits)
  # Read every task before the weights: a missing package or file fails in seconds.
  items = {name: tasks_lib.load(name, n) for name, n in limits.items()}
  for name in names:
    logging.info("%s: %d items", name, len(items[name]))
  start = time.perf_counter()
  model_path = assets.model_path(config.model)
  mesh = sharding.make_mesh(config.mesh)
  config = devices.resolve_dtypes(with_effective_batch(config, mesh), mesh.devices.flat[0].platform)
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
  _check_generation_length(store, key, int(config.generate.max_new_tokens))
  ctx = _Context(config, model, tokenizer, mesh, key, store, writer, summary)
  evaluated, computed = ctx.evaluated, ctx.computed
  for name in names:
    todo, todo_gen = [], []  # items with a missing log-likelihood form / generate form
    for it in items[name]:
      missing = [f for f in it.forms if (name, it.id, f.name, key) not in stored]
      if not missing:
        summary.stored += 1
        evaluated.add((name, it.id))
        continue
      ll_forms = tuple(f for f in it.forms if f.kind != "generate")
      if any(f.kind != "generate" for f in missing):
        todo.append(dataclasses.replace(it, forms=ll_forms))
      if any(f.kind == "generate" for f in missing):
        todo_gen.append(it)
    if not todo and not todo_gen:
      logging.info("%s: all %d items already stored", name, len(items[name]))
      continue
    if todo:
      _loglik_task(ctx, name, todo)
    if todo_gen:
      _generate_task(ctx, name, todo_gen)
  summary.computed = len(computed)
  if ctx.scorer is not None:
    summary.compile_seconds = ctx.scorer.compile_seconds
  summary.tasks = results.summarise(store.read_table(), evaluated, key)
  summary.wall_seconds = time.perf_counter() - start
  if writer:
    write_summary(config.output_dir, summary, key)
  for line in summary_lines(summary):
    logging.info("%s", line)
  return summary


def _check_generation_length(store: results.ResultStore, key: str, max_new_tokens: int) -> None:
  """Stored generations of this model made with another max_new_tokens would be reused as
  if made with this one: refuse (the length is not in the key, so that one model keeps one
  model column)."""
  for (task, item_id), n in store.generation_lengths(key).items():
    if n != max_new_tokens:
      raise UserError(
          f"{store.dir}: {task} item {item_id} was generated with max_new_tokens={n}, not "
          f"{max_new_tokens}; use another output_dir or the same setting"
      )


@dataclasses.dataclass
class _Context:
  """What one run's tasks share: the model, where results go, and the scorer / generator
  (each made on first use)."""

  config: object
  model: object
  tokenizer: object
  mesh: object
  key: str
  store: results.ResultStore
  writer: bool
  summary: Summary
  evaluated: set = dataclasses.field(default_factory=set)  # (task, id) the summary covers
  computed: set = dataclasses.field(default_factory=set)  # of them, run through the model now
  scorer: engine.Scorer | None = None
  generator: Generator | None = None


def _loglik_task(ctx: _Context, name: str, todo: list) -> None:
  """The log-likelihood forms of `todo` through the engine into the store."""
  config, summary, writer = ctx.config, ctx.summary, ctx.writer
  work, requests, skipped = loglik.work_items(todo, ctx.tokenizer, int(config.engine.max_tokens))
  for reason in skipped:
    logging.warning("left out: %s", reason)
  summary.skipped += skipped
  if not work:
    return
  chunks = loglik.plan_chunks(work, config.engine, ctx.model.config)
  logging.info(
      "%s: %d items, %d texts in %d batches over %d prefix tables",
      name,
      len(todo) - len(skipped),
      len(work),
      sum(len(c.batches) for c in chunks),
      len(chunks),
  )
  if ctx.scorer is None:
    ctx.scorer = engine.Scorer(
        ctx.model.config,
        ctx.model.params,
        None,
        ctx.mesh,
        config.engine.batch_size,
        (),
        config.engine.max_segments,
        ctx.tokenizer.pad_id,
    )
  left = collections.Counter(r.item for r in requests)
  logps: dict[int, dict] = collections.defaultdict(dict)
  rows = []
  bar = tqdm(total=len(work), desc=name, unit="text", disable=not writer)
  for index, logp in loglik.run_chunks(ctx.scorer, chunks, summary.throughput):
    req = requests[index]
    logps[req.item][(req.form, req.choice)] = logp
    left[req.item] -= 1
    bar.update()
    if left[req.item]:
      continue
    item = todo[req.item]
    rows += item_rows(item, logps.pop(req.item), ctx.key)
    ctx.evaluated.add((name, item.id))
    ctx.computed.add((name, item.id))
    if writer and len(rows) >= config.engine.shard_rows:
      ctx.store.write(rows)
      rows = []
  bar.close()
  if writer:
    ctx.store.write(rows)


def _generate_task(ctx: _Context, name: str, todo: list) -> None:
  """The generate forms of `todo` through the decoder, scored, into the store a shard at a
  time (the unit of resume)."""
  config, summary, writer, tokenizer = ctx.config, ctx.summary, ctx.writer, ctx.tokenizer
  g = config.generate
  max_tokens, max_new = int(config.engine.max_tokens), int(g.max_new_tokens)
  keep, ids, skipped = generation.prompts(todo, tokenizer, max_tokens, max_new)
  for reason in skipped:
    logging.warning("left out: %s", reason)
  summary.skipped += skipped
  if not keep:
    return
  if ctx.generator is None:
    ctx.generator = Generator(
        ctx.model.config,
        ctx.model.params,
        ctx.mesh,
        max_len=max_tokens,
        batch_size=int(g.batch_size or config.engine.batch_size),
        pad_id=tokenizer.pad_id,
    )
    ctx.generator.stats = summary.generation
  limits = generation.Limits(float(g.timeout), int(g.memory_bytes), int(g.workers))
  step = max(int(config.engine.shard_rows), 1)
  logging.info("%s: generating for %d items (max %d new tokens)", name, len(keep), max_new)
  bar = tqdm(total=len(keep), desc=f"{name} generate", unit="item", disable=not writer)
  for start in range(0, len(keep), step):
    part = [todo[i] for i in keep[start : start + step]]
    rows, seconds = generation.run(
        ctx.generator.generate,
        tokenizer,
        part,
        ids[start : start + step],
        max_new,
        ctx.key,
        limits,
    )
    summary.check_seconds += seconds
    for it in part:
      ctx.evaluated.add((name, it.id))
      ctx.computed.add((name, it.id))
    if writer:
      ctx.store.write(rows)
    bar.update(len(part))
  bar.close()


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
  g = summary.generation
  if g.prompts:
    out.append(
        f"generation: {g.prompts} prompts ({g.prompt_tokens} tokens), {g.new_tokens} new "
        f"tokens in {g.prefill_seconds:.1f}s prefill + {g.decode_seconds:.1f}s decoding: "
        f"{summary.generated_per_second():.1f} tok/s overall, "
        f"{summary.generated_per_second(steady=True):.1f} tok/s in the decode loop; "
        f"{summary.check_seconds:.1f}s scoring (sandbox)"
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
          generation=dict(
              dataclasses.asdict(summary.generation),
              tokens_per_second=summary.generated_per_second(),
              decode_tokens_per_second=summary.generated_per_second(steady=True),
              check_seconds=summary.check_seconds,
          ),
          wall_seconds=summary.wall_seconds,
      ),
  )
  notes = [
      'letter: open-instruct\'s MMLU (the most likely of " A".." D" after "Answer:"); '
      "cloze: the choice with the highest log-likelihood per UTF-8 byte; bpb: bits per byte "
      "of the gold continuation; generate: greedy decoding up to the task's stop strings, "
      "GSM8K's final number exact-matched with the gold short answer, HumanEval's completion "
      "run against its tests in a sandboxed process (pass@1). CIs: Wilson (accuracies), mean "
      "± 1.96 s.e. (bpb).",
  ]
  g = summary.generation
  if g.prompts:
    notes.append(
        f"generation this run: {g.new_tokens} new tokens for {g.prompts} prompts, "
        f"{summary.generated_per_second():.1f} tok/s (prefill + decode; "
        f"{summary.generated_per_second(steady=True):.1f} tok/s in the decode loop)"
    )
  if summary.skipped:
    notes.append(f"{len(summary.skipped)} items left out as too long (summary.json: left_out)")
  fileio.write_text(
      os.path.join(directory, "summary.md"), results.markdown(summary.tasks, key, notes)
  )
