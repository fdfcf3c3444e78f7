"""Records: what an input record says -> Record / Reject.

Formats (config field data.format):
  'sharegpt'  {id, conversations: [{from, value}]}
  'alpaca'    {instruction, input, output}; a non-empty input is appended to the
              instruction after data.alpaca_input_sep (default "\\n\\n").
  'messages'  {messages: [{role, content}]}
  'parquet'   a Parquet file holding any of the shapes above (detected from columns).
  'auto'      container from the extension / first byte, shape from the keys.
  'tfds:<name>' via tensorflow_datasets (optional extra: pip install -e .[tfds]).

Reading the container (JSON array stream, JSON Lines, Parquet, TFDS) and writing
records back into one live in containers.py. Text that is not encodable as UTF-8 at
all (lone surrogate escapes such as "\\ud800" in the JSON) is rejected here, since it
can be neither tokenized nor written back.

Turn policies (data.turns) pick the (instruction, response) pair of a chat record:
  'first'       the conversation must open (after system turns) with a user turn
                answered by an assistant turn; that pair. Else a Reject.
  'first_user'  the first user turn, wherever it is (leading assistant and system
                turns skipped), and the assistant turn right after it.
  'released'    turns 0 and 1 whoever speaks them, as the released code.

Every record read gets an index (0-based position in the input, rejected ones
included) and a stable id: its own 'id' field (str, or int converted) else str(index).
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable

from absl import logging

from selectit_jax import fileio
from selectit_jax.data import containers
from selectit_jax.data.containers import Bad

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bing", "bard"})
SYSTEM_ROLES = frozenset({"system"})
SHAPES = ("sharegpt", "alpaca", "messages")
_CHAT_SHAPES = ("sharegpt", "messages")  # the formats turn policies apply to
TURN_POLICIES = ("first", "first_user", "released")


@dataclasses.dataclass(frozen=True)
class Record:
  id: str
  index: int
  instruction: str
  response: str
  raw: Any = dataclasses.field(compare=False, repr=False)
  turns: tuple = ()  # ((role, text), ...) roles normalised to system/user/assistant


@dataclasses.dataclass(frozen=True)
class Reject:
  index: int
  id: str | None
  reason: str


@dataclasses.dataclass(frozen=True)
class ReadInfo:
  path: str
  format: str  # shape: sharegpt | alpaca | messages ('' if nothing was read)
  num_read: int
  num_ok: int
  num_rejected: int
  truncated_at: int | None  # byte offset where an incomplete JSON tail starts
  bytes_read: int
  container: str = ""  # json | jsonl | parquet | tfds: the layout write_records needs
  # {turn policy: records read that it accepts}, counted in the same pass (chat formats).
  turn_counts: dict = dataclasses.field(default_factory=dict)


def _get(cfg, name, default):
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def content_hash(record: Record) -> str:
  """sha256 hex (first 16) of instruction + "\\0" + response: the store's sample key."""
  text = record.instruction + "\0" + record.response
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------- validation


def _shape_of(keys) -> str | None:
  keys = set(keys)
  if "conversations" in keys:
    return "sharegpt"
  if "messages" in keys:
    return "messages"
  if "instruction" in keys and "output" in keys:
    return "alpaca"
  return None


def _type(x):
  return type(x).__name__


def _text(obj, key, where):
  if key not in obj:
    raise Bad(f"missing field {where}{key}")
  v = obj[key]
  if not isinstance(v, str):
    raise Bad(f"field {where}{key} is {_type(v)}, expected str")
  return v


def _norm_role(role):
  r = role.lower()
  if r in USER_ROLES:
    return "user"
  if r in ASSISTANT_ROLES:
    return "assistant"
  if r in SYSTEM_ROLES:
    return "system"
  return role


def _chat(obj, list_key, role_key, text_key, policy):
  conv = obj.get(list_key)
  if list_key not in obj:
    raise Bad(f"missing field {list_key}")
  if not isinstance(conv, list):
    raise Bad(f"field {list_key} is {_type(conv)}, expected list")
  turns = []
  for j, t in enumerate(conv):
    where = f"{list_key}[{j}]."
    if not isinstance(t, dict):
      raise Bad(f"{list_key}[{j}] is {_type(t)}, expected object")
    turns.append((_norm_role(_text(t, role_key, where)), _text(t, text_key, where)))
  j = _pair_start(turns, [t[role_key] for t in conv], list_key, policy)
  return turns[j][1], turns[j + 1][1], turns


