"""Rates instruction/response pairs with a LLaMA model into a resumable score store.

    python -m selectit_jax.score --config=configs/smollm2_135m.py \
        --config.data.path=FILE --config.data.format=sharegpt --config.prompts.k=5 \
        --config.output_dir=DIR
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.parallel import distributed
from selectit_jax.scoring import engine
from selectit_jax.scoring import runner as scoring

_CONFIG = config_flags.DEFINE_config_file("config", None, "Scoring config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_CONFIG.value)  # before any other JAX call
  engine.use_compilation_cache(_CONFIG.value.engine.get("compilation_cache_dir", ""))
  scoring.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
