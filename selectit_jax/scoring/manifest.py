"""The score dir's contract: one typed, versioned manifest, read and written only here.

A scores dir holds the rows of one input file, rated by one or more models with one or more
prompts (`score` runs add to it). The manifest records every model (with the settings that
change its probabilities), every prompt, and each run's input coverage, so `select`, `sweep`
and `bench` use what is stored rather than what the last run happened to use.

Versions: 1 (before this module: the last run's config, one model) is read and upgraded;
2 is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from selectit_jax import fileio

VERSION = 2
FILENAME = "manifest.json"
# Data settings that decide which texts (and content hashes) a record yields. `limit` is not
# among them: runs over the same file may cover more or fewer records.
DATA_KEYS = ("path", "format", "turns", "alpaca_input_sep", "split")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  key: str  # the rows' `model` column: name@weights fingerprint
  name: str
  path: str
  fingerprint: str
  num_params: int
  settings: dict = dataclasses.field(default_factory=dict)  # what changes a probability


@dataclasses.dataclass(frozen=True)
class RunEntry:
  model: str  # ModelEntry.key
  prompt_hashes: tuple[str, ...]
  limit: int  # records read (0 = all)
  num_read: int
  truncated_at: int | None = None
  # {turn policy: records of the num_read it accepts}: what data.turns chose among.
  turn_counts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Manifest:
  """What a scores dir holds: `data` (DATA_KEYS + the detected shape and container),
  `template`, `scale` (rating values 1..scale), `prompts` {hash: text} in first-scored order,
  `models`, and one RunEntry per `score` run."""

  data: dict
  template: str
  scale: int = 5
  prompts: dict[str, str] = dataclasses.field(default_factory=dict)
  models: list[ModelEntry] = dataclasses.field(default_factory=list)
  runs: list[RunEntry] = dataclasses.field(default_factory=list)
  version: int = VERSION

  # -- what is stored
  @property
  def prompt_hashes(self) -> list[str]:
    return list(self.prompts)

  @property
  def model_keys(self) -> list[str]:
    return [m.key for m in self.models]

  def model(self, key: str) -> ModelEntry | None:
    return next((m for m in self.models if m.key == key), None)

  @property
  def limit(self) -> int:
    """Records covered by the runs together (0 = all)."""
    limits = [r.limit for r in self.runs]
    return 0 if not limits or 0 in limits else max(limits)

  def data_config(self) -> dict:
    """`read_records`' config for the records the runs covered."""
    return {**{k: v for k, v in self.data.items() if k in DATA_KEYS}, "limit": self.limit}

  # -- adding a run
  def check_compatible(self, other: Manifest) -> None:
    """Raises ValueError naming every setting in which `other` (a new run) differs from what
    the dir already holds: its rows would mean something else under the same keys."""
    diffs = [
        f"data.{k}: {self.data.get(k)!r} -> {other.data.get(k)!r}"
        for k in DATA_KEYS
        if self.data.get(k) != other.data.get(k)
    ]
    if self.template != other.template:
      diffs.append("prompts.template")
    if self.scale != other.scale:
      diffs.append(f"prompts.scale: {self.scale} -> {other.scale}")
    for m in other.models:
      old = self.model(m.key)
      if old is None:
        continue
      diffs += [
          f"{k}: {old.settings.get(k)!r} -> {m.settings.get(k)!r}"
          for k in sorted(set(old.settings) | set(m.settings))
          if old.settings.get(k) != m.settings.get(k)
      ]
    if diffs:
      raise ValueError(
          "the scores dir holds rows made with other settings ("
          + "; ".join(diffs)
          + "): score into a new output_dir, or use another model.name for other "
          "model settings"
      )

  def merged(self, other: Manifest) -> Manifest:
    """This manifest with `other`'s models, prompts and runs added (after check_compatible)."""
    self.check_compatible(other)
    models = self.models + [m for m in other.models if self.model(m.key) is None]
    return dataclasses.replace(
        self,
        data={**self.data, **other.data},
        prompts={**self.prompts, **other.prompts},
        models=models,
        runs=self.runs + other.runs,
    )

  # -- files
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Manifest:
    version = d.get("version", 1)
    if version == 1:
      return _from_v1(d)
    if version != VERSION:
      raise ValueError(f"manifest version {version} is newer than this code ({VERSION})")
    return cls(
        data=d["data"],
        template=d["template"],
        scale=d.get("scale", 5),
        prompts=dict(d["prompts"]),
        models=[ModelEntry(**m) for m in d["models"]],
        runs=[RunEntry(**{**r, "prompt_hashes": tuple(r["prompt_hashes"])}) for r in d["runs"]],
        version=version,
    )


def path_in(directory: str) -> str:
  return os.path.join(directory, FILENAME)


def read(directory: str) -> Manifest | None:
  """The dir's manifest, or None if it has none."""
  p = path_in(directory)
  if not os.path.exists(p):
    return None
  with open(p, encoding="utf-8") as f:
    try:
      return Manifest.from_dict(json.load(f))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
      raise ValueError(f"{p}: not a valid manifest ({e!r})") from None


def write(directory: str, manifest: Manifest) -> str:
  return fileio.write_json(path_in(directory), manifest.to_dict(), indent=2, sort_keys=True)


def _from_v1(d: dict[str, Any]) -> Manifest:
  """The single-run manifest written before version 2."""
  from selectit_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top

  template = d.get("template") or prompts_lib.DEFAULT_TEMPLATE
  data = dict((d.get("config") or {}).get("data") or {})
  data.update({k: v for k, v in (d.get("data") or {}).items() if v is not None})
  limit = int(data.pop("limit", 0) or 0)
  texts = d.get("prompts") or []
  hashes = d.get("prompt_hashes") or [prompts_lib.prompt_hash(p, template) for p in texts]
  model = d.get("model") or {}
  models = []
  if model:
    key = model.get("key") or model.get("name", "")
    models.append(
        ModelEntry(
            key=key,
            name=model.get("name", key),
            path=model.get("path", ""),
            fingerprint=model.get("fingerprint", ""),
            num_params=int(model.get("num_params", 0)),
        )
    )
  runs = (
      [
          RunEntry(
              model=models[0].key,
              prompt_hashes=tuple(hashes),
              limit=limit,
              num_read=int(data.get("num_read", 0) or 0),
              truncated_at=data.get("truncated_at"),
          )
      ]
      if models
      else []
  )
  return Manifest(
      data=data, template=template, prompts=dict(zip(hashes, texts)), models=models, runs=runs
  )