def _pair_start(turns, roles, list_key, policy) -> int:
  """Index of the instruction turn under `policy` (the response follows it), or Bad.

  `roles` are the record's own role names, for the reject reasons."""
  if policy == "released":
    # The released code: the first two turns, whoever speaks them.
    if len(turns) < 2:
      raise Bad(f"{list_key} has {len(turns)} turn(s), need 2")
    return 0
  j = 0
  # 'first' skips system turns only: an assistant-first record is rejected. 'first_user'
  # also skips assistant turns, since split conversations resume mid-dialogue.
  skip = ("system",) if policy == "first" else ("system", "assistant")
  while j < len(turns) and turns[j][0] in skip:
    j += 1
  if j >= len(turns):
    raise Bad(f"{list_key} has no user turn")
  if turns[j][0] != "user":
    raise Bad(f"first turn is from {roles[j]!r}, not the user")
  if j + 1 >= len(turns):
    raise Bad(f"{list_key} has no assistant turn after the first user turn")
  if turns[j + 1][0] != "assistant":
    # A later user turn is not taken: the answer would also answer the unanswered one.
    raise Bad(f"turn after the first user turn is from {roles[j + 1]!r}, not the assistant")
  return j


def _parse(obj, shape, policy, sep):
  """obj -> (instruction, response, turns) or raises Bad."""
  if not isinstance(obj, dict):
    raise Bad(f"record is {_type(obj)}, not an object")
  if shape == "sharegpt":
    ins, res, turns = _chat(obj, "conversations", "from", "value", policy)
  elif shape == "messages":
    ins, res, turns = _chat(obj, "messages", "role", "content", policy)
  else:
    ins = _text(obj, "instruction", "")
    res = _text(obj, "output", "")
    inp = obj.get("input")
    if inp is not None and not isinstance(inp, str):
      raise Bad(f"field input is {_type(inp)}, expected str")
    if not ins.strip():
      raise Bad("empty instruction")
    if inp and inp.strip():
      ins = ins + sep + inp
    turns = [("user", ins), ("assistant", res)]
  if not ins.strip():
    raise Bad("empty instruction")
  if not res.strip():
    raise Bad("empty response")
  for _, t in turns:
    try:
      t.encode("utf-8")
    except UnicodeEncodeError:
      raise Bad("text is not valid UTF-8 (unpaired surrogate)") from None
  return ins, res, tuple(turns)


def _own_id(obj):
  if not isinstance(obj, dict) or obj.get("id") is None:
    return None
  v = obj["id"]
  if isinstance(v, str):
    return v
  if isinstance(v, int) and not isinstance(v, bool):
    return str(v)
  raise Bad(f"field id is {_type(v)}, expected str or int")


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Settings:
  """config.data, checked."""

  path: str
  format: str
  limit: int
  policy: str
  sep: str
  split: str


def _resolve(cfg_data) -> _Settings:
  """Reads and checks config.data; an empty path means the embedded ShareGPT file."""
  path = str(_get(cfg_data, "path", "") or "")
  fmt = str(_get(cfg_data, "format", "auto") or "auto")
  limit = int(_get(cfg_data, "limit", 0) or 0)
  policy = str(_get(cfg_data, "turns", "first") or "first")
  if policy not in TURN_POLICIES:
    raise ValueError(f"data.turns={policy!r}; expected one of {TURN_POLICIES}")
  if limit < 0:
    raise ValueError(f"data.limit={limit}; expected >= 0 (0 = all)")
  valid = ("auto", "parquet") + SHAPES
  if fmt not in valid and not fmt.startswith("tfds:"):
    raise ValueError(f"data.format={fmt!r}; expected one of {valid} or 'tfds:<name>'")
  if not path and not fmt.startswith("tfds:"):
    from selectit_jax import assets  # pylint: disable=g-import-not-at-top

    path = assets.data_path(cfg_data)
  return _Settings(
      path,
      fmt,
      limit,
      policy,
      _get(cfg_data, "alpaca_input_sep", "\n\n"),
      _get(cfg_data, "split", "train"),
  )


