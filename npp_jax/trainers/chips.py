"""The one table of accelerator chips: peak FLOP/s (for MFU), memory (for the dry run's "fits"), and the memory and
interconnect bandwidths the roofline model of a step uses, each with where the figure comes from."""

from __future__ import annotations

import dataclasses

_CLOUD_TPU = "cloud.google.com/tpu/docs/"


@dataclasses.dataclass(frozen=True)
class Chip:
  device_kind: str  # what jax's Device.device_kind starts with
  peak_flops: float  # dense bf16 FLOP/s, from the vendor's spec sheet
  hbm_gib: float  # memory per chip (per device as jax sees it), vendor figure
  tpu_generation: str = ""  # gcloud's name of the TPU generation (v5e, ...), for slices named like v5e-16
  hbm_bandwidth: float | None = None  # bytes/s per chip, vendor figure
  interconnect_bandwidth: float | None = None  # bytes/s per chip, all links, both directions (ICI / NVLink)
  source: str = ""  # where the figures are published


_V4 = dict(tpu_generation="v4", hbm_bandwidth=1200e9, source=_CLOUD_TPU + "v4 (no ICI figure published there)")
_V5E = dict(tpu_generation="v5e", hbm_bandwidth=819e9, interconnect_bandwidth=400e9, source=_CLOUD_TPU + "v5e")
_V5P = dict(tpu_generation="v5p", hbm_bandwidth=2765e9, interconnect_bandwidth=1200e9, source=_CLOUD_TPU + "v5p")
_V6E = dict(tpu_generation="v6e", hbm_bandwidth=1638e9, interconnect_bandwidth=800e9, source=_CLOUD_TPU + "v6e")

CHIPS = (
    Chip("TPU v4", 275e12, 32, **_V4),
    Chip("TPU v5 lite", 197e12, 16, **_V5E),  # v5e reports itself as "TPU v5 lite"
    Chip("TPU v5e", 197e12, 16, **_V5E),
    Chip("TPU v5p", 459e12, 95, **_V5P),
    Chip("TPU v5", 459e12, 95, **_V5P),
    Chip("TPU v6 lite", 918e12, 32, **_V6E),  # v6e (Trillium)
    Chip("TPU v6e", 918e12, 32, **_V6E),
    Chip("NVIDIA H100", 989e12, 80, hbm_bandwidth=3.35e12, interconnect_bandwidth=900e9,
         source="NVIDIA H100 Tensor Core GPU datasheet (SXM5: dense BF16, HBM3, NVLink)"),
    Chip("NVIDIA H200", 989e12, 141, hbm_bandwidth=4.8e12, interconnect_bandwidth=900e9,
         source="NVIDIA H200 Tensor Core GPU datasheet (SXM: dense BF16, HBM3e, NVLink)"),
    Chip("NVIDIA A100", 312e12, 80, hbm_bandwidth=2.039e12, interconnect_bandwidth=600e9,
         source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: dense BF16, HBM2e, NVLink)"),
)
TPU_GENERATIONS = {c.tpu_generation: c for c in CHIPS if c.tpu_generation}


def chip(device_kind: str) -> Chip | None:
  """The chip of the longest device_kind that `device_kind` starts with ("NVIDIA H100 80GB HBM3" -> H100), or None
  (CPUs)."""
  for entry in sorted(CHIPS, key=lambda c: -len(c.device_kind)):
    if device_kind.startswith(entry.device_kind):
      return entry
  return None
