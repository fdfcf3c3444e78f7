"""Orbax checkpoints of the train state plus the data iterator position.

Items: `state` (the {step, params, opt_state} tree, sharded arrays) and `meta` (JSON: the
grain iterator state and what the run was built from, checked on resume). The iterator
state is captured as a dict when `save` is called, so an async save can never record a
later position than the state it belongs to.

Directories are `etils.epath` paths: a local path (made absolute) or a bucket URI such as
gs://bucket/run/checkpoints, which orbax reads and writes directly (every process of a pod
writes its own shards there).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


def is_uri(path: str) -> bool:
  """gs://, s3://, ... (not a local path)."""
  return "://" in str(path)


def resolve(directory) -> epath.Path:
  """An epath.Path; local paths absolute (orbax wants them so), URIs untouched."""
  directory = str(directory)
  return epath.Path(directory if is_uri(directory) else os.path.abspath(directory))


def remove(directory) -> None:
  """Deletes a finished run's checkpoints: process 0 on the shared directory, then all
  processes meet, so none reads it later."""
  if jax.process_index() == 0:
    resolve(directory).rmtree(missing_ok=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpointing.remove")


def manager(directory, ckpt_cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(ckpt_cfg.every), 1),
      max_to_keep=max(int(ckpt_cfg.keep), 1),
      enable_async_checkpointing=bool(ckpt_cfg.async_save),
      create=True,
  )
  return ocp.CheckpointManager(resolve(directory), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
  """Saves when the interval policy (or `force`) says so; async writes finish in the
  background (orbax copies the arrays to host first, so the donated state may move on)."""
  return mngr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
  )


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """(state, meta) of `step` (default: the latest committed), placed by the abstract
  tree's shardings, so a different mesh restores correctly."""
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
  )
  return out["state"], out["meta"]
