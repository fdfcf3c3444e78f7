"""LLaMA-2 70B scoring, bf16; the optional arg picks a slice's mesh (configs/llama2_common.py).

    python -m selectit_jax.plan --config=configs/llama2_70b.py:v5p-64
    python -m selectit_jax.score --config=configs/llama2_70b.py:v5p-64 \
        --config.model.path=HF_DIR --config.output_dir=OUT
"""

from configs import llama2_common

# slice: (data, fsdp, tensor, batch_size); batch_size is a multiple of data*fsdp.
MESHES = {
    "cpu": (-1, 1, 1, 8),
    # v5e-8 (128 GiB in all) cannot hold 138 GB of bf16 weights: `plan` says so.
    "v5e-8": (1, 8, 1, 8),
    "v5e-32": (1, 32, 1, 32),
    "v4-32": (1, 16, 1, 16),
    # MaxText's inference layout: heads and MLP over `tensor` within a host (4 v5p chips,
    # 8 GPUs; 70B has 8 kv heads), data parallel across hosts, no per-layer weight gathers.
    # Batch sized by `plan`: half the largest that fits (with the flash kernels `auto`
    # picks), 128 rows per data shard on a v5p, 64 on an H100.
    "v5p-8": (1, 1, 4, 128),
    "v5p-64": (8, 1, 4, 1024),
    "v5p-256": (32, 1, 4, 4096),
    "h100x8": (1, 1, 8, 64),
    "h100x16": (2, 1, 8, 128),
    "h100x64": (8, 1, 8, 512),
    # FSDP over all 32 chips (2 rows each): what the v5p-64 preset was before the
    # tensor-parallel one; per layer it gathers ~1.5 GB of weights for its rows.
    "v5p-64-fsdp": (4, 8, 1, 64),
}


def get_config(arg=None):
  return llama2_common.get_config("70b", MESHES, arg)
