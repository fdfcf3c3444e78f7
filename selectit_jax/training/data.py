"""Fine-tuning data: records -> template text -> tokens + loss mask -> steps -> packed rows.

A record's conversation (by default the instruction/response pair that was rated,
data.train_turns) is rendered as alternating (text, is_target) chunks: the tokenizer's chat
template (each assistant turn's text, closing tokens included, is a target), the Alpaca
layout with EOS after every response, or a template file (TextTemplate). The joined text is
tokenized once; tokens overlapping a target chunk are in the loss.

A step is `batch_size` examples (StepPlan); its examples are packed into rows among
themselves and fed to the optimizer step as micro-batches of rows.

Rows hold next-token pairs: an example of n tokens fills n-1 positions with
inputs = ids[:-1], targets = ids[1:], weights = is_target[1:]. Packed rows carry one
segment id per example (1, 2, ...; 0 = padding) and positions restarting at 0, so the
model's attention never crosses examples.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Sequence

import grain
import numpy as np

from selectit_jax.data.records import Record
from selectit_jax.errors import UserError

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")
TOO_LONG = ("truncate", "drop")
TEMPLATES = ("auto", "chat", "alpaca")  # or a template file (*.json)
TRAIN_TURNS = ("rated", "all")
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


@dataclasses.dataclass(frozen=True)
class TextTemplate:
  """A plain-text conversation layout (no chat template): `system` once at the start, then for
  every answer `prompt` (with the user text before it as "{instruction}") and `response` (the
  answer as "{response}": the target, in the loss), `turn_sep` between an answer and the next
  prompt. "{bos}" / "{eos}" anywhere stand for the tokenizer's BOS / EOS token text;
  add_special_tokens: whether the tokenizer adds its own (LLaMA-2: BOS) around the whole text."""

  prompt: str
  response: str = "{response}{eos}"
  system: str = ""
  turn_sep: str = "\n\n"
  add_special_tokens: bool = True


_TEMPLATE_KEYS = {f.name for f in dataclasses.fields(TextTemplate)}


def load_template_file(path: str) -> TextTemplate:
  """A JSON object with TextTemplate's fields ("description" is allowed and ignored); e.g.
  configs/templates/llmzoo.json, the released training format's layout."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"data.template={path}: not JSON ({e})") from e
  if not isinstance(obj, dict):
    raise UserError(f"data.template={path}: expected a JSON object of {sorted(_TEMPLATE_KEYS)}")
  obj.pop("description", None)
  unknown = set(obj) - _TEMPLATE_KEYS
  if unknown or "prompt" not in obj:
    raise UserError(
        f"data.template={path}: "
        + (f"unknown keys {sorted(unknown)}" if unknown else "no 'prompt'")
        + f"; keys: {sorted(_TEMPLATE_KEYS)} (and 'description')"
    )
  for key, value in obj.items():
    kind = bool if key == "add_special_tokens" else str
    if not isinstance(value, kind):
      raise UserError(f"data.template={path}: {key!r} must be a {kind.__name__}")
  tpl = TextTemplate(**obj)
  for key, slot in (("prompt", "{instruction}"), ("response", "{response}")):
    if getattr(tpl, key).count(slot) != 1:
      raise UserError(f"data.template={path}: {key!r} must contain {slot} exactly once")
  return tpl


def resolve_template(tokenizer, data_cfg) -> str | TextTemplate:
  """'chat' (the tokenizer's own chat template) or the TextTemplate data.template names:
  'auto' = chat when the tokenizer has one, else alpaca; 'alpaca' = data.alpaca_prompt;
  a path = a template file."""
  template = data_cfg.template
  has_chat = bool(getattr(tokenizer.hf, "chat_template", None))
  if template == "chat" and not has_chat:
    raise UserError(
        "data.template='chat' but the tokenizer has no chat template; use 'alpaca', 'auto' "
        "or a template file"
    )
  if template == "auto":
    template = "chat" if has_chat else "alpaca"
  if template == "chat":
    return "chat"
  if template == "alpaca":
    return TextTemplate(prompt=data_cfg.alpaca_prompt, turn_sep=data_cfg.alpaca_turn_sep)
  if template.endswith(".json"):
    return load_template_file(template)
  raise UserError(
      f"data.template={template!r}; expected one of {TEMPLATES} or a template file (.json)"
  )


