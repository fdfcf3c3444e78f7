"""LLaMA-2 7B scoring, bf16; the optional arg picks a slice's mesh (configs/llama2_common.py).

    python -m selectit_jax.plan --config=configs/llama2_7b.py:v5p-64
    python -m selectit_jax.score --config=configs/llama2_7b.py:v5p-64 \
        --config.model.path=HF_DIR --config.output_dir=OUT
"""

from configs import llama2_common

# slice: (data, fsdp, tensor, batch_size); batch_size is a multiple of data*fsdp.
MESHES = {
    "cpu": (-1, 1, 1, 8),
    "v5e-8": (1, 8, 1, 32),
    "v5e-32": (4, 8, 1, 128),
    "v4-8": (1, 4, 1, 32),
    "v4-32": (4, 4, 1, 128),
    "v5p-8": (4, 1, 1, 64),
    "v5p-64": (32, 1, 1, 512),
    # Sized by `plan`: half the largest batch that fits (64 rows/device on an H100, 128 on a
    # v5p, with the flash kernels `auto` picks), leaving room for the estimate's error.
    "v5p-256": (128, 1, 1, 16384),
    "h100x8": (8, 1, 1, 128),
    "h100x16": (16, 1, 1, 256),
    "h100x64": (64, 1, 1, 4096),
}


def get_config(arg=None):
  return llama2_common.get_config("7b", MESHES, arg)
