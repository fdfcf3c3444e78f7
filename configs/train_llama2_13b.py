"""LLaMA-2 13B instruction tuning, FSDP; the optional arg picks a slice
(configs/train_llama2_common.py).

    python -m selectit_jax.plan --config=configs/train_llama2_13b.py:v5p-8
"""

from configs import train_llama2_common

# slice: (micro_batch_size, remat), from `plan`: micro_batch_size is global (a multiple of
# the slice's devices) and 128 / micro_batch_size micro-batches make one step.
MICRO = {
    "cpu": (8, True),
    "v5p-8": (16, True),
    "v5p-32": (64, True),
    "h100x8": (32, True),
}


def get_config(arg=None):
  return train_llama2_common.get_config("13b", MICRO, arg)
