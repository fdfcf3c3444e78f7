"""`study`: for each arm, write its records, fine-tune the base model on them, evaluate the
tuned model, then tabulate every arm against random. Resumable arm by arm (each arm's
trainer and evaluation resume on their own; a trained arm is read back from its trained.json,
a finished one from its done.json)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging
from etils import epath

from selectit_jax import assets
from selectit_jax import fileio
from selectit_jax.data import containers
from selectit_jax.errors import UserError
from selectit_jax.evaluation import results as results_lib
from selectit_jax.evaluation import runner as eval_runner
from selectit_jax.selection import inputs
from selectit_jax.selection import runner as selection_runner
from selectit_jax.studies import arms as arms_lib
from selectit_jax.studies import report
from selectit_jax.training import checkpointing
from selectit_jax.training import trainer


def _seeds(spec) -> list[int]:
  try:
    return [int(s) for s in str(spec).split(",") if s.strip()]
  except ValueError as e:
    raise UserError(f"study.seeds={spec!r}: expected a comma list of integers") from e


def plan_arms(config) -> tuple[list[arms_lib.Arm], dict, str]:
  """(arms, input records by index, their container) for the config's scored pool."""
  notes: list[str] = []
  dirs = inputs.scores_dirs_of(config)
  recs, container = inputs.load_input_records(dirs, notes)
  if recs is None:
    inputs.load_scores(dirs)  # a dir that is not a score dir is refused here, by name
    raise UserError(f"{dirs[0]}: the scored input records are unavailable ({'; '.join(notes)})")
  loaded = inputs.load_scores(dirs, k=int(config.select.k), samples=list(recs.values()))
  kinds = arms_lib.parse_kinds(config.arms)
  responses = {i: r.response for i, r in recs.items()}
  arms = arms_lib.build_arms(kinds, config.select, loaded, responses, _seeds(config.seeds))
  arms_lib.check_sizes(arms)
  return arms, recs, container


def run(config) -> dict:
  """Trains and evaluates every arm into config.output_dir; writes study.md/.png/.json."""
  out = config.output_dir
  if not out:
    raise UserError("config.output_dir is required")
  arms, recs, container = plan_arms(config)
  os.makedirs(out, exist_ok=True)
  logging.info(
      "study: %d arms: %s", len(arms), ", ".join(f"{a.name} ({len(a.indices)})" for a in arms)
  )
  results = [_run_arm(config, arm, recs, container) for arm in arms]
  metrics = sorted({m for r in results for m in r.metrics})
  summary = report.summarize(results, metrics)
  header = [
      "# Study",
      "",
      f"Pool: {config.scores_dir} ({len(next(a for a in arms if a.kind == 'full').indices)} "
      "rankable records)"
      if any(a.kind == "full" for a in arms)
      else f"Pool: {config.scores_dir}",
      f"Arms: {', '.join(a.name for a in arms)}; SelectIT {config.select.mode} mode, "
      f"alpha {config.select.alpha}, proportion {config.select.proportion}. Base model: "
      f"{assets.model_path(config.train.model)}. Tasks: {config.eval.tasks} "
      f"(limit {config.eval.limit}).",
  ]
  md = report.write(out, results, summary, header)
  study = dict(
      arms=[dataclasses.asdict(r) | {"metrics": sorted(r.metrics)} for r in results],
      summary=summary,
      report=md,
  )
  fileio.write_json(os.path.join(out, "study.json"), study)
  logging.info("study: %s", md)
  return study


def _run_arm(config, arm: arms_lib.Arm, recs: dict, container: str) -> report.ArmResult:
  d = os.path.join(config.output_dir, "arms", arm.name)
  done = os.path.join(d, "done.json")
  saved = _saved(done)
  if saved is not None:
    if tuple(saved["indices"]) != arm.indices:
      raise UserError(
          f"{done}: arm {arm.name} was run on other records; use another output_dir for "
          "another pool or selection"
      )
    logging.info("study: arm %s already done", arm.name)
    return report.ArmResult(**saved["result"])
  os.makedirs(d, exist_ok=True)
  start = time.perf_counter()
  model_path, tokens = assets.model_path(config.train.model), 0
  if arm.trains:
    model_path, tokens = _train_arm(config, arm, d, recs, container)
  ecfg = config.eval.copy_and_resolve_references()
  with ecfg.unlocked():
    ecfg.model.path = str(model_path)
    ecfg.model.name = arm.name
    ecfg.output_dir = os.path.join(d, "eval")
  logging.info("study: evaluating arm %s (%s)", arm.name, model_path)
  eval_runner.run(ecfg)
  result = report.ArmResult(
      arm.name,
      arm.group,
      len(arm.indices),
      tokens,
      time.perf_counter() - start,
      _item_scores(ecfg.output_dir),
  )
  fileio.write_json(done, dict(indices=list(arm.indices), result=dataclasses.asdict(result)))
  return result


def _train_arm(config, arm: arms_lib.Arm, d: str, recs: dict, container: str) -> tuple[str, int]:
  """Fine-tunes the base model on the arm's records: (export dir, training tokens). A
  checkpoint or export dir set in the train section gets the arm's own subdirectory (arms
  never resume each other's runs); `trained.json` marks the export done, after which the
  checkpoints go unless study.keep_checkpoints (nothing in the study reads them again)."""
  trained = os.path.join(d, "trained.json")
  saved = _saved(trained)
  if saved is not None:
    return saved["export_dir"], int(saved["train_tokens"])
  data_path, fmt = selection_runner.selected_path(d, container)
  containers.write_records(data_path, [recs[i] for i in arm.indices], fmt)
  tcfg = config.train.copy_and_resolve_references()
  with tcfg.unlocked():
    tcfg.data.path = data_path
    tcfg.output_dir = os.path.join(d, "train")
    tcfg.export.enabled = True  # the evaluation reads the exported model
    for section in (tcfg.checkpoint, tcfg.export):
      if section.dir:
        section.dir = str(epath.Path(section.dir) / "arms" / arm.name)
  logging.info("study: training arm %s on %d records", arm.name, len(arm.indices))
  summary = trainer.run(tcfg)
  saved = dict(export_dir=str(summary["export_dir"]), train_tokens=int(summary["train_tokens"]))
  fileio.write_json(trained, saved)
  if not config.keep_checkpoints:
    checkpointing.remove(summary["checkpoint_dir"])
    logging.info(
        "study: arm %s exported; deleted its checkpoints %s", arm.name, summary["checkpoint_dir"]
    )
  return saved["export_dir"], saved["train_tokens"]


def _saved(path: str) -> dict | None:
  """What a finished stage of an arm recorded (done.json, trained.json), or None."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _item_scores(eval_dir: str) -> dict:
  """{task_form: {item id: score}} of an arm's evaluation dir (one model's rows)."""
  table = results_lib.ResultStore(eval_dir).read_table()
  models = set(table.column("model").to_pylist())
  if len(models) > 1:
    raise UserError(f"{eval_dir}: rows of several models {sorted(models)}; expected one")
  out: dict[str, dict] = {}
  cols = [table.column(c).to_pylist() for c in ("task", "id", "form", "score")]
  for task, item_id, form, score in zip(*cols):
    out.setdefault(f"{task}_{form}", {})[item_id] = float(score)
  return out
