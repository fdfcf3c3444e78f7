"""The sweep grid: parsing of the config's axes into score vectors and cuts.

A setting is a score vector (ScoreSpec: mode, level, model, prompt subset,
alpha, model weights) plus a cut (Cut: proportion or top_n).
"""

import dataclasses
import itertools
from typing import Sequence

from selectit_jax.selection import formulas

NO_ALPHA = float("nan")


# ------------------------------------------------------------------ parsing


def parse_list(v, conv, sep=",") -> list:
  """A config axis (list, number or sep-separated string) as a list of conv(item)."""
  if v is None:
    return []
  if isinstance(v, (list, tuple)):
    return [conv(x) for x in v]
  if isinstance(v, (int, float)):
    return [conv(v)]
  return [conv(x.strip()) for x in str(v).split(sep) if x.strip()]


def parse_prompt_subsets(spec, k: int) -> list:
  """Prompt-index tuples from 'all' | 'first' (k = 1..K) | 'first:1,2' | 'all_k:3' |
  'set:0,2', ';'-separated."""
  out = []
  for part in parse_list(spec, str, sep=";"):
    kind, _, arg = part.partition(":")
    kind = kind.strip()
    if kind == "all":
      subs = [tuple(range(k))]
    elif kind == "first":  # 'first' alone: every k = 1..K
      subs = [tuple(range(int(n))) for n in (parse_list(arg, int) or range(1, k + 1))]
    elif kind == "all_k":
      subs = list(itertools.combinations(range(k), int(arg)))
    elif kind == "set":
      subs = [tuple(sorted(set(parse_list(arg, int))))]
    else:
      raise ValueError(f"prompt subset {part!r}: expected all, first:, all_k: or set:")
    for s in subs:
      if not s or min(s) < 0 or max(s) >= k:
        raise ValueError(f"prompt subset {part!r} -> {s} not within the K={k} stored prompts")
    out += subs
  return list(dict.fromkeys(out))


def parse_weights(spec, num_params) -> list:
  """[(label, weights [M])] from 'theta;uniform;7/20,13/20'."""
  out = []
  for part in parse_list(spec, str, sep=";"):
    w = formulas.resolve_weights("" if part == "theta" else part, num_params)
    out.append((part, w))
  return list({lab: (lab, w) for lab, w in out}.values())


# --------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
  """One distinct score vector."""

  mode: str
  level: str
  model: str  # token/sentence: the model; model level: 'all'
  prompts: tuple  # prompt indices used (token: one)
  alpha: float  # NaN at token level
  weights: str  # label; '' below model level


@dataclasses.dataclass(frozen=True)
class Cut:
  """Where a ranking is cut: a proportion, or the top_n best."""

  proportion: float  # NaN when top_n > 0
  top_n: int


def subset_label(p: tuple) -> str:
  """'0,2' for prompts (0, 2): the 'prompts' column of a sweep row."""
  return ",".join(map(str, p))


def build_grid(config, models: Sequence[str], k: int) -> tuple:
  """(specs, cuts): the product of the axes that apply to each level."""
  modes = parse_list(config.modes, str)
  levels = parse_list(config.levels, str)
  for m in modes:
    if m not in formulas.MODES:
      raise ValueError(f"mode {m!r} not in {formulas.MODES}")
  for lv in levels:
    if lv not in formulas.LEVELS:
      raise ValueError(f"level {lv!r} not in {formulas.LEVELS}")
  alphas = parse_list(config.alphas, float)
  subsets = (
      parse_prompt_subsets(config.prompt_subsets, k) if {"sentence", "model"} & set(levels) else []
  )
  tok_prompts = parse_list(config.token_prompts, int) or list(range(k))
  if any(not 0 <= p < k for p in tok_prompts):
    raise ValueError(f"token_prompts {tok_prompts} out of range for K={k}")
  wlabels = [lab for lab in parse_list(config.weights, str, sep=";")] or ["theta"]
  specs = []
  for mode in modes:
    if "token" in levels:
      specs += [
          ScoreSpec(mode, "token", mdl, (p,), NO_ALPHA, "") for mdl in models for p in tok_prompts
      ]
    if "sentence" in levels:
      specs += [
          ScoreSpec(mode, "sentence", mdl, s, float(a), "")
          for mdl in models
          for s in subsets
          for a in alphas
      ]
    if "model" in levels and len(models) > 1:
      specs += [
          ScoreSpec(mode, "model", "all", s, float(a), w)
          for s in subsets
          for a in alphas
          for w in dict.fromkeys(wlabels)
      ]
  cuts = [Cut(float(p), 0) for p in parse_list(config.proportions, float)]
  cuts += [Cut(NO_ALPHA, int(n)) for n in parse_list(config.top_ns, int) if int(n) > 0]
  for c in cuts:
    if c.top_n == 0 and not 0.0 <= c.proportion <= 1.0:
      raise ValueError(f"proportion {c.proportion} not in [0, 1]")
  if not specs or not cuts:
    raise ValueError(f"empty grid: {len(specs)} score vectors x {len(cuts)} cuts")
  return list(dict.fromkeys(specs)), cuts


def default_setting(cfg_default, models: Sequence[str], k: int) -> tuple:
  """(ScoreSpec, Cut) of the reference setting."""
  d = cfg_default
  level = d.level if d.level != "auto" else ("model" if len(models) > 1 else "sentence")
  if level not in formulas.LEVELS or d.mode not in formulas.MODES:
    raise ValueError(f"bad default mode/level {d.mode!r}/{level!r}")
  model = d.model or models[0]
  if level != "model" and model not in models:
    raise ValueError(f"default model {model!r} not in {list(models)}")
  if level == "model" and len(models) < 1:
    raise ValueError("no models")
  if level == "token":
    spec = ScoreSpec(d.mode, "token", model, (int(d.prompt_index),), NO_ALPHA, "")
  else:
    subs = parse_prompt_subsets(d.prompts, k)
    if len(subs) != 1:
      raise ValueError(f"default.prompts {d.prompts!r} must name one subset")
    spec = ScoreSpec(
        d.mode,
        level,
        "all" if level == "model" else model,
        subs[0],
        float(d.alpha),
        (d.weights or "theta") if level == "model" else "",
    )
  cut = Cut(NO_ALPHA, int(d.top_n)) if int(d.top_n) > 0 else Cut(float(d.proportion), 0)
  return spec, cut
