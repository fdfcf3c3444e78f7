"""LLaMA-2 fine-tuning as the paper ran it, FSDP over a slice; configs/train_llama2_{7b,13b}.py
pick one preset:

    python -m selectit_jax.train --config=configs/train_llama2_7b.py:v5p-8 \
        --config.model.path=/ckpt/Llama-2-7b-hf --config.data.path=SELECTED.json \
        --config.output_dir=/mnt/run1 --config.checkpoint.dir=gs://BUCKET/run1/checkpoints

The released scripts: 128 sequences a step, lr 2e-5, 3 epochs, cosine, 3 % warmup, weight
decay 0, clip 1.0, bf16, gradient checkpointing, max length 4096 (the paper's experiments
used 2048: --config.data.max_length=2048). Here: bf16 compute over fp32 master weights and
fp32 AdamW moments, sharded over every chip (fsdp), each block rematerialised in the
backward pass. micro_batch_size is one 4096-token row per chip; a step of 128 examples
packs into ceil(rows / micro) micro-batches.
"""

import ml_collections

from configs import llama2_common
from configs import train_smollm2_135m

# slice: (data, fsdp, tensor, micro_batch_size rows). Every preset is one row per chip.
PRESETS = {
    "cpu": (1, -1, 1, 8),  # whatever this machine has (dry runs with a tiny model.path)
    "v5p-8": (1, 4, 1, 4),  # 1 host x 4 chips, 95 GiB each
    "v5p-32": (1, 16, 1, 16),  # 4 hosts x 4 chips
    "h100x8": (1, 8, 1, 8),  # one 8-GPU node, 80 GB each
}
_CHIPS = {"cpu": 0, "v5p-8": 4, "v5p-32": 16, "h100x8": 8}


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(
        f"train_llama2_{size}: unknown slice {preset!r}; presets: {', '.join(PRESETS)}"
    )
  data, fsdp, tensor, micro = PRESETS[preset]
  c = train_smollm2_135m.get_config()
  c.model.path = ""  # required: the HF checkpoint dir (--config.model.path)
  c.model.embedded = ""
  c.model.arch = ml_collections.ConfigDict(
      dict(llama2_common._COMMON_ARCH, **llama2_common.ARCH[size])  # pylint: disable=protected-access
  )
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"  # master weights, gradients and AdamW moments
  c.model.remat = True
  c.data.max_length = 4096  # the released scripts' limit; the paper's experiments: 2048
  c.train.micro_batch_size = micro
  c.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  c.export.dtype = "bfloat16"
  c.checkpoint.every = 100
  if preset.startswith("v5p") and _CHIPS[preset] > 4:
    c.distributed.initialize = "always"  # a multi-host TPU slice: JAX detects the pod
  return c
