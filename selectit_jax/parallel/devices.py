"""The one table of accelerators: memory per device (the planner) and dense bf16 peak FLOP/s
(MFU), found from jax's `device_kind`.

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
  platform: str = "tpu"  # tpu | gpu: how much of `memory` a program may use (`usable`)


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
