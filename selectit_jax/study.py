"""Trains one base model on several selections of a scored pool (SelectIT, random with seeds,
longest responses, the full pool), evaluates each, and writes study.md: one row per arm, one
column per task, mean ± 95 % interval and the paired difference from random.

    python -m selectit_jax.study --config=configs/study.py --config.scores_dir=SCORES \
        --config.output_dir=DIR
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.parallel import distributed
from selectit_jax.studies import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_CONFIG.value)  # before any other JAX call
  runner.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
