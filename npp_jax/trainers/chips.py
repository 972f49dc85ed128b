"""The one table of accelerator chips: peak FLOP/s (for MFU) and memory (for the dry run's "fits")."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  device_kind: str  # what jax's Device.device_kind starts with
  peak_flops: float  # dense bf16 FLOP/s, from the vendor's spec sheet
  hbm_gib: float  # memory per chip (per device as jax sees it), vendor figure
  tpu_generation: str = ""  # gcloud's name of the TPU generation (v5e, ...), for slices named like v5e-16


CHIPS = (
    Chip("TPU v4", 275e12, 32, "v4"),
    Chip("TPU v5 lite", 197e12, 16, "v5e"),  # v5e reports itself as "TPU v5 lite"
    Chip("TPU v5e", 197e12, 16, "v5e"),
    Chip("TPU v5p", 459e12, 95, "v5p"),
    Chip("TPU v5", 459e12, 95, "v5p"),
    Chip("TPU v6 lite", 918e12, 32, "v6e"),  # v6e (Trillium)
    Chip("TPU v6e", 918e12, 32, "v6e"),
    Chip("NVIDIA H100", 989e12, 80),
    Chip("NVIDIA H200", 989e12, 141),
    Chip("NVIDIA A100", 312e12, 80),
)
TPU_GENERATIONS = {c.tpu_generation: c for c in CHIPS if c.tpu_generation}


def chip(device_kind: str) -> Chip | None:
  """The chip of the longest device_kind that `device_kind` starts with ("NVIDIA H100 80GB HBM3" -> H100), or None
  (CPUs)."""
  for entry in sorted(CHIPS, key=lambda c: -len(c.device_kind)):
    if device_kind.startswith(entry.device_kind):
      return entry
  return None
