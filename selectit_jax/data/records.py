"""Input formats -> Record / Reject.

Formats (config field data.format):
  'sharegpt'  {id, conversations: [{from, value}]}
  'alpaca'    {instruction, input, output}; a non-empty input is appended to the
              instruction after data.alpaca_input_sep (default "\\n\\n").
  'messages'  {messages: [{role, content}]}
  'parquet'   a Parquet file holding any of the shapes above (detected from columns).
  'auto'      container from the extension / first byte, shape from the keys.
  'tfds:<name>' via tensorflow_datasets (optional extra: pip install -e .[tfds]).

JSON files are read as a stream: a file whose first non-space byte is '[' is a JSON
array decoded record by record with json.JSONDecoder.raw_decode (bounded memory; a
broken tail is reported in ReadInfo.truncated_at, every complete record is kept); '{'
means JSON Lines (a broken line is a Reject, not fatal). Anything else stops the run.

Undecodable bytes: JSONL lines are decoded strictly, a bad line is a Reject. A JSON
array is decoded with errors='surrogateescape' (the broken bytes survive as U+DC80..
U+DCFF), and a record whose text holds such a character is a Reject. Text that is not
encodable as UTF-8 at all (lone surrogate escapes such as "\\ud800" in the JSON) is
rejected too, since it can be neither tokenized nor written back.

Every record read gets an index (0-based position in the input, rejected ones
included) and a stable id: its own 'id' field (str, or int converted) else str(index).
"""
import codecs
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

from absl import logging

from selectit_jax import fileio

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bing", "bard"})
SYSTEM_ROLES = frozenset({"system"})
SHAPES = ("sharegpt", "alpaca", "messages")
TURN_POLICIES = ("first", "released")

