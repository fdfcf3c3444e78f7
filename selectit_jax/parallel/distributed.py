"""Multi-process JAX: `initialize(config)` must run before any other JAX call.

Sources, first wins: config.distributed.{coordinator_address, num_processes, process_id},
then the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, set by
launch/local.sh and launch/slurm_gpu.sh). With none of them, mode 'auto' initializes only
where the environment shows several processes (SLURM with >1 task, TPU_WORKER_HOSTNAMES)
and is a no-op on a single host; 'always' calls jax.distributed.initialize() regardless, so
JAX auto-detects the TPU pod (what launch/tpu_pod.sh passes); 'never' skips.

Timeouts (config.distributed.*, else JAX_INITIALIZATION_TIMEOUT, JAX_HEARTBEAT_TIMEOUT_SECONDS,
JAX_SHUTDOWN_TIMEOUT_SECONDS; unset = JAX's 300/100/300 s): the launch scripts set a 60 s
heartbeat, so the others stop within a minute of a host that hangs, naming it.
"""

from __future__ import annotations

import os

from absl import logging

_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# jax.distributed.initialize's timeout arguments (seconds), same names in the config.
_TIMEOUTS = {
    "initialization_timeout": "JAX_INITIALIZATION_TIMEOUT",
    "heartbeat_timeout_seconds": "JAX_HEARTBEAT_TIMEOUT_SECONDS",
    "shutdown_timeout_seconds": "JAX_SHUTDOWN_TIMEOUT_SECONDS",
}
_done = False


def settings(dist_cfg=None, environ=None, names=None) -> dict:
  """Explicit initialize() arguments from the config, else the environment (None = unset):
  the coordinator's (names=None) or those named (e.g. _TIMEOUTS)."""
  environ = os.environ if environ is None else environ
  out = {}
  for key, env in (names or _ENV).items():
    value = dist_cfg.get(key) if dist_cfg is not None else None
    if value in (None, "", -1):
      value = environ.get(env) or None
    if value is not None and key != "coordinator_address":
      value = int(value)
    out[key] = value
  return out


def _cluster_detectable(environ) -> bool:
  """A multi-process cluster JAX detects by itself. TPU pods are not guessed here (that
  needs the metadata server); launch/tpu_pod.sh passes distributed.initialize=always."""
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(config=None, environ=None) -> bool:
  """Starts jax.distributed when the run spans several processes; returns whether it did."""
  global _done
  if _done:
    return True
  environ = os.environ if environ is None else environ
  dist_cfg = config.get("distributed") if config is not None else None
  mode = (dist_cfg.get("initialize") if dist_cfg is not None else None) or "auto"
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"distributed.initialize={mode!r}; expected auto, always or never")
  if mode == "never":
    return False
  kwargs = {k: v for k, v in settings(dist_cfg, environ).items() if v is not None}
  if mode == "auto" and not kwargs and not _cluster_detectable(environ):
    return False  # single host
  if kwargs.get("num_processes") == 1:
    return False
  if {"coordinator_address", "num_processes", "process_id"} <= kwargs.keys():
    # All given: no cluster detection. Under SLURM it would also set local_device_ids to
    # [SLURM_LOCALID], leaving one process per node (launch/slurm_gpu.sbatch) one GPU.
    kwargs["cluster_detection_method"] = "deactivate"
  kwargs.update({k: v for k, v in settings(dist_cfg, environ, _TIMEOUTS).items() if v is not None})
  import jax  # noqa: PLC0415  (after the decision: nothing touches a backend before this)

  logging.info("jax.distributed.initialize(%s)", kwargs or "auto-detect")
  jax.distributed.initialize(**kwargs)
  _done = True
  logging.info(
      "process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return True
