"""LLaMA-2 13B scoring, bf16; the optional arg picks a slice's mesh (configs/llama2_common.py).

    python -m selectit_jax.plan --config=configs/llama2_13b.py:v5p-64
    python -m selectit_jax.score --config=configs/llama2_13b.py:v5p-64 \
        --config.model.path=HF_DIR --config.output_dir=OUT
"""

from configs import llama2_common

# slice: (data, fsdp, tensor, batch_size); batch_size is a multiple of data*fsdp.
MESHES = {
    "cpu": (-1, 1, 1, 8),
    "v5e-8": (1, 8, 1, 16),
    "v5e-32": (4, 8, 1, 64),
    "v4-8": (1, 4, 1, 16),
    "v4-32": (2, 8, 1, 64),
    "v5p-8": (4, 1, 1, 64),
    "v5p-64": (32, 1, 1, 256),
    # Sized by `plan`: half the largest batch that fits (32 rows/device on an H100, 64 on a
    # v5p, with the flash kernels `auto` picks).
    "v5p-256": (128, 1, 1, 8192),
    "h100x8": (8, 1, 1, 64),
    "h100x16": (16, 1, 1, 128),
    "h100x64": (64, 1, 1, 2048),
}


def get_config(arg=None):
  return llama2_common.get_config("13b", MESHES, arg)
