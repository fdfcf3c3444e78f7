"""The `generate` forms: greedy continuations from the KV-cache decoder (`models/decode.py`),
cut at the form's stop strings and scored: GSM8K by exact match of the final number with the
gold short answer, HumanEval by running the problem's tests on the completion in the sandbox
(a child process with time and memory limits, never this one).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from selectit_jax.checkpoints.tokenizer import Tokenizer
from selectit_jax.evaluation import answers
from selectit_jax.evaluation import sandbox
from selectit_jax.evaluation.tasks import Form, Item


@dataclasses.dataclass(frozen=True)
class Limits:
  """The sandbox's limits per HumanEval program, and how many run at once (0: CPU count)."""

  timeout: float = 10.0
  memory_bytes: int = 1 << 30
  workers: int = 0


@dataclasses.dataclass(frozen=True)
class Scored:
  text: str  # the continuation up to (not including) its first stop string
  answer: str  # what was checked: the extracted number, or the sandbox's verdict
  score: float  # 1 right / 0 wrong


def generate_form(item: Item) -> Form | None:
  return next((f for f in item.forms if f.kind == "generate"), None)


def prompts(
    items: Sequence[Item], tokenizer: Tokenizer, max_tokens: int, max_new_tokens: int
) -> tuple[list[int], list[list[int]], list[str]]:
  """(indices of the items to generate for, their prompt ids, reasons per item left out). An
  item whose prompt plus max_new_tokens exceeds `max_tokens` is left out (its reason given),
  not generated shorter."""
  keep, ids, skipped = [], [], []
  for i, item in enumerate(items):
    form = generate_form(item)
    tokens = tokenizer.encode(form.context)
    if len(tokens) + max_new_tokens > max_tokens:
      skipped.append(
          f"{item.task} item {item.id}: generate prompt {len(tokens)} tokens + "
          f"max_new_tokens {max_new_tokens} > max_tokens {max_tokens}"
      )
      continue
    keep.append(i)
    ids.append(tokens)
  return keep, ids, skipped


def continuation_text(tokenizer: Tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
  """The text the new ids add to the prompt's (decoding them alone can drop a leading space
  under SentencePiece)."""
  head = tokenizer.decode(list(prompt))
  whole = tokenizer.decode(list(prompt) + list(new))
  return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(list(new))


def score(forms: Sequence[Form], texts: Sequence[str], limits: Limits = Limits()) -> list[Scored]:
  """Each raw continuation cut at its form's stops and checked against the form's gold. The
  HumanEval programs run in sandboxed children, `limits.workers` at a time."""
  cut = [answers.cut_at_stops(t, f.stop) for f, t in zip(forms, texts)]
  out: list[Scored | None] = [None] * len(forms)
  tests = []
  for i, (form, text) in enumerate(zip(forms, cut)):
    if form.check == "number":
      found = answers.extract_gsm8k(text)
      ok = answers.gsm8k_correct(found, form.choices[form.gold])
      out[i] = Scored(text, found or "", float(ok))
    elif form.check == "tests":
      tests.append(i)
    else:
      raise ValueError(f"generate form {form.group!r}: unknown check {form.check!r}")
  runs = sandbox.check_all(
      [(forms[i].problem, cut[i]) for i in tests],
      workers=limits.workers or None,
      timeout=limits.timeout,
      memory_bytes=limits.memory_bytes,
  )
  for i, run in zip(tests, runs):
    verdict = run.status + (f": {run.error}" if run.error else "")
    out[i] = Scored(cut[i], verdict, float(run.passed))
  return out


def row(item: Item, form: Form, scored: Scored, new_tokens: int, key: str, max_new: int) -> dict:
  """The store row of an item's generate form."""
  return dict(
      task=item.task,
      id=item.id,
      form=form.name,
      model=key,
      prediction=-1,
      gold=-1,
      score=scored.score,
      logliks=[],
      num_tokens=[new_tokens],
      num_bytes=[len(scored.text.encode("utf-8"))],
      prediction_text=scored.text,
      gold_text=form.choices[form.gold],
      answer=scored.answer,
      max_new_tokens=max_new,
  )


GenerateFn = Callable[[list[list[int]], int, Sequence[int], Sequence[str], Callable], list]


def run(
    generate: GenerateFn,
    tokenizer: Tokenizer,
    items: Sequence[Item],
    ids: Sequence[list[int]],
    max_new_tokens: int,
    key: str,
    limits: Limits = Limits(),
) -> tuple[list[dict], float]:
  """Store rows of these items' generate forms (`ids`: their prompts, from `prompts`), and
  the seconds spent scoring. `generate(prompts, max_new_tokens, eos_ids, stop, decode)` is
  the decoder's; items are generated together per set of stop strings (a task's are all the
  same)."""
  rows_out: list[dict | None] = [None] * len(items)
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(generate_form(item).stop, []).append(i)
  seconds = 0.0
  for stop, members in groups.items():
    prompt_ids = [ids[i] for i in members]
    new = generate(prompt_ids, max_new_tokens, eos, stop, tokenizer.decode)
    texts = [continuation_text(tokenizer, p, n) for p, n in zip(prompt_ids, new)]
    forms = [generate_form(items[i]) for i in members]
    t0 = time.perf_counter()
    scored = score(forms, texts, limits)
    seconds += time.perf_counter() - t0
    for i, form, s, n in zip(members, forms, scored, new):
      rows_out[i] = row(items[i], form, s, len(n), key, max_new_tokens)
  return rows_out, seconds