def conversation(record: Record, train_turns: str) -> list[tuple[str, str]]:
  """(role, text) turns to train on: 'rated' = the instruction/response pair the rater scored
  (data.turns picked it), 'all' = the whole conversation, every assistant turn a target."""
  if train_turns not in TRAIN_TURNS:
    raise UserError(f"data.train_turns={train_turns!r}; expected one of {TRAIN_TURNS}")
  if train_turns == "rated" or not record.turns:
    return [("user", record.instruction), ("assistant", record.response)]
  turns = list(record.turns)
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
      raise UserError(
          "the tokenizer's chat template does not render conversations "
          "prefix by prefix (it rewrites earlier turns); use "
          "data.template='alpaca' or a template file"
      )
    chunks += [(prompt[len(prev) :], False), (full[len(prompt) :], True)]
    prev = full
  return chunks


def _fill(text: str, tokenizer, **slots) -> str:
  # str.replace, not str.format: a template's own braces and the records' text stay as they are.
  for key, value in (("bos", tokenizer.hf.bos_token or ""), ("eos", tokenizer.hf.eos_token or "")):
    text = text.replace("{" + key + "}", value)
  for key, value in slots.items():
    text = text.replace("{" + key + "}", value)
  return text


def text_chunks(turns, tpl: TextTemplate, tokenizer) -> list[tuple[str, bool]]:
  """A TextTemplate's chunks; user (and system) text before an answer forms its instruction
  (joined by blank lines)."""
  chunks, pending = [], []
  if tpl.system:
    chunks.append((_fill(tpl.system, tokenizer), False))
  answered = False
  for role, text in turns:
    if role != "assistant":
      pending.append(text)
      continue
    prompt = _fill(tpl.prompt, tokenizer, instruction="\n\n".join(pending))
    if answered:
      prompt = _fill(tpl.turn_sep, tokenizer) + prompt
    # The record's text is filled last, so a "{eos}" typed in a record stays text.
    head, tail = _fill(tpl.response, tokenizer).split("{response}")
    chunks += [(prompt, False), (head + text + tail, True)]
    pending, answered = [], True
  return chunks


