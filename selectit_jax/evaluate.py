"""Evaluates a model on benchmarks (MMLU, ARC, HellaSwag; GSM8K and HumanEval: gold bits per
byte, greedy exact match / pass@1) into per-item Parquet, summary.json and summary.md;
resumable.

    python -m selectit_jax.evaluate --config=configs/eval.py --config.model.path=MODEL \
        --config.tasks=mmlu,arc_challenge --config.output_dir=DIR
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.evaluation import runner
from selectit_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file.", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_CONFIG.value)  # before any other JAX call
  runner.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
