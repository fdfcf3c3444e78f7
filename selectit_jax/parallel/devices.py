"""The one table of accelerators: memory per device (the planner) and dense bf16 peak FLOP/s
(MFU), found from jax's `device_kind`; and what model.dtype 'auto' means on each platform.

What a program may use is less than the memory: a TPU runtime keeps ~0.25 GiB of HBM for
itself (XLA's limit is 15.75 GiB on a 16 GiB v5e, 95.74 GiB on a v5p), and JAX on a GPU
preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory as its pool
(`usable`)."""

from __future__ import annotations

import dataclasses
import os

GiB = 1 << 30
MiB = 1 << 20
TPU_RESERVE = GiB // 4  # HBM the TPU runtime keeps (XLA's limit = HBM - 0.25 GiB)
GPU_MEM_FRACTION = 0.75  # JAX's default preallocation on a GPU


@dataclasses.dataclass(frozen=True)
class Device:
  memory: int  # bytes per device (one chip or GPU), as the driver reports them
  peak_flops: float  # dense bf16 FLOP/s per device (vendor figure)
  description: str
  kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind, tried in table order
  platform: str = "tpu"  # jax's Device.platform (tpu | gpu): how much of `memory` is usable


# Order matters: the first entry whose substring is in the device kind wins, so the more
# specific names come first (v5 lite before v5; the A100 40 GB before the A100).
DEVICES: dict[str, Device] = {
    "v5e": Device(16 * GiB, 197e12, "TPU v5e (v5 lite), 16 GiB HBM per chip", ("v5 lite", "v5e")),
    "v5p": Device(96 * GiB, 459e12, "TPU v5p, 96 GiB HBM per chip", ("v5p", "v5")),
    "v6e": Device(32 * GiB, 918e12, "TPU v6e (Trillium), 32 GiB HBM per chip", ("v6",)),
    "v4": Device(32 * GiB, 275e12, "TPU v4, 32 GiB HBM per chip", ("v4",)),
    # GPUs: the memory nvidia-smi reports (MiB), not the marketing GB.
    "h200": Device(143771 * MiB, 989e12, "NVIDIA H200 141GB", ("h200",), "gpu"),
    "h100": Device(
        81559 * MiB,
        989e12,
        "NVIDIA H100 80GB (SXM; PCIe peaks at 756 TFLOP/s)",
        ("h100",),
        "gpu",
    ),
    "a100-40g": Device(
        40960 * MiB,
        312e12,
        "NVIDIA A100 40GB",
        ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"),
        "gpu",
    ),
    "a100": Device(81920 * MiB, 312e12, "NVIDIA A100 80GB", ("a100",), "gpu"),
    "l4": Device(23034 * MiB, 121e12, "NVIDIA L4 24GB", ("l4",), "gpu"),
}
# Names a config may also use.
ALIASES = {"a100-80g": "a100", "a100-80gb": "a100", "a100-40gb": "a100-40g"}


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


def gpu_mem_fraction(environ=None) -> float:
  """The share of a GPU's memory JAX preallocates: XLA_CLIENT_MEM_FRACTION or its older name
  XLA_PYTHON_CLIENT_MEM_FRACTION where set (as the run will set it), else JAX's 0.75."""
  environ = os.environ if environ is None else environ
  for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    if environ.get(var):
      return float(environ[var])
  return GPU_MEM_FRACTION


def lookup(name: str) -> tuple[str, Device]:
  """(table name, Device) of a device name or alias; ValueError naming the known ones."""
  name = name.lower().replace(" ", "")
  name = ALIASES.get(name, name)
  if name not in DEVICES:
    raise ValueError(f"unknown device {name!r}; known: cpu, {', '.join(DEVICES)}")
  return name, DEVICES[name]


def capacity(name: str, local_devices: int = 1, environ=None) -> tuple[int, str]:
  """(bytes a program may use per device, description): a TPU's HBM less the runtime's
  reserve, a GPU's memory times JAX's preallocated fraction; CPU devices of one process
  share the host's RAM."""
  if name.lower().replace(" ", "") == "cpu":
    ram = host_ram_bytes()
    return ram // max(local_devices, 1), f"CPU RAM {ram / GiB:.0f} GiB / {local_devices} devices"
  _, dev = lookup(name)
  if dev.platform == "gpu":
    frac = gpu_mem_fraction(environ)
    return int(dev.memory * frac), (
        f"{dev.description} ({dev.memory / GiB:.1f} GiB x XLA_PYTHON_CLIENT_MEM_FRACTION "
        f"{frac:g})"
    )
  return (
      dev.memory - TPU_RESERVE,
      f"{dev.description} (less {TPU_RESERVE / GiB:g} GiB runtime reserve)",
  )


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
  name = ALIASES.get(name, name)
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
