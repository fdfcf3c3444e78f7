"""Tiny scoring settings for tests and dry runs: a few records, 2 prompts, short rows, one
device. Give a small checkpoint with --config.model.path (the tests' tiny random LLaMA), or
leave it empty for the embedded SmolLM2.

    python -m selectit_jax.score --config=configs/score_tiny.py --config.output_dir=DIR
"""

from configs import smollm2_135m


def get_config():
  config = smollm2_135m.get_config()
  config.data.limit = 4
  config.prompts.k = 2
  config.engine.max_tokens = 256
  config.engine.batch_size = 2
  config.engine.max_shapes = 3
  config.engine.shard_rows = 2
  config.mesh.data = 1
  return config
