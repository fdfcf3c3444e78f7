"""LLaMA-2 instruction-tuning presets with FSDP meshes per slice; the architecture comes from
configs/llama2_common.py, so `plan` needs no weights:

    python -m selectit_jax.plan --config=configs/train_llama2_7b.py:v5p-8
    python -m selectit_jax.train --config=configs/train_llama2_7b.py:v5p-8 \\
        --config.model.path=/ckpt/Llama-2-7b-hf --config.data.path=SELECTED.json \\
        --config.output_dir=/mnt/run1 --config.checkpoint.dir=gs://BUCKET/run1/checkpoints

The released scripts: 128 examples a step, lr 2e-5, 3 epochs, cosine, 3 % warmup, weight
decay 0, clip 1.0, bf16, gradient checkpointing, max length 4096 (the paper's experiments
used 2048: --config.data.max_length=2048). Here: bf16 compute over fp32 master weights and
fp32 AdamW moments, sharded over every chip (fsdp=-1), each block rematerialised in the
backward pass; the micro-batch's rows are sharded too, and micro_batch_size is a multiple
of every preset's device count (sized with `plan`).
"""

import ml_collections

from configs import llama2_common
from configs import train_smollm2_135m

# slice: (device type, devices). v5p: 4 chips a host; h100x8: one 8-GPU node.
SLICES = {
    "cpu": ("cpu", 0),  # whatever this machine has (tests, dry runs)
    "v5p-8": ("v5p", 4),
    "v5p-32": ("v5p", 16),
    "h100x8": ("h100", 8),
}


def get_config(size: str, micro: dict, arg: str | None) -> ml_collections.ConfigDict:
  """micro: slice -> (micro_batch_size, remat) for this model size."""
  preset = arg or "cpu"
  if preset not in micro:
    raise ValueError(f"train_llama2_{size}: unknown slice {preset!r}; presets: {', '.join(micro)}")
  device, chips = SLICES[preset]
  micro_batch, remat = micro[preset]
  c = train_smollm2_135m.get_config()
  c.model.path = ""  # required: the HF checkpoint dir (--config.model.path)
  c.model.embedded = ""
  c.model.arch = ml_collections.ConfigDict(
      dict(llama2_common._COMMON_ARCH, **llama2_common.ARCH[size])  # noqa: SLF001
  )
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full" if remat else "none"
  c.data.max_length = 4096  # the released scripts' limit; the paper's experiments: 2048
  c.data.template = "alpaca"  # LLaMA-2 base models have no chat template
  c.train.batch_size = 128  # examples a step, packed into rows within the step
  c.train.micro_batch_size = micro_batch
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.export.dtype = "bfloat16"
  c.checkpoint.every = 100
  # For `plan` (parallel/memory.py): the device and how many there are.
  c.memory = ml_collections.ConfigDict(
      dict(device="" if device == "cpu" else device, num_devices=chips, headroom=0.9)
  )
  if "distributed" in c and chips > 8 and device.startswith("v"):
    c.distributed.initialize = "always"  # a multi-host TPU slice
  return c
