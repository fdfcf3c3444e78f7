"""The scoring plan, pure Python: rating texts -> token ids -> shared prefixes, packed rows,
length buckets -> batches.

Each rating prompt's leading tokens, common to all its texts, are computed once (the engine
keeps their keys and values). A row holds the rest of one or more texts of one prompt
(segments, masked from each other), padded to one of at most `max_shapes` bucket lengths,
chosen for the packed rows. Batches are planned once from all work, so a resumed run
recomputes exactly the batches an uninterrupted run would, and its probabilities are
bit-identical.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Callable, Iterable, Sequence

import numpy as np

from selectit_jax.checkpoints.tokenizer import Tokenizer
from selectit_jax.data import prompts as prompts_lib
from selectit_jax.data import records as records_lib
from selectit_jax.models import costs
from selectit_jax.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class WorkItem:
  """One (sample, prompt) text to rate. `ids`: its token ids, int32 and read-only (any
  sequence given is converted; `prepare` gives views into a `TokenArena`)."""

  sample_index: int
  sample_id: str
  content_hash: str
  prompt_index: int
  prompt_hash: str
  ids: np.ndarray
  truncated: bool = False
  # The log-likelihood step (`engine.target_logprobs_fn`): positions in `ids` whose
  # next-token log-probabilities are read, and the token id scored at each. Empty: the
  # rating read-out, at the last token.
  reads: tuple[int, ...] = ()
  targets: tuple[int, ...] = ()

  @property
  def read_at(self) -> tuple[int, ...]:
    """The positions in `ids` read after the last layer."""
    return self.reads or (len(self.ids) - 1,)

  def __post_init__(self):
    if not (isinstance(self.ids, np.ndarray) and self.ids.dtype == np.int32):
      ids = np.array(self.ids, np.int32).reshape(-1)
      ids.flags.writeable = False
      object.__setattr__(self, "ids", ids)

  def key(self, model_key: str) -> tuple[str, str, str]:
    """Its row's key in the store (`store.KEY_COLUMNS`)."""
    return (self.content_hash, model_key, self.prompt_hash)


class TokenArena:
  """Token ids of many texts in a few flat int32 buffers of `chunk` tokens: 4 bytes a token
  where a tuple of Python ints costs ~36 (at 1M records × 5 prompts, GBs instead of tens of
  GBs per host). `add` copies ids in and returns a read-only view."""

  def __init__(self, chunk: int = 1 << 20):
    self.chunk = chunk
    self._buffer = np.empty(0, np.int32)
    self._used = 0

  def add(self, ids: Sequence[int]) -> np.ndarray:
    n = len(ids)
    if self._used + n > len(self._buffer):  # a new buffer; the old one lives on in its views
      self._buffer, self._used = np.empty(max(self.chunk, n), np.int32), 0
    view = self._buffer[self._used : self._used + n]
    view[:] = ids
    view.flags.writeable = False
    self._used += n
    return view


# Truncation split: the response is cut first, but keeps at least this share of a sample's
# token budget (all of it if shorter); the instruction is cut to the rest. The rater needs
# both the task and enough of the answer to judge it, and long samples are the ones the
# paper says matter, so neither part is dropped whole.
RESPONSE_MIN_SHARE = 0.5


TOO_LONG = ("truncate", "reject")


def check_too_long(too_long: str) -> str:
  if too_long not in TOO_LONG:
    raise ValueError(f"engine.too_long={too_long!r}; expected one of {TOO_LONG}")
  return too_long


