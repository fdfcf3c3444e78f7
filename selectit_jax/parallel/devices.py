"""The one table of accelerators: memory per device (the planner) and dense bf16 peak FLOP/s
(MFU), found from jax's `device_kind`; and what model.dtype 'auto' means on each platform."""

from __future__ import annotations

import dataclasses
import os

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Device:
  memory: int  # bytes per device (one chip or GPU)
  peak_flops: float  # dense bf16 FLOP/s per device (vendor figure)
  description: str
  kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind, tried in table order
  platform: str = "gpu"  # jax's Device.platform


# Order matters: the first entry whose substring is in the device kind wins, so the more
# specific names come first (v5 lite before v5; the A100 40 GB before the A100).
DEVICES: dict[str, Device] = {
    "v5e": Device(
        16 * GiB, 197e12, "TPU v5e (v5 lite), 16 GiB HBM per chip", ("v5 lite", "v5e"), "tpu"
    ),
    "v5p": Device(95 * GiB, 459e12, "TPU v5p, 95 GiB HBM per chip", ("v5p", "v5"), "tpu"),
    "v6e": Device(32 * GiB, 918e12, "TPU v6e (Trillium), 32 GiB HBM per chip", ("v6",), "tpu"),
    "v4": Device(32 * GiB, 275e12, "TPU v4, 32 GiB HBM per chip", ("v4",), "tpu"),
    "h200": Device(141 * 10**9, 989e12, "NVIDIA H200 141GB", ("h200",)),
    "h100": Device(
        80 * 10**9, 989e12, "NVIDIA H100 80GB (SXM; PCIe peaks at 756 TFLOP/s)", ("h100",)
    ),
    "a100-40g": Device(
        40 * 10**9, 312e12, "NVIDIA A100 40GB", ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb")
    ),
    "a100": Device(80 * 10**9, 312e12, "NVIDIA A100 80GB", ("a100",)),
    "l4": Device(24 * 10**9, 121e12, "NVIDIA L4", ("l4",)),
}


def host_ram_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def name_of(device_kind: str) -> str | None:
  """Our name for a jax device kind, or None (CPU, unknown)."""
  kind = device_kind.lower()
  return next((name for name, d in DEVICES.items() if any(k in kind for k in d.kinds)), None)


def detect(device) -> str:
  """Our name for a jax Device ('cpu' for CPUs and unknown kinds)."""
  if device.platform == "cpu":
    return "cpu"
  return name_of(device.device_kind) or "cpu"


def capacity(name: str, local_devices: int = 1) -> tuple[int, str]:
  """(bytes per device, description); CPU devices of one process share the host's RAM."""
  name = name.lower().replace(" ", "")
  if name == "cpu":
    ram = host_ram_bytes()
    return ram // max(local_devices, 1), f"CPU RAM {ram / GiB:.0f} GiB / {local_devices} devices"
  if name not in DEVICES:
    raise ValueError(f"unknown device {name!r}; known: cpu, {', '.join(DEVICES)}")
  return DEVICES[name].memory, DEVICES[name].description


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak of one device of this kind, or None (CPU, unknown)."""
  name = name_of(device_kind)
  return DEVICES[name].peak_flops if name else None


# model.dtype and model.param_dtype 'auto' (configs/common.py), by platform: fp32 on CPU (bf16
# buys ~5 % there, BENCHMARKS.md "Levers tried"), bf16 weights and matmuls on accelerators
# (norms, softmax and logsumexp stay fp32 in models/layers.py), where they halve the weights'
# memory and run the tensor cores. What bf16 does to the ranking (bench/bench_dtype.py,
# BENCHMARKS.md: SmolLM2, the first 100 usable ShareGPT records × the 5 released prompts, paper
# mode, α 0.2): max |Δp| 3.4e-2, mean 1.9e-3, Spearman ρ 0.967, 2 of the 20 selected samples
# change; dropping one of the 5 prompts in fp32 changes 2-5 of 20 (ρ 0.92-0.99). bf16 stays
# within the method's own sensitivity, so it is the accelerator default; set model.dtype and
# model.param_dtype to float32 for fp32's exact selection (a scores dir records which ran).
AUTO = "auto"
AUTO_DTYPES = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}


def platform_of(name: str) -> str:
  """The platform ('cpu', 'gpu', 'tpu') of one of our device names (`detect`, config.memory
  .device)."""
  name = name.lower().replace(" ", "")
  return "cpu" if name == "cpu" or name not in DEVICES else DEVICES[name].platform


def resolve_dtype(dtype: str, platform: str) -> str:
  """A configured dtype, with 'auto' resolved for the platform (jax's Device.platform; any
  other accelerator than a TPU counts as a GPU)."""
  if dtype != AUTO:
    return dtype
  return AUTO_DTYPES.get(platform, AUTO_DTYPES["gpu"])


def resolve_dtypes(config, platform: str | None = None):
  """The scoring config with concrete model.dtype and model.param_dtype: the one place where
  'auto' is resolved, before the memory check, the loader and the manifest see them (so a
  scores dir records the dtype that ran). platform None = that of jax.devices()[0]."""
  model = config.model
  if AUTO not in (model.dtype, model.param_dtype):
    return config
  if platform is None:
    import jax  # noqa: PLC0415  (this module is imported where no backend may start)

    platform = jax.devices()[0].platform
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = resolve_dtype(model.dtype, platform)
    config.model.param_dtype = resolve_dtype(model.param_dtype, platform)
  return config
