"""LLaMA-2 13B fine-tuning on a selection; the optional arg picks a slice's preset
(configs/train_llama2_common.py): cpu, v5p-8, v5p-32, h100x8.

    python -m selectit_jax.train --config=configs/train_llama2_13b.py:v5p-8 \
        --config.model.path=HF_DIR --config.data.path=SELECTED.json --config.output_dir=OUT
"""

from configs import train_llama2_common


def get_config(arg=None):
  return train_llama2_common.get_config("13b", arg)
