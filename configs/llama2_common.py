"""LLaMA-2 scoring configs: architectures (HF config.json fields, so `plan` needs no weights)
and mesh presets per accelerator slice. configs/llama2_{7b,13b,70b}.py pick one:

    python -m selectit_jax.plan --config=configs/llama2_70b.py:v5p-64
    python -m selectit_jax.score --config=configs/llama2_70b.py:v5p-64 \
        --config.model.path=/ckpt/Llama-2-70b-hf --config.output_dir=/mnt/gcs/run1

Slices: name -> (device type, chips). A TPU "-N" suffix counts TensorCores on v4/v5p
(2 per chip) and chips on v5e/v6e, as gcloud's accelerator types do.

A preset's (data, fsdp, tensor) is its layout on its slice; the run itself takes
mesh.data=-1 (all devices the fsdp and tensor axes leave), so a preset started on more
hosts or nodes than it names still runs: data grows and the global batch is rounded up to
a multiple of data×fsdp. (A fixed data axis made the 2-node GPU preset refuse an 8-node
job: "needs 16 devices, 64 are present".) `plan` plans the slice the preset names.
"""

import ml_collections

from configs import common

SLICES = {
    "v5p-64-fsdp": ("v5p", 32),  # v5p-64 with 70B's FSDP layout
    "cpu": ("cpu", 0),  # whatever this machine has (tests, dry runs)
    "v5e-8": ("v5e", 8),  # 1 host x 8 chips, 16 GiB each
    "v5e-32": ("v5e", 32),  # 8 hosts
    "v4-8": ("v4", 4),  # 1 host x 4 chips, 32 GiB each
    "v4-32": ("v4", 16),  # 4 hosts
    "v5p-8": ("v5p", 4),  # 1 host x 4 chips, 95 GiB each
    "v5p-64": ("v5p", 32),  # 8 hosts
    "v5p-256": ("v5p", 128),  # 32 hosts
    "h100x8": ("h100", 8),  # one 8-GPU node (SLURM: launch/slurm_gpu.sbatch --nodes=1)
    "h100x16": ("h100", 16),  # 2 nodes
    "h100x64": ("h100", 64),  # 8 nodes
}

ARCH = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}
_COMMON_ARCH = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=32000,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def get_config(size: str, meshes: dict, arg: str | None) -> ml_collections.ConfigDict:
  """meshes: slice -> (data, fsdp, tensor, batch_size) for this model size."""
  preset = arg or "cpu"
  if preset not in meshes:
    raise ValueError(f"llama2_{size}: unknown slice {preset!r}; presets: {', '.join(meshes)}")
  device, chips = SLICES[preset]
  data, fsdp, tensor, batch = meshes[preset]
  if chips and data * fsdp * tensor != chips:
    raise ValueError(f"llama2_{size}:{preset}: mesh {data}x{fsdp}x{tensor} is not {chips} devices")
  config = common.score_config()
  config.model.name = f"llama2_{size}"
  config.model.path = ""  # required: HF checkpoint dir (--config.model.path)
  config.model.arch = ml_collections.ConfigDict(dict(_COMMON_ARCH, **ARCH[size]))
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.engine.batch_size = batch
  config.engine.max_tokens = 2048
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp, tensor=tensor))
  config.memory.device = "" if device == "cpu" else device
  config.memory.num_devices = chips
  if device.startswith(("v4", "v5", "v6")):
    config.distributed.initialize = "always" if chips > 8 else "auto"
  return config
