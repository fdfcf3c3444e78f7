"""The one table of accelerators: memory per device (the planner) and dense bf16 peak FLOP/s
(MFU), found from jax's `device_kind`."""

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


# Order matters: the first entry whose substring is in the device kind wins, so the more
# specific names come first (v5 lite before v5; the A100 40 GB before the A100).
DEVICES: dict[str, Device] = {
    "v5e": Device(16 * GiB, 197e12, "TPU v5e (v5 lite), 16 GiB HBM per chip", ("v5 lite", "v5e")),
    "v5p": Device(95 * GiB, 459e12, "TPU v5p, 95 GiB HBM per chip", ("v5p", "v5")),
    "v6e": Device(32 * GiB, 918e12, "TPU v6e (Trillium), 32 GiB HBM per chip", ("v6",)),
    "v4": Device(32 * GiB, 275e12, "TPU v4, 32 GiB HBM per chip", ("v4",)),
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
