"""Fine-tunes a model on a SelectIT selection (response-only loss, packing, resumable).

    python -m selectit_jax.train --config=configs/train_smollm2_135m.py \
        --config.data.path=SELECTED.json --config.output_dir=DIR

Run the same command again to resume from DIR/checkpoints; the model is exported to DIR/hf.
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  trainer.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