def prepare(
    records: Sequence[records_lib.Record],
    prompts: Sequence[str],
    template: str,
    tokenizer: Tokenizer,
    max_tokens: int,
    too_long: str = "truncate",
) -> tuple[list[WorkItem], list[records_lib.Reject]]:
  """Tokenizes every (record, prompt) text once.

  A record with a text over `max_tokens`: 'reject' it, or 'truncate' it (`fit_sample`): one
  cut of its instruction and response, the same for all K prompts and fitting under the
  tightest one, so the prompts rate the same text (Eq. 4's std measures the prompts, not the
  cut); the template's closing line ("The answer is: ") stays at the end. A record is
  rejected either way only if a prompt and the template alone exceed `max_tokens`. A rejected
  record is rejected for all its prompts, so it never gets a partial set of scores. A record
  whose text repeats an earlier one's is not rated again: rows are keyed by content, so the
  first copy's scores serve every copy (and its reject, if any, is repeated for each copy).
  """
  check_too_long(too_long)
  hashes = [prompts_lib.prompt_hash(p, template) for p in prompts]
  arena = TokenArena()
  items, rejects = [], []
  first_reject = {}  # content hash -> reason (None: rated)
  for rec in records:
    content = records_lib.content_hash(rec)
    if content in first_reject:
      if first_reject[content]:
        rejects.append(records_lib.Reject(rec.index, rec.id, first_reject[content]))
      continue
    ids = tokenizer.encode_batch(
        [prompts_lib.build_text(p, rec.instruction, rec.response, template) for p in prompts]
    )
    over = [k for k, seq in enumerate(ids) if len(seq) > max_tokens]
    reason = None
    if over and too_long == "reject":
      reason = (
          f"{len(ids[over[0]])} tokens with prompt {over[0]}, more than "
          f"engine.max_tokens={max_tokens}"
      )
    elif over:
      ids, reason = fit_sample(prompts, rec, template, tokenizer, max_tokens)
    first_reject[content] = reason
    if reason:
      rejects.append(records_lib.Reject(rec.index, rec.id, reason))
    else:
      items.extend(
          WorkItem(rec.index, rec.id, content, k, hashes[k], arena.add(seq), bool(over))
          for k, seq in enumerate(ids)
      )
  return items, rejects


def split_budget(num_instruction: int, num_response: int, budget: int) -> tuple[int, int]:
  """(instruction, response) tokens to keep within `budget`: the response is cut first,
  down to RESPONSE_MIN_SHARE of the budget (or its length), then the instruction."""
  budget = max(budget, 0)
  response_min = min(num_response, int(budget * RESPONSE_MIN_SHARE))
  keep_instruction = min(num_instruction, budget - response_min)
  return keep_instruction, min(num_response, budget - keep_instruction)


def fit_sample(prompts, rec, template, tokenizer, max_tokens):
  """(token ids per prompt, None) with one cut of the instruction and the response for all
  prompts, or (None, reason) when a prompt and the template alone do not fit.

  The budget is max_tokens less the tightest prompt's tokens without instruction and
  response, split by `split_budget`; each part keeps its leading tokens, cut in the original
  string.
  """
  frames = [
      len(seq)
      for seq in tokenizer.encode_batch(
          [prompts_lib.build_text(p, "", "", template) for p in prompts]
      )
  ]
  tightest = int(np.argmax(frames))
  if frames[tightest] > max_tokens:
    return None, (
        f"prompt {tightest} and the template alone exceed " f"engine.max_tokens={max_tokens}"
    )
  ends = tokenizer.token_ends(rec.instruction), tokenizer.token_ends(rec.response)
  keep = split_budget(len(ends[0]), len(ends[1]), max_tokens - frames[tightest])
  # Parts tokenize a little differently in context than alone; cut further until every
  # prompt's text fits (each round drops at least one token, so it ends).
  while True:
    instruction, response = (
        text[: e[n - 1]] if n else ""
        for text, e, n in zip((rec.instruction, rec.response), ends, keep)
    )
    ids = tokenizer.encode_batch(
        [prompts_lib.build_text(p, instruction, response, template) for p in prompts]
    )
    over = max(map(len, ids)) - max_tokens
    if over <= 0:
      return ids, None
    keep = split_budget(*keep, sum(keep) - over)


