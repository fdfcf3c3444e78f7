"""Fine-tunes a model on a SelectIT selection (response-only loss, packing, resumable).

    python -m selectit_jax.train --config=configs/train_smollm2_135m.py \
        --config.data.path=SELECTED.json --config.output_dir=DIR

Run the same command again to resume from DIR/checkpoints; the model is exported to DIR/hf.
On a pod every host runs the same command (jax.distributed starts first: parallel/distributed).
"""

from absl import app
from ml_collections import config_flags

from selectit_jax import cli
from selectit_jax.parallel import distributed
from selectit_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_CONFIG.value)  # before any other JAX call
  trainer.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run_main(main)
