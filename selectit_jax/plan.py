"""Prints the per-device memory of a scoring or training config, its tokens per step, the
largest batch that fits, and whether the configured one fits the device (exit 1 if not).

    python -m selectit_jax.plan --config=configs/llama2_70b.py:v5p-64
    python -m selectit_jax.plan --config=configs/llama2_7b.py:v5e-8 --config.engine.batch_size=64
    python -m selectit_jax.plan --config=configs/train_llama2_7b.py:v5p-8

Needs neither the weights (config.model.arch gives the architecture) nor the devices (the
mesh sizes come from the config; a -1 axis takes memory.num_devices, default all here).
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.parallel import memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Scoring or training config file.", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.force_cpu()  # runs on one worker of a pod: must not wait for the others
  fits, lines = memory.plan_config(_CONFIG.value)
  print("\n".join(lines))
  return 0 if fits else 1


if __name__ == "__main__":
  cli.run_main(main)