def choose_buckets(
    lengths: Iterable[int], max_shapes: int, multiple: int, max_tokens: int
) -> list[int]:
  """At most `max_shapes` padded lengths (multiples of `multiple`) minimising total padding.

  Exact dynamic programme over the distinct rounded lengths; a handful of compiled shapes
  instead of one per length, with less padding than fixed-width buckets.
  """
  rounded = np.minimum(
      -(-np.asarray(list(lengths)) // multiple) * multiple, -(-max_tokens // multiple) * multiple
  )
  cands, counts = np.unique(rounded, return_counts=True)
  n = len(cands)
  if n == 0:
    return []
  if n <= max_shapes:
    return cands.tolist()
  # cost[i][j]: padding when items of candidates i..j are all padded to cands[j].
  cum_n = np.concatenate([[0], np.cumsum(counts)])
  cum_l = np.concatenate([[0], np.cumsum(counts * cands)])

  def cost(i, j):
    return (cum_n[j + 1] - cum_n[i]) * cands[j] - (cum_l[j + 1] - cum_l[i])

  inf = float("inf")
  best = np.full((max_shapes + 1, n), inf)
  back = np.zeros((max_shapes + 1, n), int)
  for j in range(n):
    best[1][j] = cost(0, j)
  for s in range(2, max_shapes + 1):
    for j in range(n):
      for i in range(1, j + 1):
        c = best[s - 1][i - 1] + cost(i, j)
        if c < best[s][j]:
          best[s][j], back[s][j] = c, i
  s, j, out = max_shapes, n - 1, []
  while j >= 0 and s >= 1:
    out.append(int(cands[j]))
    j = back[s][j] - 1 if s > 1 else -1
    s -= 1
  return sorted(out)


def shared_prefixes(items: Sequence[WorkItem]) -> tuple[tuple[int, ...], ...]:
  """Per prompt index, the token ids all of its texts start with (the rating prompt and the
  template's lead-in): computed once, their keys and values serve every row.

  Ends before each text's first read position (its last token for a rating), so every row
  keeps the tokens read. Derived from all planned work, so a resumed run gets the same split.
  """
  by_prompt: dict[int, list[np.ndarray]] = {}
  first_read: dict[int, int] = {}
  for it in items:
    by_prompt.setdefault(it.prompt_index, []).append(it.ids)
    first_read[it.prompt_index] = min(first_read.get(it.prompt_index, len(it.ids)), it.read_at[0])
  out = []
  for k in range(max(by_prompt, default=-1) + 1):
    seqs = by_prompt.get(k, [])
    n = first_read.get(k, 0)
    first = seqs[0][:n] if seqs else np.zeros(0, int)
    for seq in seqs[1:]:
      differ = np.flatnonzero(seq[:n] != first[:n])
      n = int(differ[0]) if differ.size else n
    out.append(tuple(first[:n].tolist()))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Batch:
  """Rows of one padded length; a row packs one or more texts of one prompt (segments), each
  text's tokens after that prompt's shared prefix."""

  rows: tuple[tuple[WorkItem, ...], ...]
  length: int
  skips: tuple[int, ...]  # per row, the shared-prefix tokens its texts leave out

  @property
  def items(self) -> tuple[WorkItem, ...]:
    return tuple(it for row in self.rows for it in row)

  @property
  def real_tokens(self) -> int:
    return sum(len(it.ids) for it in self.items)

  @property
  def row_tokens(self) -> int:
    return sum(len(it.ids) - skip for row, skip in zip(self.rows, self.skips) for it in row)


def prefix_length(prompt_index: int, prefixes: Sequence[Sequence[int]]) -> int:
  """Tokens of a prompt's shared prefix (0 without the prefix cache)."""
  return len(prefixes[prompt_index]) if prefixes else 0


def row_length(it: WorkItem, prefixes: Sequence[Sequence[int]]) -> int:
  """Tokens of a text that go into a row: those after its prompt's shared prefix."""
  return len(it.ids) - prefix_length(it.prompt_index, prefixes)


def pack_rows(
    items: Sequence[WorkItem],
    buckets: Sequence[int],
    prefixes: Sequence[Sequence[int]],
    max_segments: int,
) -> list[tuple[int, tuple[WorkItem, ...]]]:
  """(bucket, texts) rows: best-fit decreasing within each prompt.

  Longest texts first; each goes into the open row of its prompt with the least room that
  still fits it (at most `max_segments` texts a row), else opens a row of the smallest bucket
  that holds it. Short texts then fill the padding that long ones leave, instead of each
  padding a row of its own. Deterministic: texts are ordered by (length, sample).
  """
  by_prompt: dict[int, list[WorkItem]] = {}
  for it in items:
    by_prompt.setdefault(it.prompt_index, []).append(it)
  out = []
  for k in sorted(by_prompt):
    rows: list[tuple[int, list[WorkItem]]] = []  # (bucket, texts)
    room: list[tuple[int, int]] = []  # sorted (free tokens, row number) of rows with a free slot
    for it in sorted(by_prompt[k], key=lambda it: (-row_length(it, prefixes), it.sample_index)):
      n = row_length(it, prefixes)
      at = bisect.bisect_left(room, (n, -1))
      if at < len(room):
        free, r = room.pop(at)
      else:
        r, free = len(rows), next(b for b in buckets if b >= n)
        rows.append((free, []))
      rows[r][1].append(it)
      if len(rows[r][1]) < max_segments and free > n:
        bisect.insort(room, (free - n, r))
    out += [(bucket, tuple(row)) for bucket, row in rows]
  return out


def plan_batches(
    items: Sequence[WorkItem],
    batch_size: int,
    buckets: Sequence[int],
    prefixes: Sequence[Sequence[int]] = (),
    max_segments: int = 1,
) -> list[Batch]:
  """Rows (`pack_rows`) ordered by (bucket, tokens, first text's sample and prompt), cut into
  batches of `batch_size` rows, each padded to the smallest bucket that holds its rows."""
  rows = sorted(
      (
          (
              bucket,
              sum(row_length(it, prefixes) for it in row),
              row[0].sample_index,
              row[0].prompt_index,
              row,
          )
          for bucket, row in pack_rows(items, buckets, prefixes, max_segments)
      ),
      key=lambda r: r[:4],
  )
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    length = next(b for b in buckets if b >= max(r[1] for r in chunk))
    batches.append(
        Batch(
            tuple(r[-1] for r in chunk), length, tuple(prefix_length(r[3], prefixes) for r in chunk)
        )
    )
  return batches


def fit_buckets(
    items: Sequence[WorkItem],
    buckets: Sequence[int],
    batch_size: int,
    prefixes: Sequence[Sequence[int]],
    max_segments: int,
    multiple: int,
    row_cost: Callable[[int, int], float],
    max_items: int = 2048,
) -> list[int]:
  """Buckets that minimise the planned work *after* packing: Σ over batches of
  batch_size · row_cost(length, prefix).

  `choose_buckets` fits the texts' own lengths, but packed rows fill buckets with several
  texts, so fewer, longer shapes often waste less (on 64 ShareGPT records: padding 9.7 % →
  1.7 %). Coordinate descent from `buckets`: each shape but the largest (which must hold the
  longest text) moves to every multiple of `multiple` below it while the work falls. Runs on
  at most `max_items` texts (every k-th sample, all its prompts), so planning stays seconds.
  """
  samples = sorted({it.sample_index for it in items})
  stride = -(-len(items) // max_items)
  keep = set(samples[::stride])
  items = [it for it in items if it.sample_index in keep]
  cost = functools.lru_cache(maxsize=None)(row_cost)

  def work(trial):
    return sum(
        batch_size * cost(b.length, max(b.skips))
        for b in plan_batches(items, batch_size, trial, prefixes, max_segments)
    )

  top = buckets[-1]
  best, best_work = list(buckets), work(buckets)
  improved = True
  while improved:
    improved = False
    for i in range(len(best) - 1):
      for length in range(multiple, top, multiple):
        trial = sorted({*best[:i], length, *best[i + 1 :], top})
        trial_work = work(trial)
        if trial_work < best_work:
          best, best_work, improved = trial, trial_work, True
  return best


@dataclasses.dataclass(frozen=True)
class Plan:
  prefixes: tuple[tuple[int, ...], ...]  # per prompt index; () without the prefix cache
  buckets: list[int]
  batches: list[Batch]


def make_plan(items: Sequence[WorkItem], engine_cfg, model_cfg: LlamaConfig | None = None) -> Plan:
  """The whole run's batches from `config.engine`: shared prefixes (if `prefix_cache`), at
  most `max_shapes` row lengths, up to `max_segments` texts packed per row, batches of
  `batch_size` rows. With `model_cfg` (and `fit_buckets`), the shapes minimise the model's
  FLOPs over the packed rows rather than the texts' padding."""
  prefixes = shared_prefixes(items) if engine_cfg.prefix_cache else ()
  buckets = plan_buckets(items, prefixes, engine_cfg, model_cfg)
  return Plan(
      prefixes,
      buckets,
      plan_batches(items, engine_cfg.batch_size, buckets, prefixes, engine_cfg.max_segments),
  )


def plan_buckets(
    items: Sequence[WorkItem],
    prefixes: Sequence[Sequence[int]],
    engine_cfg,
    model_cfg: LlamaConfig | None = None,
) -> list[int]:
  """`make_plan`'s row lengths: at most `max_shapes`, fitted by FLOPs with `model_cfg`."""
  buckets = choose_buckets(
      [row_length(it, prefixes) for it in items],
      engine_cfg.max_shapes,
      engine_cfg.bucket_multiple,
      engine_cfg.max_tokens,
  )
  fit = model_cfg is not None and engine_cfg.fit_buckets and engine_cfg.max_segments > 1
  if buckets and fit:
    buckets = fit_buckets(
        items,
        buckets,
        engine_cfg.batch_size,
        prefixes,
        engine_cfg.max_segments,
        engine_cfg.bucket_multiple,
        functools.partial(costs.row_flops, model_cfg),
    )
  return buckets