_CHUNK = 1 << 20             # first read of a JSON array; grows for big records
_MAX_RECORD_BYTES = 1 << 28  # a record that does not parse within this is a fatal error
_WS = re.compile(r"[ \t\n\r]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


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
  format: str            # shape: sharegpt | alpaca | messages ('' if nothing was read)
  num_read: int
  num_ok: int
  num_rejected: int
  truncated_at: int | None  # byte offset where an incomplete JSON tail starts
  bytes_read: int
  container: str = ""    # json | jsonl | parquet | tfds: the layout write_records needs


class _Bad(Exception):
  """A record-level problem: becomes a Reject with this message."""


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


# --------------------------------------------------------------------------- reading

def _line_of(path: str, offset: int) -> int:
  """1-based line number of a byte offset (only computed for error messages)."""
  line, done = 1, 0
  with open(path, "rb") as f:
    while done < offset:
      block = f.read(min(1 << 20, offset - done))
      if not block:
        break
      line += block.count(b"\n")
      done += len(block)
  return line


def _sniff(path: str) -> tuple[int, bytes]:
  """(byte offset, value) of the first non-space byte after an optional BOM."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
    base = 0
    if head.startswith(codecs.BOM_UTF8):
      head, base = head[3:], 3
    while True:
      stripped = head.lstrip(b" \t\r\n")
      if stripped or len(head) == 0:
        return base + len(head) - len(stripped), stripped[:1]
      base += len(head)
      head = f.read(1 << 16)


class _JsonArrayStream:
  """Yields (byte_offset, text, obj) for each element of a top-level JSON array.

  After iteration: .truncated_at (byte offset of an incomplete tail or None) and
  .bytes_read (byte offset just after the last element parsed).
  """

  def __init__(self, path: str, start: int):
    self.path = path
    self.start = start  # byte offset of '['
    self.truncated_at = None
    self.bytes_read = 0

  def __iter__(self):
    dec = json.JSONDecoder()
    udec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(self.path, "rb") as f:
      f.seek(self.start + 1)
      buf, pos, eof, chunk = "", 0, False, _CHUNK
      # Byte offsets: buf[mark] starts at byte mark_off; advanced incrementally
      # (positions only move forward) so every byte is encoded once.
      mark, mark_off = 0, self.start + 1

      def byte_at(i):
        nonlocal mark, mark_off
        mark_off += len(buf[mark:i].encode("utf-8", "surrogateescape"))
        mark = i
        return mark_off

      def more(n):
        nonlocal buf, pos, mark, eof
        if pos:
          byte_at(pos)
          buf, pos, mark = buf[pos:], 0, 0
        data = f.read(n)
        eof = not data
        buf += udec.decode(data, final=eof)

      def skip_ws():
        nonlocal pos
        while True:
          pos = _WS.match(buf, pos).end()
          if pos < len(buf) or eof:
            return
          more(chunk)

      first = True
      while True:
        skip_ws()
        if pos >= len(buf):        # data ends where an element or ']' was due
          self.truncated_at = byte_at(pos)
          break
        if buf[pos] == "]":
          break
        if not first:
          if buf[pos] != ",":
            off = byte_at(pos)
            raise ValueError(
                f"{self.path}: malformed JSON array at byte {off} (line "
                f"{_line_of(self.path, off)}): expected ',' or ']', got {buf[pos]!r}")
          pos += 1
          skip_ws()
          if pos >= len(buf):
            self.truncated_at = byte_at(pos)
            break
          if buf[pos] == "]":      # tolerate a trailing comma
            break
        first = False
        while True:
          try:
            obj, end = dec.raw_decode(buf, pos)
            # A number at the buffer end may continue in the next chunk.
            if end == len(buf) and not eof:
              raise json.JSONDecodeError("need more", buf, end)
            break
          except json.JSONDecodeError as e:
            if not _ends_early(e):  # a syntax error that more data cannot fix
              off = byte_at(e.pos)
              raise ValueError(
                  f"{self.path}: malformed JSON at byte {off} (line "
                  f"{_line_of(self.path, off)}): {e.msg}") from None
            if eof:
              off = byte_at(pos)
              self.truncated_at = off
              logging.warning("%s: incomplete JSON record at byte %d (line %d) "
                              "up to the end of the file (%s); kept the complete "
                              "records before it.", self.path, off,
                              _line_of(self.path, off), e.msg)
              self.bytes_read = off
              return
            if len(buf) - pos > _MAX_RECORD_BYTES:
              off = byte_at(pos)
              raise ValueError(
                  f"{self.path}: JSON record at byte {off} (line "
                  f"{_line_of(self.path, off)}) does not parse within "
                  f"{_MAX_RECORD_BYTES} bytes: {e}") from None
            chunk = max(chunk, 2 * (len(buf) - pos))  # grow: no quadratic re-parsing
            more(chunk)
        text = buf[pos:end]
        off = byte_at(pos)
        pos = end
        self.bytes_read = byte_at(end)
        yield off, text, obj
      if self.truncated_at is not None:
        logging.warning("%s: JSON array not closed; data ends at byte %d.",
                        self.path, self.truncated_at)
      self.bytes_read = max(self.bytes_read, byte_at(pos))


def _ends_early(e: json.JSONDecodeError) -> bool:
  """Whether a decode error is the input running out (vs. a real syntax error).

  Cut input fails either in a string that never closes or within a few characters
  of the end (a cut literal, number or escape, or a missing delimiter)."""
  return e.msg.startswith("Unterminated string") or len(e.doc) - e.pos <= 6


def _iter_json_array(path, start, stream_out):
  """(index, obj | _Bad) for each element."""
  stream = _JsonArrayStream(path, start)
  stream_out.append(stream)
  for i, (_, text, obj) in enumerate(stream):
    if _ESCAPED_BYTE.search(text):
      yield i, _Bad("invalid UTF-8 bytes in record")
    else:
      yield i, obj


def _iter_jsonl(path, start, pos_out):
  """(index, obj | _Bad) for each non-blank line; bad lines are _Bad, not fatal."""
  index = 0
  with open(path, "rb") as f:
    f.seek(start)
    offset = start
    lineno = _line_of(path, start) - 1
    for line in f:
      lineno += 1
      offset += len(line)
      pos_out[0] = offset
      if not line.strip():
        continue
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError as e:
        yield index, _Bad(f"invalid UTF-8 at line {lineno}: {e}")
      else:
        try:
          yield index, json.loads(text)
        except json.JSONDecodeError as e:
          yield index, _Bad(f"invalid JSON at line {lineno}: {e}")
      index += 1


def _iter_parquet(path, pos_out):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pf = pq.ParquetFile(path)
  index = 0
  for batch in pf.iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      yield index, row
      index += 1
  pos_out[0] = os.path.getsize(path)


def _iter_tfds(name, split):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"data.format='tfds:{name}' needs tensorflow_datasets, which is not "
        "installed: pip install -e .[tfds]") from None

  def plain(x):
    if isinstance(x, bytes):
      return x.decode("utf-8", "surrogateescape")
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if hasattr(x, "tolist"):
      return plain(x.tolist())
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x

  for i, ex in enumerate(tfds.as_numpy(tfds.load(name, split=split))):
    yield i, plain(ex)


def _shape_of(keys) -> str | None:
  keys = set(keys)
  if "conversations" in keys:
    return "sharegpt"
  if "messages" in keys:
    return "messages"
  if "instruction" in keys and "output" in keys:
    return "alpaca"
  return None


# ---------------------------------------------------------------------- validation

def _type(x):
  return type(x).__name__


def _text(obj, key, where):
  if key not in obj:
    raise _Bad(f"missing field {where}{key}")
  v = obj[key]
  if not isinstance(v, str):
    raise _Bad(f"field {where}{key} is {_type(v)}, expected str")
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
    raise _Bad(f"missing field {list_key}")
  if not isinstance(conv, list):
    raise _Bad(f"field {list_key} is {_type(conv)}, expected list")
  turns = []
  for j, t in enumerate(conv):
    where = f"{list_key}[{j}]."
    if not isinstance(t, dict):
      raise _Bad(f"{list_key}[{j}] is {_type(t)}, expected object")
    turns.append((_norm_role(_text(t, role_key, where)), _text(t, text_key, where)))
  if policy == "released":
    # The released code: the first two turns, whoever speaks them.
    if len(turns) < 2:
      raise _Bad(f"{list_key} has {len(turns)} turn(s), need 2")
    return turns[0][1], turns[1][1], turns
  j = 0
  while j < len(turns) and turns[j][0] == "system":
    j += 1
  if j >= len(turns):
    raise _Bad(f"{list_key} has no user turn")
  if turns[j][0] != "user":
    raise _Bad(f"first turn is from {conv[j][role_key]!r}, not the user")
  if j + 1 >= len(turns):
    raise _Bad(f"{list_key} has no assistant turn after the first user turn")
  if turns[j + 1][0] != "assistant":
    raise _Bad(f"turn after the first user turn is from "
               f"{conv[j + 1][role_key]!r}, not the assistant")
  return turns[j][1], turns[j + 1][1], turns


def _parse(obj, shape, policy, sep):
  """obj -> (instruction, response, turns) or raises _Bad."""
  if not isinstance(obj, dict):
    raise _Bad(f"record is {_type(obj)}, not an object")
  if shape == "sharegpt":
    ins, res, turns = _chat(obj, "conversations", "from", "value", policy)
  elif shape == "messages":
    ins, res, turns = _chat(obj, "messages", "role", "content", policy)
  else:
    ins = _text(obj, "instruction", "")
    res = _text(obj, "output", "")
    inp = obj.get("input")
    if inp is not None and not isinstance(inp, str):
      raise _Bad(f"field input is {_type(inp)}, expected str")
    if not ins.strip():
      raise _Bad("empty instruction")
    if inp and inp.strip():
      ins = ins + sep + inp
    turns = [("user", ins), ("assistant", res)]
  if not ins.strip():
    raise _Bad("empty instruction")
  if not res.strip():
    raise _Bad("empty response")
  for _, t in turns:
    try:
      t.encode("utf-8")
    except UnicodeEncodeError:
      raise _Bad("text is not valid UTF-8 (unpaired surrogate)") from None
  return ins, res, tuple(turns)


def _own_id(obj):
  if not isinstance(obj, dict) or obj.get("id") is None:
    return None
  v = obj["id"]
  if isinstance(v, str):
    return v
  if isinstance(v, int) and not isinstance(v, bool):
    return str(v)
  raise _Bad(f"field id is {_type(v)}, expected str or int")


# --------------------------------------------------------------------------- public

def read_records(cfg_data) -> tuple[list[Record], list[Reject], ReadInfo]:
  """Reads config.data: path, format, limit, turns, alpaca_input_sep (tfds: split)."""
  path = str(_get(cfg_data, "path", "") or "")
  fmt = str(_get(cfg_data, "format", "auto") or "auto")
  limit = int(_get(cfg_data, "limit", 0) or 0)
  policy = str(_get(cfg_data, "turns", "first") or "first")
  sep = _get(cfg_data, "alpaca_input_sep", "\n\n")
  if policy not in TURN_POLICIES:
    raise ValueError(f"data.turns={policy!r}; expected one of {TURN_POLICIES}")
  if limit < 0:
    raise ValueError(f"data.limit={limit}; expected >= 0 (0 = all)")
  valid = ("auto", "parquet") + SHAPES
  if fmt not in valid and not fmt.startswith("tfds:"):
    raise ValueError(f"data.format={fmt!r}; expected one of {valid} or 'tfds:<name>'")

  shape = fmt if fmt in SHAPES else None
  pos = [0]
  streams = []
  if fmt.startswith("tfds:"):
    container, path = "tfds", path or fmt
    items = _iter_tfds(fmt[5:], _get(cfg_data, "split", "train"))
  else:
    if not path:
      from selectit_jax import assets  # pylint: disable=g-import-not-at-top
      path = assets.data_path(cfg_data)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.path: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if fmt == "parquet" or ext in (".parquet", ".pq"):
      container = "parquet"
      items = _iter_parquet(path, pos)
    else:
      start, first = _sniff(path)
      if first == b"[":
        container = "json"
        items = _iter_json_array(path, start, streams)
      elif first == b"{":
        container = "jsonl"
        items = _iter_jsonl(path, start, pos)
      elif not first:
        raise ValueError(f"{path}: file is empty, no records")
      else:
        raise ValueError(
            f"{path}: not JSON or JSON Lines: first non-space byte {first!r} at "
            f"byte {start} (line {_line_of(path, start)}); expected '[' or '{{'")

  records, rejects, first_index_of = [], [], {}
  num_read = 0
  for index, obj in items:
    num_read += 1
    rid = None
    try:
      if isinstance(obj, _Bad):
        raise obj
      rid = _own_id(obj)
      if shape is None:
        shape = _shape_of(obj.keys()) if isinstance(obj, dict) else None
        if shape is None and isinstance(obj, dict):
          raise ValueError(
              f"{path}: cannot tell the format from the keys {sorted(obj)[:10]} of "
              f"record {index}; set data.format to one of {SHAPES}")
      ins, res, turns = _parse(obj, shape or "sharegpt", policy, sep)
      sid = rid if rid is not None else str(index)
      if sid in first_index_of:
        raise _Bad(f"duplicate id {sid!r} (first at index {first_index_of[sid]})")
      first_index_of[sid] = index
      records.append(Record(sid, index, ins, res, obj, turns))
    except _Bad as e:
      rejects.append(Reject(index, rid, str(e)))
    if limit and num_read >= limit:
      break

  truncated_at = None
  bytes_read = pos[0]
  if streams:
    truncated_at = streams[0].truncated_at
    bytes_read = streams[0].bytes_read
  info = ReadInfo(path=path, format=shape or "", num_read=num_read,
                  num_ok=len(records), num_rejected=len(rejects),
                  truncated_at=truncated_at, bytes_read=bytes_read,
                  container=container)
  logging.info("read %s: %d records (%d ok, %d rejected) format=%s/%s",
               path, num_read, len(records), len(rejects), info.format, container)
  return records, rejects, info


# --------------------------------------------------------------------------- writing

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


def write_records(path: str, records, fmt: str) -> None:
  """Writes Record.raw in the given order: fmt 'json' (array), 'jsonl' or 'parquet'."""
  records = list(records)
  if fmt == "json":
    def w(f):
      f.write("[")
      for i, r in enumerate(records):
        f.write(("," if i else "") + "\n  " + json.dumps(r.raw, ensure_ascii=False))
      f.write("\n]\n")
    fileio.atomic_write(path, w, mode="w")
  elif fmt in ("jsonl", "tfds"):
    fileio.write_jsonl(path, (r.raw for r in records))
  elif fmt == "parquet":
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    fileio.write_parquet(path, pa.Table.from_pylist([r.raw for r in records]))
  else:
    raise ValueError(f"write_records: fmt={fmt!r}; expected json, jsonl or parquet")
