"""Rating prompts and the text template a model rates.

The template reproduces the released layout byte for byte: the prompt line keeps its
own trailing newline and the template adds another, so there is an empty line before
"Instruction:". Prompts read from a file follow Python readlines() exactly, as the
released code does (every line keeps its "\\n", the last one may lack it).
"""

import hashlib
import string

from selectit_jax.errors import UserError

DEFAULT_TEMPLATE = "{prompt}\nInstruction:{instruction}\nResponse:{response}\nThe answer is: \n"
TEMPLATE_FIELDS = frozenset({"prompt", "instruction", "response"})

# The project's own wording (not the released file's): each asks for a 1-5 quality
# rating answered with a single digit, so the next token after "The answer is: \n"
# is one of the five rating digits.
_DEFAULT_PROMPTS = (
    "Judge how well the response below carries out the instruction and rate its "
    "quality from 1 (very poor) to {top} (excellent); answer with a single digit.\n",
    "Read the instruction and the response, then give the response a quality score "
    "between 1 and {top}, where {top} is best; reply with one digit only.\n",
    "On a scale from 1 to {top}, how helpful, correct and complete is the response to "
    "the instruction? Answer with a single digit.\n",
    "Rate the answer to the task below from 1 (fails the task) to {top} (fully and "
    "accurately solves it), and write only the digit.\n",
    "Considering accuracy, relevance and clarity, score the following response to "
    "the instruction with a whole number from 1 to {top}; give just that digit.\n",
    "Assess the quality of the response to the given instruction and reply with "
    "one digit from 1 (worst) to {top} (best).\n",
)


def default_prompts(scale: int = 5) -> list[str]:
  """The project's own rating prompts for ratings 1..scale, each ending with "\\n"."""
  check_scale(scale)
  return [p.format(top=scale) for p in _DEFAULT_PROMPTS]


def check_scale(scale: int) -> int:
  """A rating scale 1..K with K in 2..9: each rating is one digit token."""
  if not 2 <= int(scale) <= 9:
    raise ValueError(f"prompts.scale={scale}; expected 2..9 (each rating one digit)")
  return int(scale)


def load_prompts(path: str) -> list[str]:
  """Prompts from a file, one per line, with Python readlines() semantics."""
  with open(path, "r", encoding="utf-8") as f:
    prompts = f.readlines()
  if not prompts:
    raise UserError(f"prompts file {path} is empty")
  check_prompts(prompts, path)
  return prompts


def check_prompts(prompts: list[str], source: str) -> None:
  """Refuses blank lines and repeated prompts, naming their 1-based line numbers.

  An exact repeat has its twin's prompt hash, so both columns share one store key: every row
  lands in one column, every sample is dropped as non-finite and the selection comes out
  empty. Text is compared stripped (the last line lacks its "\\n"): a near repeat asks the
  same question twice. A blank line asks nothing.
  """
  blank = [n for n, p in enumerate(prompts, 1) if not p.strip()]
  first_line, repeats = {}, []
  for n, p in enumerate(prompts, 1):
    if p.strip() and first_line.setdefault(p.strip(), n) != n:
      repeats.append(f"{first_line[p.strip()]} and {n}")
  problems = ([f"blank line(s) {', '.join(map(str, blank))}"] if blank else []) + (
      [f"repeated prompt on lines {'; '.join(repeats)}"] if repeats else []
  )
  if problems:
    raise UserError(
        f"prompts file {source}: {'; '.join(problems)}; " "write one distinct prompt a line"
    )


def check_template(template: str) -> str:
  """Raises unless the template names exactly {prompt}, {instruction}, {response}."""
  fields = set()
  for _, name, spec, conv in string.Formatter().parse(template):
    if name is None:
      continue
    if spec or conv or name not in TEMPLATE_FIELDS:
      raise ValueError(
          f"template field {{{name}}} not allowed; use only "
          f"{sorted(TEMPLATE_FIELDS)} (write literal braces as {{{{ }}}})"
      )
    fields.add(name)
  if fields != TEMPLATE_FIELDS:
    raise ValueError(f"template lacks {sorted(TEMPLATE_FIELDS - fields)}: {template!r}")
  closing = list(string.Formatter().parse(template))[-1]
  if closing[1] is not None or not closing[0]:
    # The rating digits are resolved (and read) right after this closing text, so it must
    # be fixed text, the same for every sample, like "The answer is: \n".
    raise ValueError(f"template must end with fixed text after its last field: {template!r}")
  return template


def template_from_config(cfg_prompts) -> str:
  """cfg.template, '' or missing = DEFAULT_TEMPLATE; validated."""
  t = cfg_prompts.get("template", "") if cfg_prompts is not None else ""
  return check_template(t or DEFAULT_TEMPLATE)


def prompts_from_config(cfg_prompts) -> list[str]:
  """cfg.file ('' = default_prompts()) and cfg.k (first k; 0 or missing = all)."""
  path = cfg_prompts.get("file", "") if cfg_prompts is not None else ""
  k = int(cfg_prompts.get("k", 0) or 0) if cfg_prompts is not None else 0
  scale = int(cfg_prompts.get("scale", 5) or 5) if cfg_prompts is not None else 5
  prompts = load_prompts(path) if path else default_prompts(scale)
  if k < 0:
    raise UserError(f"prompts.k={k}; expected >= 1 (0 = all)")
  if k > len(prompts):
    raise UserError(
        f"prompts.k={k} but {path or 'the default prompts'} has only " f"{len(prompts)} prompts"
    )
  return prompts[:k] if k else prompts


def build_text(
    prompt: str, instruction: str, response: str, template: str = DEFAULT_TEMPLATE
) -> str:
  """The text one forward pass rates."""
  return (template or DEFAULT_TEMPLATE).format(
      prompt=prompt, instruction=instruction, response=response
  )


def prompt_hash(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
  """sha256 hex (first 16) of template + "\\0" + prompt: part of a score row's key."""
  text = (template or DEFAULT_TEMPLATE) + "\0" + prompt
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
