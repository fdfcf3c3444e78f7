"""Input containers: reading records out of a file (or TFDS) and writing them back.

Containers: a JSON array ('[' first), JSON Lines ('{' first), Parquet (by extension or
data.format='parquet') and TFDS ('tfds:<name>'; optional extra: pip install -e .[tfds]).
What a record says (its shape, its turns) is records.py's business; here a record is
just a decoded object, or a `Bad` when its bytes do not decode.

JSON files are read as a stream: a file whose first non-space byte is '[' is a JSON
array decoded record by record with json.JSONDecoder.raw_decode (bounded memory; a
broken tail is reported in Container.truncated_at, every complete record is kept); '{'
means JSON Lines (a broken line is a Bad, not fatal). Anything else stops the run.

Undecodable bytes: JSONL lines are decoded strictly, a bad line is a Bad. A JSON array
is decoded with errors='surrogateescape' (the broken bytes survive as U+DC80..U+DCFF),
and a record whose text holds such a character is a Bad.
"""

import codecs
import json
import os
import re

from absl import logging

from selectit_jax import fileio

CONTAINERS = ("json", "jsonl", "parquet", "tfds")

_CHUNK = 1 << 20  # first read of a JSON array; grows for big records
_MAX_RECORD_BYTES = 1 << 28  # a record that does not parse within this is a fatal error
_WS = re.compile(r"[ \t\n\r]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class Bad(Exception):
  """A record-level problem: becomes a Reject with this message."""


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


class _TextWindow:
  """A window of decoded text over a byte file: reads on demand, drops what was consumed,
  and maps text positions back to byte offsets (each byte encoded once: positions only move
  forward)."""

  def __init__(self, f, start: int):
    self.f = f
    self.udec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    self.buf, self.pos, self.eof, self.chunk = "", 0, False, _CHUNK
    self.mark, self.mark_off = 0, start  # buf[mark] starts at byte mark_off

  def byte_at(self, i: int) -> int:
    self.mark_off += len(self.buf[self.mark : i].encode("utf-8", "surrogateescape"))
    self.mark = i
    return self.mark_off

  def more(self, n: int) -> None:
    if self.pos:
      self.byte_at(self.pos)
      self.buf, self.pos, self.mark = self.buf[self.pos :], 0, 0
    data = self.f.read(n)
    self.eof = not data
    self.buf += self.udec.decode(data, final=self.eof)

  def skip_ws(self) -> bool:
    """Moves past whitespace; False when the data ends there."""
    while True:
      self.pos = _WS.match(self.buf, self.pos).end()
      if self.pos < len(self.buf) or self.eof:
        return self.pos < len(self.buf)
      self.more(self.chunk)

  def where(self, path: str, i: int) -> str:
    off = self.byte_at(i)
    return f"byte {off} (line {_line_of(path, off)})"


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
    with open(self.path, "rb") as f:
      f.seek(self.start + 1)
      w = _TextWindow(f, self.start + 1)
      first = True
      while self._next_element(w, first):
        first = False
        decoded = self._decode(w)
        if decoded is None:  # the file ends inside this record
          return
        obj, end = decoded
        off, text = w.byte_at(w.pos), w.buf[w.pos : end]
        w.pos = end
        self.bytes_read = w.byte_at(end)
        yield off, text, obj
      if self.truncated_at is not None:
        logging.warning(
            "%s: JSON array not closed; data ends at byte %d.", self.path, self.truncated_at
        )
      self.bytes_read = max(self.bytes_read, w.byte_at(w.pos))

  def _next_element(self, w: _TextWindow, first: bool) -> bool:
    """Moves to the next element's first character; False at ']' or where the data ends."""
    if not w.skip_ws():  # data ends where an element or ']' was due
      self.truncated_at = w.byte_at(w.pos)
      return False
    if w.buf[w.pos] == "]":
      return False
    if not first:
      if w.buf[w.pos] != ",":
        raise ValueError(
            f"{self.path}: malformed JSON array at {w.where(self.path, w.pos)}: expected ',' "
            f"or ']', got {w.buf[w.pos]!r}"
        )
      w.pos += 1
      if not w.skip_ws():
        self.truncated_at = w.byte_at(w.pos)
        return False
      if w.buf[w.pos] == "]":  # tolerate a trailing comma
        return False
    return True

  def _decode(self, w: _TextWindow):
    """(obj, end) of the element at w.pos, reading more as needed; None if the file ends
    inside it (every complete record before it is kept)."""
    dec = json.JSONDecoder()
    while True:
      try:
        obj, end = dec.raw_decode(w.buf, w.pos)
        # A number at the buffer end may continue in the next chunk.
        if end == len(w.buf) and not w.eof:
          raise json.JSONDecodeError("need more", w.buf, end)
        return obj, end
      except json.JSONDecodeError as e:
        if not _ends_early(e):  # a syntax error that more data cannot fix
          raise ValueError(
              f"{self.path}: malformed JSON at {w.where(self.path, e.pos)}: {e.msg}"
          ) from None
        if w.eof:
          off = w.byte_at(w.pos)
          self.truncated_at = self.bytes_read = off
          logging.warning(
              "%s: incomplete JSON record at byte %d (line %d) up to the end of the file "
              "(%s); kept the complete records before it.",
              self.path,
              off,
              _line_of(self.path, off),
              e.msg,
          )
          return None
        if len(w.buf) - w.pos > _MAX_RECORD_BYTES:
          raise ValueError(
              f"{self.path}: JSON record at {w.where(self.path, w.pos)} does not parse "
              f"within {_MAX_RECORD_BYTES} bytes: {e}"
          ) from None
        w.chunk = max(w.chunk, 2 * (len(w.buf) - w.pos))  # grow: no quadratic re-parsing
        w.more(w.chunk)


def _ends_early(e: json.JSONDecodeError) -> bool:
  """Whether a decode error is the input running out (vs. a real syntax error).

  Cut input fails either in a string that never closes or within a few characters
  of the end (a cut literal, number or escape, or a missing delimiter)."""
  return e.msg.startswith("Unterminated string") or len(e.doc) - e.pos <= 6


def _checked_elements(stream: _JsonArrayStream):
  """(index, obj | Bad) for each element; undecodable bytes make the element Bad."""
  for i, (_, text, obj) in enumerate(stream):
    if _ESCAPED_BYTE.search(text):
      yield i, Bad("invalid UTF-8 bytes in record")
    else:
      yield i, obj


def _iter_jsonl(path, start, pos_out):
  """(index, obj | Bad) for each non-blank line; bad lines are Bad, not fatal."""
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
        yield index, Bad(f"invalid UTF-8 at line {lineno}: {e}")
      else:
        try:
          yield index, json.loads(text)
        except json.JSONDecodeError as e:
          yield index, Bad(f"invalid JSON at line {lineno}: {e}")
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
        "installed: pip install -e .[tfds]"
    ) from None

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


