"""The arms of a study: which records of the scored pool each one trains on.

The pool is the samples the selection can rank (the same N that ⌊N·p⌋ counts), so every arm
draws from the same records and the sizes match: SelectIT keeps its top ⌊N·p⌋, random draws
that many with each seed, longest keeps the ⌊N·p⌋ longest responses (characters; the
"long is more" baseline), full keeps the whole pool, base trains nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from selectit_jax.selection import formulas
from selectit_jax.selection import inputs
from selectit_jax.selection import runner as selection_runner

KINDS = ("base", "selectit", "selectit_model", "random", "longest", "full")


@dataclasses.dataclass(frozen=True)
class Arm:
  """name: unique (random arms end in _s<seed>); group: the table row (random seeds pooled);
  indices: input record indices to train on, in the arm's order (best first for SelectIT)."""

  name: str
  kind: str
  group: str
  indices: tuple[int, ...]
  seed: int = 0

  @property
  def trains(self) -> bool:
    return self.kind != "base"


def parse_kinds(spec: str) -> list[str]:
  kinds = [k.strip() for k in str(spec).split(",") if k.strip()]
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise ValueError(f"study.arms={spec!r}: unknown arm(s) {bad}; choose from {KINDS}")
  return kinds


def build_arms(kinds: list[str], select_cfg, loaded: inputs.Loaded, responses: dict, seeds) -> list:
  """The arms for `kinds` over the pool `loaded` ranks (select_cfg: mode, alpha, proportion…);
  responses: {input index: response text} for 'longest'."""
  sentence = _ranked(loaded, select_cfg, "sentence" if len(loaded.models) == 1 else "model")
  pool = loaded.sample_index[sentence.valid]
  size = sentence.num_kept
  arms = []
  for kind in kinds:
    if kind == "base":
      arms.append(Arm("base", kind, "base", ()))
    elif kind in ("selectit", "selectit_model"):
      ranked = sentence
      if kind == "selectit_model":
        if len(loaded.models) < 2:
          raise ValueError("study arm selectit_model needs a pool scored by two or more models")
        ranked = _ranked(loaded, select_cfg, "model")
      chosen = loaded.sample_index[ranked.order[: ranked.num_kept]]
      arms.append(Arm(kind, kind, kind, tuple(int(i) for i in chosen)))
    elif kind == "random":
      for seed in seeds:
        chosen = np.random.default_rng(int(seed)).choice(pool, size, replace=False)
        arms.append(Arm(f"random_s{seed}", kind, "random", tuple(int(i) for i in chosen), seed))
    elif kind == "longest":
      length = np.array([len(responses.get(int(i), "")) for i in pool])
      chosen = pool[np.argsort(-length, kind="stable")[:size]]
      arms.append(Arm(kind, kind, kind, tuple(int(i) for i in chosen)))
    elif kind == "full":
      arms.append(Arm(kind, kind, kind, tuple(int(i) for i in pool)))
  return arms


def _ranked(loaded: inputs.Loaded, select_cfg, level: str) -> selection_runner.Ranked:
  cfg = select_cfg.copy_and_resolve_references()
  cfg.level = level
  weights = formulas.resolve_weights(select_cfg.weights, loaded.num_params)
  return selection_runner.rank_samples(loaded, cfg, weights)


def check_sizes(arms: list[Arm]) -> None:
  """Every training arm but 'full' has the same size: the comparison is at equal data."""
  sizes = {a.name: len(a.indices) for a in arms if a.kind not in ("base", "full")}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"study arms differ in size: {sizes}")
  if any(n == 0 for n in sizes.values()):
    raise ValueError(f"a study arm is empty ({sizes}): score more records or raise proportion")