def _parse_all(items, s: _Settings, path: str):
  """(records, rejects, num_read, shape, turn_counts) from the (index, obj | Bad) items."""
  shape = s.format if s.format in SHAPES else None
  records, rejects, first_index_of = [], [], {}
  turn_counts = dict.fromkeys(TURN_POLICIES, 0)
  num_read = 0
  for index, obj in items:
    num_read += 1
    rid = None
    if not isinstance(obj, Bad) and (shape or "sharegpt") in _CHAT_SHAPES:
      for policy, n in turn_policy_counts([obj], shape, s.sep).items():
        turn_counts[policy] += n
    try:
      if isinstance(obj, Bad):
        raise obj
      rid = _own_id(obj)
      if shape is None:
        shape = _shape_of(obj.keys()) if isinstance(obj, dict) else None
        if shape is None and isinstance(obj, dict):
          raise ValueError(
              f"{path}: cannot tell the format from the keys {sorted(obj)[:10]} of "
              f"record {index}; set data.format to one of {SHAPES}"
          )
      ins, res, turns = _parse(obj, shape or "sharegpt", s.policy, s.sep)
      sid = rid if rid is not None else str(index)
      if sid in first_index_of:
        raise Bad(f"duplicate id {sid!r} (first at index {first_index_of[sid]})")
      first_index_of[sid] = index
      records.append(Record(sid, index, ins, res, obj, turns))
    except Bad as e:
      rejects.append(Reject(index, rid, str(e)))
    if s.limit and num_read >= s.limit:
      break
  return records, rejects, num_read, shape, turn_counts


def read_records(cfg_data) -> tuple[list[Record], list[Reject], ReadInfo]:
  """Reads config.data: path, format, limit, turns, alpaca_input_sep (tfds: split)."""
  s = _resolve(cfg_data)
  box = containers.open_container(s.path, s.format, s.split)
  records, rejects, num_read, shape, turn_counts = _parse_all(box, s, box.path)
  info = ReadInfo(
      path=box.path,
      format=shape or "",
      num_read=num_read,
      num_ok=len(records),
      num_rejected=len(rejects),
      truncated_at=box.truncated_at,
      bytes_read=box.bytes_read,
      container=box.kind,
      turn_counts=turn_counts if shape in _CHAT_SHAPES else {},
  )
  logging.info(
      "read %s: %d records (%d ok, %d rejected) format=%s/%s",
      box.path,
      num_read,
      len(records),
      len(rejects),
      info.format,
      box.kind,
  )
  return records, rejects, info


def turn_policy_counts(
    objs: Iterable[Any], shape: str | None = None, sep: str = "\n\n"
) -> dict[str, int]:
  """{policy: how many of the raw objects it accepts}, for every turn policy.

  Per record, as read_records parses it (shape from each object's keys unless given);
  ids are not checked, so duplicates count here but are rejected when reading."""
  counts = dict.fromkeys(TURN_POLICIES, 0)
  for obj in objs:
    if isinstance(obj, Bad):
      continue
    rec_shape = shape or (_shape_of(obj.keys()) if isinstance(obj, dict) else None)
    for policy in TURN_POLICIES:
      try:
        _parse(obj, rec_shape or "sharegpt", policy, sep)
      except Bad:
        continue
      counts[policy] += 1
  return counts


# --------------------------------------------------------------------------- rejects


def reject_dict(r: Reject) -> dict:
  return {"index": r.index, "id": r.id, "reason": r.reason}


def write_rejects(path: str, rejects, append: bool = False) -> None:
  """JSONL {index, id, reason}; overwrites atomically unless append."""
  if append:
    lines = "".join(json.dumps(reject_dict(r), ensure_ascii=False) + "\n" for r in rejects)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
      f.write(lines)
      f.flush()
      os.fsync(f.fileno())
  else:
    fileio.write_jsonl(path, map(reject_dict, rejects))
