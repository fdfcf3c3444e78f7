"""Tests for selectit_jax.data.prompts."""

import os
import re

import ml_collections
import pytest

from conftest import REFERENCE_PROMPTS
from selectit_jax.data import prompts as P
from selectit_jax.errors import UserError

RELEASED = REFERENCE_PROMPTS


def cfg(**kw):
  return ml_collections.ConfigDict({"file": "", "k": 5, "template": "", **kw})


def released_path():
  if not os.path.exists(RELEASED):
    pytest.skip(f"released prompt file {RELEASED} not present")
  return RELEASED


def test_released_file_readlines_semantics():
  ps = P.load_prompts(released_path())
  assert len(ps) == 9
  assert all(p.endswith("\n") for p in ps[:8])
  assert not ps[-1].endswith("\n")
  with open(RELEASED, encoding="utf-8") as f:
    assert "".join(ps) == f.read()
  assert any("\u2014" in p for p in ps)  # em dashes survive


def test_build_text_matches_released_layout():
  p = P.load_prompts(released_path())[0]
  ins, res = "Name a colour. {not a field}", "Blue.\n"
  want = p + "\n" + "Instruction:" + ins + "\n" + "Response:" + res + "\nThe answer is: \n"
  assert P.build_text(p, ins, res) == want
  assert P.build_text(p, ins, res, P.DEFAULT_TEMPLATE) == want
  assert want.startswith(p + "\nInstruction:")  # the blank line after the prompt


def test_default_prompts_are_our_own():
  ds = P.default_prompts()
  assert len(ds) >= 5
  assert all(d.endswith("\n") and d.count("\n") == 1 for d in ds)
  assert all("1" in d and "5" in d for d in ds)
  assert len(set(ds)) == len(ds)
  released = set(P.load_prompts(released_path()))
  released |= {r.rstrip("\n") + "\n" for r in released}
  assert not released & set(ds)
  ds.append("mutate")
  assert "mutate" not in P.default_prompts()


def test_prompts_from_config(tmp_path):
  assert P.prompts_from_config(cfg()) == P.default_prompts()[:5]
  assert P.prompts_from_config(cfg(k=0)) == P.default_prompts()
  assert P.prompts_from_config(cfg(file=released_path(), k=5)) == P.load_prompts(RELEASED)[:5]
  with pytest.raises(ValueError, match="prompts.k=10 .* only 9"):
    P.prompts_from_config(cfg(file=RELEASED, k=10))
  with pytest.raises(ValueError, match="only"):
    P.prompts_from_config(cfg(k=len(P.default_prompts()) + 1))
  with pytest.raises(ValueError, match=">= 1"):
    P.prompts_from_config(cfg(k=-1))
  (tmp_path / "p.txt").write_text("one\r\ntwo\n three", encoding="utf-8")
  assert P.load_prompts(str(tmp_path / "p.txt")) == ["one\n", "two\n", " three"]
  (tmp_path / "e.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    P.prompts_from_config(cfg(file=str(tmp_path / "e.txt")))


@pytest.mark.parametrize(
    "text,message",
    [
        ("one\ntwo\none", r"repeated prompt on lines 1 and 3"),
        # The last line lacks its "\n", yet repeats line 1; so does a copy with spaces around it.
        ("one\ntwo\n one \none", r"repeated prompt on lines 1 and 3; 1 and 4"),
        ("one\n\ntwo\n", r"blank line\(s\) 2\b"),
        ("one\ntwo\n  \t\n\n", r"blank line\(s\) 3, 4"),
        ("one\n\none\n", r"blank line\(s\) 2; repeated prompt on lines 1 and 3"),
    ],
)
def test_blank_or_repeated_prompt_lines_are_refused(tmp_path, text, message):
  path = tmp_path / "prompts.txt"
  path.write_text(text, encoding="utf-8")
  for load in (
      lambda: P.load_prompts(str(path)),
      lambda: P.prompts_from_config(cfg(file=str(path), k=1)),
  ):
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*" + message):
      load()


def test_k_larger_than_the_file_is_refused(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("one\ntwo\nthree", encoding="utf-8")
  assert P.prompts_from_config(cfg(file=str(path), k=3)) == ["one\n", "two\n", "three"]
  with pytest.raises(UserError, match=r"prompts.k=4 but .*prompts.txt has only 3 prompts"):
    P.prompts_from_config(cfg(file=str(path), k=4))


def test_template_from_config_and_checks():
  assert P.template_from_config(cfg()) == P.DEFAULT_TEMPLATE
  t = "{prompt}Q: {instruction}\nA: {response}\nScore: "
  assert P.template_from_config(cfg(template=t)) == t
  assert P.build_text("p\n", "i", "r", t) == "p\nQ: i\nA: r\nScore: "
  with pytest.raises(ValueError, match="lacks"):
    P.check_template("{prompt}{instruction}")
  with pytest.raises(ValueError, match="not allowed"):
    P.check_template("{prompt}{instruction}{response}{extra}")
  with pytest.raises(ValueError, match="not allowed"):
    P.check_template("{prompt!r}{instruction}{response}")
  with pytest.raises(ValueError, match="must end with fixed text"):
    P.check_template("{prompt}\nInstruction:{instruction}\nThe answer is: {response}")


def test_prompt_hash():
  import hashlib

  p = "Rate it.\n"
  h = P.prompt_hash(p, P.DEFAULT_TEMPLATE)
  assert h == hashlib.sha256((P.DEFAULT_TEMPLATE + "\0" + p).encode()).hexdigest()[:16]
  assert P.prompt_hash(p) == h
  assert P.prompt_hash(p, "{prompt}{instruction}{response}") != h
  assert P.prompt_hash("Rate it.", P.DEFAULT_TEMPLATE) != h  # the newline matters