class Container:
  """An opened input; iterating yields (index, obj | Bad) in input order.

  `.kind` is json | jsonl | parquet | tfds (the layout write_records needs); while and
  after iterating, `.bytes_read` is the byte offset just past what was consumed and
  `.truncated_at` the offset of an incomplete JSON tail (else None).
  """

  def __init__(self, path: str, fmt: str = "auto", split: str = "train"):
    self.path = path
    self._pos = [0]
    self._stream = None
    if fmt.startswith("tfds:"):
      self.kind, self.path = "tfds", path or fmt
      self._items = _iter_tfds(fmt[5:], split)
      return
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.path: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if fmt == "parquet" or ext in (".parquet", ".pq"):
      self.kind = "parquet"
      self._items = _iter_parquet(path, self._pos)
      return
    start, first = _sniff(path)
    if first == b"[":
      self.kind = "json"
      self._stream = _JsonArrayStream(path, start)
      self._items = _checked_elements(self._stream)
    elif first == b"{":
      self.kind = "jsonl"
      self._items = _iter_jsonl(path, start, self._pos)
    elif not first:
      raise ValueError(f"{path}: file is empty, no records")
    else:
      raise ValueError(
          f"{path}: not JSON or JSON Lines: first non-space byte {first!r} at "
          f"byte {start} (line {_line_of(path, start)}); expected '[' or '{{'"
      )

  def __iter__(self):
    return self._items

  @property
  def bytes_read(self) -> int:
    return self._stream.bytes_read if self._stream else self._pos[0]

  @property
  def truncated_at(self) -> int | None:
    return self._stream.truncated_at if self._stream else None


def open_container(path: str, fmt: str = "auto", split: str = "train") -> Container:
  """Opens `path` (or TFDS when fmt is 'tfds:<name>'); fmt 'parquet' forces Parquet,
  anything else sniffs the first byte. Raises on a missing, empty or non-JSON file."""
  return Container(path, fmt, split)


# --------------------------------------------------------------------------- writing


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
