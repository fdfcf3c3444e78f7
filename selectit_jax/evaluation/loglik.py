"""Log-likelihood forms (letter, cloze, bpb) through the scoring engine.

Each (item, form, choice) is one text for `Scorer` in its log-likelihood mode: the tokens
of context + choice up to the last one, with the choice's tokens read at the positions that
predict them (a letter form reads all its options at the context's last token). Texts of
one group (a task, or an MMLU subject in one form) share their few-shot prefix, prefilled
once; the groups go through the engine a table of `engine.prefixes_per_table` at a time,
shortest prefixes first, so the prefix table stays small and of few shapes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from selectit_jax.checkpoints.tokenizer import Tokenizer
from selectit_jax.evaluation.tasks import Form, Item
from selectit_jax.scoring import batching
from selectit_jax.scoring import engine


@dataclasses.dataclass(frozen=True)
class Request:
  """Where a text's log-probs go: item (index in the task's list), form and choice."""

  item: int
  form: int
  choice: int


def tokenize_choice(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list, list]:
  """(context ids, choice ids) as lm-eval cuts them: the whole text is encoded once and the
  choice is what follows the context's own encoding, so the scored tokens are the ones the
  model sees for the whole text."""
  ctx = tokenizer.encode(context)
  whole = tokenizer.encode(context + choice)
  return whole[: len(ctx)], whole[len(ctx) :]


def work_items(
    items: Sequence[Item], tokenizer: Tokenizer, max_tokens: int
) -> tuple[list[batching.WorkItem], list[Request], list[str]]:
  """(texts for the engine, where each one's results go, reasons per item left out).

  An item with a text over `max_tokens` is left out whole (its reason logged and counted).
  `WorkItem.prompt_index` is the form's group (its shared prefix); `sample_index` the
  text's position in the returned lists.
  """
  groups: dict[str, int] = {}
  work, requests, skipped = [], [], []
  for i, item in enumerate(items):
    texts = []
    for f, form in enumerate(item.forms):
      g = groups.setdefault(form.group, len(groups))
      if form.kind == "letter":
        ids = tokenizer.encode(form.context)
        # open-instruct: the last token of " A" alone.
        options = tuple(tokenizer.encode(c)[-1] for c in form.choices)
        reads = (len(ids) - 1,) * len(options)
        texts.append((ids, reads, options, g, Request(i, f, -1)))
        continue
      for c, choice in enumerate(form.choices):
        ctx, cont = tokenize_choice(tokenizer, form.context, choice)
        if not cont or not ctx:
          raise ValueError(f"{item.task} item {item.id}: {form.name} choice {c} has no tokens")
        ids = ctx + cont[:-1]
        reads = tuple(range(len(ctx) - 1, len(ids)))
        texts.append((ids, reads, tuple(cont), g, Request(i, f, c)))
    longest = max(len(t[0]) for t in texts)
    if longest > max_tokens:
      skipped.append(f"{item.task} {item.id}: {longest} tokens > engine.max_tokens={max_tokens}")
      continue
    for ids, reads, targets, g, req in texts:
      work.append(
          batching.WorkItem(
              len(work), f"{item.id}", "", g, "", tuple(ids), reads=reads, targets=targets
          )
      )
      requests.append(req)
  return work, requests, skipped


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Batches whose rows continue one prefix table: its prefixes, padded to `shape`."""

  prefixes: tuple[tuple[int, ...], ...]
  shape: tuple[int, int]
  batches: list[batching.Batch]


def plan_chunks(work: Sequence[batching.WorkItem], engine_cfg, model_cfg=None) -> list[Chunk]:
  """The task's batches, a prefix table at a time: buckets fitted over all its texts (one
  set of row shapes for the task), tables of `prefixes_per_table` groups sorted by prefix
  length, each padded to a power of two tokens (few table shapes, so few compiles)."""
  prefixes = batching.shared_prefixes(work) if engine_cfg.prefix_cache else ()
  buckets = batching.plan_buckets(work, prefixes, engine_cfg, model_cfg)
  if not prefixes:
    local = [dataclasses.replace(it, prompt_index=0) for it in work]
    batches = batching.plan_batches(
        local, engine_cfg.batch_size, buckets, (), engine_cfg.max_segments
    )
    return [Chunk((), (1, 0), batches)]
  per = max(int(engine_cfg.prefixes_per_table), 1)
  order = group_order(work, prefixes)
  by_group: dict[int, list[batching.WorkItem]] = {}
  for it in work:
    by_group.setdefault(it.prompt_index, []).append(it)
  chunks = []
  for start in range(0, len(order), per):
    groups = order[start : start + per]
    local = {g: k for k, g in enumerate(groups)}
    items = [
        dataclasses.replace(it, prompt_index=local[g]) for g in groups for it in by_group.get(g, [])
    ]
    table = tuple(prefixes[g] for g in groups)
    longest = max(len(p) for p in table)
    shape = (per, 1 << max(longest - 1, 0).bit_length() if longest else 0)
    batches = batching.plan_batches(
        items, engine_cfg.batch_size, buckets, table, engine_cfg.max_segments
    )
    chunks.append(Chunk(table, shape, batches))
  return chunks


def group_order(work: Sequence[batching.WorkItem], prefixes) -> list[int]:
  """Groups by prefix length, those that share items (an MMLU subject's letter and cloze
  forms) side by side, so an item's texts run in one table and it is stored (resumable)
  as soon as that table is done."""
  root = list(range(len(prefixes)))

  def find(g):
    while root[g] != g:
      root[g] = root[root[g]]
      g = root[g]
    return g

  first: dict[str, int] = {}
  for it in work:
    g = first.setdefault(it.sample_id, it.prompt_index)
    root[find(it.prompt_index)] = find(g)
  longest: dict[int, int] = {}
  for g, p in enumerate(prefixes):
    longest[find(g)] = max(longest.get(find(g), 0), len(p))
  return sorted(
      range(len(prefixes)), key=lambda g: (longest[find(g)], find(g), len(prefixes[g]), g)
  )


@dataclasses.dataclass
class Throughput:
  texts: int = 0
  tokens: int = 0  # of the texts, shared prefixes included
  row_tokens: int = 0  # of them computed in batch rows
  padded_tokens: int = 0
  prefix_tokens: int = 0  # prefilled once per group
  seconds: float = 0.0


def run_chunks(
    scorer: engine.Scorer,
    chunks: Sequence[Chunk],
    throughput: Throughput,
) -> Iterator[tuple[int, np.ndarray]]:
  """(text's sample_index, log p of its targets) for every text, a chunk at a time."""
  # One read-out width for the task: fewer compiled shapes; the last layer's extra rows
  # are cheap next to the rows' other layers.
  scorer.read_width = max((engine.read_slots(b) for c in chunks for b in c.batches), default=1)
  for chunk in chunks:
    start = time.perf_counter()
    scorer.load_prefixes(chunk.prefixes, chunk.shape)
    throughput.prefix_tokens += sum(len(p) for p in chunk.prefixes)
    for out in scorer.rate(chunk.batches):
      for r, it in enumerate(out.batch.items):
        yield it.sample_index, out.probs[r, : len(it.read_at)]
      throughput.texts += len(out.batch.items)
      throughput.tokens += out.batch.real_tokens
      throughput.row_tokens += out.batch.row_tokens
      throughput.padded_tokens += out.arrays.tokens.size
    throughput.seconds += time.perf_counter() - start
  logging.info("read-out width %d slots per row", scorer.read_width)


@dataclasses.dataclass(frozen=True)
class FormResult:
  """One item's result under one form."""

  prediction: int
  gold: int
  score: float  # letter, cloze: 1.0 if right; bpb: bits per byte
  logliks: tuple[float, ...]  # per choice: summed log p (nats)
  num_tokens: tuple[int, ...]
  num_bytes: tuple[int, ...]


def form_result(form: Form, logps: Sequence[np.ndarray]) -> FormResult:
  """The metric of a form from its choices' per-token log-probs (letter: one text whose
  reads are the options)."""
  if form.kind == "letter":
    (reads,) = logps
    logliks = tuple(float(x) for x in reads)
    tokens = (1,) * len(logliks)
  else:
    logliks = tuple(float(np.sum(x)) for x in logps)
    tokens = tuple(len(x) for x in logps)
  nbytes = tuple(len(c.encode("utf-8")) for c in form.choices)
  if form.kind == "bpb":
    bpb = -logliks[0] / (math.log(2) * max(nbytes[0], 1))
    return FormResult(0, form.gold, bpb, logliks, tokens, nbytes)
  norm = np.asarray(logliks) / (np.asarray(nbytes) if form.kind == "cloze" else 1)
  prediction = int(np.argmax(norm))
  return FormResult(prediction, form.gold, float(prediction == form.gold), logliks, tokens, nbytes)
