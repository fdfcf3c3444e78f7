"""Sweep selection settings (mode, level, alpha, prompts, proportion, weights).

Loads no model: it reads score dirs written by the scoring step and writes
sweep.parquet, sweep.md and plots.

python -m selectit_jax.sweep --config=configs/sweep.py \
  --config.scores_dir=DIR[,DIR2,...] --config.output_dir=OUT
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.sweeps import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Sweep config file (configs/sweep.py).", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.force_cpu()  # runs on one worker of a pod: must not wait for the others
  runner.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
