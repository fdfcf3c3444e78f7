"""Select the best instruction data from stored rating probabilities.

Loads no model: it reads score dirs written by the scoring step.

python -m selectit_jax.select --config=configs/select.py \
  --config.scores_dir=DIR --config.mode=paper --config.level=sentence \
  --config.alpha=0.2 --config.proportion=0.2 --config.output_dir=OUT
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.selection import runner as selection

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Selection config file (configs/select.py).", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.force_cpu()  # runs on one worker of a pod: must not wait for the others
  selection.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