def end_token_ids(tokenizer, template: str | TextTemplate) -> list[int]:
  """Ids that end an answer: EOS, and every special token the template closes an assistant
  turn with (SmolLM2's chat template: <|im_end|>). The HF export's generation config stops
  on them."""
  ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  answer = "Zq9"
  probe = [("user", "q"), ("assistant", answer)]
  if template == "chat":
    target = chat_chunks(tokenizer, probe)[-1][0]
  else:
    target = text_chunks(probe, template, tokenizer)[-1][0]
  closing = target[target.rindex(answer) + len(answer) :]
  special = set(tokenizer.hf.all_special_ids)
  for i in tokenizer.hf(closing, add_special_tokens=False)["input_ids"]:
    if i in special and i not in ids and i != tokenizer.bos_id:
      ids.append(int(i))
  return ids


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
  template = resolve_template(tokenizer, data_cfg)
  too_long = data_cfg.too_long
  if too_long not in TOO_LONG:
    raise UserError(f"data.too_long={too_long!r}; expected one of {TOO_LONG}")
  if template != "chat" and "{eos}" in template.response and not tokenizer.hf.eos_token:
    raise UserError("the tokenizer has no EOS token to close responses with ({eos})")
  limit = int(data_cfg.max_length) + 1  # n tokens fill n-1 next-token positions
  stats = PrepStats(records=len(records))
  examples = []
  for rec in records:
    turns = conversation(rec, data_cfg.train_turns)
    if not any(r == "assistant" and t.strip() for r, t in turns):
      stats.dropped["no assistant response to train on"] += 1
      continue
    if template == "chat":
      # The template adds whatever BOS / closing tokens the model was tuned with.
      ids, target = tokenize_chunks(tokenizer, chat_chunks(tokenizer, turns), add_special=False)
    else:
      chunks = text_chunks(turns, template, tokenizer)
      ids, target = tokenize_chunks(tokenizer, chunks, template.add_special_tokens)
      answers = sum(t for _, t in chunks)
      if int((ids[target] == tokenizer.eos_id).sum()) < answers * template.response.count("{eos}"):
        raise UserError(
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
  """(train, validation) records by a seeded permutation; at least one train record. With
  val_fraction = val_size = 0 (the default) everything trains."""
  n = len(records)
  n_val = int(val_size) if val_size else int(round(n * float(val_fraction)))
  n_val = min(max(n_val, 0), max(n - 1, 0))
  order = np.random.default_rng(seed).permutation(n)
  val = sorted(order[:n_val].tolist())
  val_set = set(val)
  return [r for i, r in enumerate(records) if i not in val_set], [records[i] for i in val]


def plan_rows(lengths: Sequence[int], max_length: int, pack: bool = True) -> list[list[int]]:
  """Which examples (by position in `lengths`, each its number of next-token positions) share
  a row: first-fit in the given order among the last open rows; `pack=False`: one a row."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i, need in enumerate(lengths):
    if need > max_length:
      raise ValueError(
          f"an example has {need} positions, more than max_length={max_length} "
          "(prepare() with the same max_length)"
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
    rows[slot].append(i)
    free[slot] -= need
  return rows


def build_rows(
    examples: Sequence[Example], plan: Sequence[Sequence[int]], max_length: int, num_rows: int = 0
) -> dict[str, np.ndarray]:
  """Rows [max(len(plan), num_rows), max_length] of FIELDS; rows past the plan are empty
  (segment 0, weight 0)."""
  n_rows = max(len(plan), num_rows)
  out = {k: np.zeros((n_rows, max_length), np.int32) for k in FIELDS}
  out["weights"] = np.zeros((n_rows, max_length), np.float32)
  for r, row in enumerate(plan):
    pos = 0
    for seg, i in enumerate(row, start=1):
      ex = examples[i]
      n = len(ex.ids) - 1
      sl = slice(pos, pos + n)
      out["inputs"][r, sl] = ex.ids[:-1]
      out["targets"][r, sl] = ex.ids[1:]
      out["weights"][r, sl] = ex.target[1:]
      out["positions"][r, sl] = np.arange(n)
      out["segment_ids"][r, sl] = seg
      pos += n
  return out


def pack(
    examples: Sequence[Example], max_length: int, seed: int | None, pack: bool = True
) -> dict[str, np.ndarray]:
  """Rows [R, max_length] of FIELDS: examples in a seeded order (None: as given), first-fit
  among the last open rows; `pack=False` gives one example per row."""
  order = (
      np.random.default_rng(seed).permutation(len(examples))
      if seed is not None
      else np.arange(len(examples))
  )
  ordered = [examples[i] for i in order]
  plan = plan_rows([len(e.ids) - 1 for e in ordered], max_length, pack)
  return build_rows(ordered, plan, max_length)


class StepPlan:
  """The optimizer steps of a run, as the paper's recipe counts them: every epoch a new
  seeded order of the examples, cut into steps of `batch_size` examples (the last step of an
  epoch takes the rest, as HF Trainer's last batch). A step's examples are packed into rows
  among themselves (first-fit decreasing: longest first), never with another step's, so
  packing changes the rows per step, not the optimizer steps or what each one sees."""

  def __init__(self, examples, batch_size: int, epochs: int, seed: int, max_length: int, pack):
    self.examples, self.batch_size, self.epochs = examples, int(batch_size), int(epochs)
    self.seed, self.max_length, self.pack = int(seed), int(max_length), bool(pack)
    self.lengths = np.array([len(e.ids) - 1 for e in examples], np.int64)
    self.steps_per_epoch = -(-len(examples) // self.batch_size)
    self._orders = {}  # epoch -> permutation (grain may call from several threads: idempotent)

  def __len__(self) -> int:
    return self.steps_per_epoch * self.epochs

  def indices(self, step: int) -> np.ndarray:
    """Example indices of `step` (0-based)."""
    epoch, j = divmod(int(step), self.steps_per_epoch)
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      self._orders[epoch] = order
    return order[j * self.batch_size : (j + 1) * self.batch_size]

  def plan(self, step: int) -> tuple[np.ndarray, list[list[int]]]:
    """(example indices longest first, rows as positions in that list) of `step`."""
    idx = self.indices(step)
    idx = idx[np.argsort(-self.lengths[idx], kind="stable")]
    return idx, plan_rows(self.lengths[idx].tolist(), self.max_length, self.pack)

  def rows_per_step(self) -> np.ndarray:
    """Packed rows of every step (a dry run of the packing, no arrays built)."""
    return np.array([len(self.plan(s)[1]) for s in range(len(self))], np.int64)

  def rows(self, step: int, multiple: int) -> dict[str, np.ndarray]:
    """The step's rows, padded with empty rows to a multiple of `multiple` (the micro-batch)."""
    idx, plan = self.plan(step)
    n = -(-len(plan) // multiple) * multiple
    return build_rows([self.examples[i] for i in idx], plan, self.max_length, n)


def train_dataset(steps: StepPlan, micro: int) -> grain.MapDataset:
  """One element per optimizer step: its packed rows [rows, max_length], rows a multiple of
  `micro`. The iterator's state (its position) is a small dict, checkpointed with the model."""
  return grain.MapDataset.range(len(steps)).map(lambda s: steps.rows(s, micro))


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
