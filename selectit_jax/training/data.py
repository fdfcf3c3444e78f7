"""Fine-tuning data: records -> template text -> tokens + loss mask -> packed rows -> grain.

A record's conversation is rendered as alternating (text, is_target) chunks: the
tokenizer's chat template when it has one (each assistant turn's text, closing tokens
included, is a target), else an Alpaca-style template with EOS after every response.
The joined text is tokenized once; tokens overlapping a target chunk are in the loss.

Rows hold next-token pairs: an example of n tokens fills n-1 positions with
inputs = ids[:-1], targets = ids[1:], weights = is_target[1:]. Packed rows carry one
segment id per example (1, 2, ...; 0 = padding) and positions restarting at 0, so the
model's attention never crosses examples.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import grain
import numpy as np

from selectit_jax.data.records import Record

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")
TOO_LONG = ("truncate", "drop")
TEMPLATES = ("auto", "chat", "alpaca")
# First-fit packing looks back this many open rows (bounded cost on big selections).
_OPEN_ROWS = 64


@dataclasses.dataclass
class Example:
  ids: np.ndarray  # [n] int32
  target: np.ndarray  # [n] bool: token is part of a response (predicted, so in the loss)
  record_index: int


@dataclasses.dataclass
class PrepStats:
  """What happened to each record on its way to training examples."""

  records: int = 0
  examples: int = 0
  tokens: int = 0
  target_tokens: int = 0
  truncated: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def lines(self) -> list[str]:
    out = [
        f"{self.records} records -> {self.examples} examples, {self.tokens} tokens "
        f"({self.target_tokens} in the loss); truncated to max_length: {self.truncated}"
    ]
    out += [f"dropped {n}: {reason}" for reason, n in sorted(self.dropped.items())]
    return out


def resolve_template(tokenizer, template: str) -> str:
  if template not in TEMPLATES:
    raise ValueError(f"data.template={template!r}; expected one of {TEMPLATES}")
  has_chat = bool(getattr(tokenizer.hf, "chat_template", None))
  if template == "chat" and not has_chat:
    raise ValueError(
        "data.template='chat' but the tokenizer has no chat template; " "use 'alpaca' or 'auto'"
    )
  if template == "auto":
    return "chat" if has_chat else "alpaca"
  return template


def conversation(record: Record, multi_turn: bool) -> list[tuple[str, str]]:
  """(role, text) turns to train on: all of them, or the first user/assistant pair."""
  turns = list(record.turns) or [("user", record.instruction), ("assistant", record.response)]
  if not multi_turn:
    return [("user", record.instruction), ("assistant", record.response)]
  # Trailing turns after the last assistant answer teach nothing.
  while turns and turns[-1][0] != "assistant":
    turns.pop()
  return turns


def chat_chunks(tokenizer, turns) -> list[tuple[str, bool]]:
  """Chunks from the chat template: the text each assistant turn adds is a target."""
  hf = tokenizer.hf
  messages = [{"role": r, "content": t} for r, t in turns]
  chunks, prev = [], ""
  for k, (role, _) in enumerate(turns):
    if role != "assistant":
      continue
    prompt = hf.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
    full = hf.apply_chat_template(messages[: k + 1], tokenize=False)
    if not (prompt.startswith(prev) and full.startswith(prompt)):
      raise ValueError(
          "the tokenizer's chat template does not render conversations "
          "prefix by prefix (it rewrites earlier turns); use "
          "data.template='alpaca'"
      )
    chunks += [(prompt[len(prev) :], False), (full[len(prompt) :], True)]
    prev = full
  return chunks


def alpaca_chunks(
    turns, prompt_template: str, turn_sep: str, eos_text: str
) -> list[tuple[str, bool]]:
  """Alpaca layout; user (and system) text before an answer forms its instruction; every
  answer ends with the EOS token (as text, which the tokenizer maps to its id)."""
  chunks, pending = [], []
  for role, text in turns:
    if role != "assistant":
      pending.append(text)
      continue
    prompt = prompt_template.format(instruction="\n\n".join(pending))
    if chunks:
      prompt = turn_sep + prompt
    chunks += [(prompt, False), (text + eos_text, True)]
    pending = []
  return chunks


def tokenize_chunks(tokenizer, chunks, add_special: bool):
  """ids and target mask of the joined chunks, tokenized in one pass (SentencePiece adds a
  dummy-prefix space to every separately encoded piece); a token is a target when its
  characters overlap a target chunk, so one merged across the boundary counts."""
  text = "".join(t for t, _ in chunks)
  enc = tokenizer.hf(text, add_special_tokens=add_special, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
  starts, ends = offsets[:, 0], offsets[:, 1]
  target = np.zeros(len(ids), bool)
  pos = 0
  for chunk, is_target in chunks:
    if is_target:
      target |= (ends > pos) & (starts < pos + len(chunk)) & (ends > starts)
    pos += len(chunk)
  return ids, target


def prepare(records: Sequence[Record], tokenizer, data_cfg) -> tuple[list[Example], PrepStats]:
  """Records -> examples of at most max_length + 1 tokens, every drop counted by reason."""
  template = resolve_template(tokenizer, data_cfg.template)
  too_long = data_cfg.too_long
  if too_long not in TOO_LONG:
    raise ValueError(f"data.too_long={too_long!r}; expected one of {TOO_LONG}")
  if template == "alpaca" and (tokenizer.eos_id is None or not tokenizer.hf.eos_token):
    raise ValueError("the tokenizer has no EOS token to close alpaca responses")
  limit = int(data_cfg.max_length) + 1  # n tokens fill n-1 next-token positions
  stats = PrepStats(records=len(records))
  examples = []
  for rec in records:
    turns = conversation(rec, data_cfg.multi_turn)
    if not any(r == "assistant" and t.strip() for r, t in turns):
      stats.dropped["no assistant response to train on"] += 1
      continue
    if template == "chat":
      # The template adds whatever BOS / closing tokens the model was tuned with.
      ids, target = tokenize_chunks(tokenizer, chat_chunks(tokenizer, turns), add_special=False)
    else:
      chunks = alpaca_chunks(
          turns, data_cfg.alpaca_prompt, data_cfg.alpaca_turn_sep, tokenizer.hf.eos_token
      )
      ids, target = tokenize_chunks(tokenizer, chunks, add_special=True)
      if int((ids[target] == tokenizer.eos_id).sum()) != sum(t for _, t in chunks):
        raise ValueError(
            f"the EOS text {tokenizer.hf.eos_token!r} does not tokenize to the "
            f"EOS id {tokenizer.eos_id} inside text"
        )
    if len(ids) > limit:
      if too_long == "drop":
        stats.dropped[f"longer than max_length={data_cfg.max_length} (too_long=drop)"] += 1
        continue
      ids, target = ids[:limit], target[:limit]
      stats.truncated += 1
    if not target[1:].any():
      stats.dropped[f"no response token within max_length={data_cfg.max_length}"] += 1
      continue
    examples.append(Example(ids, target, rec.index))
    stats.examples += 1
    stats.tokens += len(ids)
    stats.target_tokens += int(target[1:].sum())
  return examples, stats


def split(records: Sequence[Record], val_fraction: float, val_size: int, seed: int):
  """(train, validation) records by a seeded permutation; at least one train record."""
  n = len(records)
  n_val = int(val_size) if val_size else int(round(n * float(val_fraction)))
  n_val = min(max(n_val, 0), max(n - 1, 0))
  order = np.random.default_rng(seed).permutation(n)
  val = sorted(order[:n_val].tolist())
  val_set = set(val)
  return [r for i, r in enumerate(records) if i not in val_set], [records[i] for i in val]


def pack(
    examples: Sequence[Example], max_length: int, seed: int | None, pack: bool = True
) -> dict[str, np.ndarray]:
  """Rows [R, max_length] of FIELDS. Examples go in a seeded order, first-fit among the
  last open rows; `pack=False` gives one example per row."""
  order = (
      np.random.default_rng(seed).permutation(len(examples))
      if seed is not None
      else np.arange(len(examples))
  )
  rows: list[list[Example]] = []
  free: list[int] = []
  for i in order:
    ex = examples[i]
    need = len(ex.ids) - 1
    if need > max_length:
      raise ValueError(
          f"example of record {ex.record_index} has {need} positions, more than "
          f"max_length={max_length} (prepare() with the same max_length)"
      )
    slot = None
    if pack:
      for r in range(max(0, len(rows) - _OPEN_ROWS), len(rows)):
        if free[r] >= need:
          slot = r
          break
    if slot is None:
      rows.append([])
      free.append(max_length)
      slot = len(rows) - 1
    rows[slot].append(ex)
    free[slot] -= need
  out = {k: np.zeros((len(rows), max_length), np.int32) for k in FIELDS}
  out["weights"] = np.zeros((len(rows), max_length), np.float32)
  for r, row in enumerate(rows):
    pos = 0
    for seg, ex in enumerate(row, start=1):
      n = len(ex.ids) - 1
      sl = slice(pos, pos + n)
      out["inputs"][r, sl] = ex.ids[:-1]
      out["targets"][r, sl] = ex.ids[1:]
      out["weights"][r, sl] = ex.target[1:]
      out["positions"][r, sl] = np.arange(n)
      out["segment_ids"][r, sl] = seg
      pos += n
  return out


class RowSource:
  """Packed rows as a grain random-access source of dicts."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self._rows = rows
    self._n = len(rows["inputs"])

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self._rows.items()}


def steps_per_run(num_rows: int, epochs: int, batch_size: int) -> int:
  """Optimizer steps over all epochs; batches may span an epoch boundary."""
  return (num_rows * epochs) // batch_size


def train_dataset(
    rows: dict[str, np.ndarray], epochs: int, batch_size: int, seed: int
) -> grain.MapDataset:
  """Rows reshuffled every epoch (grain derives a new order per repetition), batched by
  the global batch; its iterator state is a small dict, checkpointed with the model."""
  return (
      grain.MapDataset.source(RowSource(rows))
      .shuffle(seed=seed)
      .repeat(epochs)
      .batch(batch_size, drop_remainder=True)
  )


def eval_batches(rows: dict[str, np.ndarray], batch_size: int):
  """Validation rows in order, the last batch padded with empty rows (weight 0)."""
  n = len(rows["inputs"])
  for start in range(0, n, batch_size):
    batch = {k: v[start : start + batch_size] for k, v in rows.items()}
    short = batch_size - len(batch["inputs"])
    if short:
      batch = {
          k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()
      }
    yield batch
