"""FLOP accounting, model FLOP utilisation, and the metric writers (TensorBoard, metrics.jsonl, stdout).

FLOPs follow MaxText's convention: 6 x (matmul parameters) per token for the dense layers, plus attention
(QK^T and AV), 4 * T * D per token per layer forward, halved for the causal mask, times 3 for forward + backward.
The embedding lookups are not matmuls and do not count.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
from etils import epath
from tensorboardX import SummaryWriter

from npp_jax.models import gpt
from npp_jax.trainers import chips

def train_flops_per_sequence(model: ml_collections.ConfigDict, seq_len: int) -> float:
  """Training FLOPs (forward + backward) of one sequence of `seq_len` positions."""
  d, f = model.dim, gpt.ffn_hidden_dim(model)
  matmul_params = model.n_layer * (4 * d * d + 3 * d * f) + d * model.vocab_size
  dense = 6 * matmul_params * seq_len
  attention = 3 * model.n_layer * 4 * seq_len * seq_len * d / 2
  return dense + attention


def peak_flops(device: jax.Device) -> float | None:
  """The chip's peak, or None where it is unknown (CPUs): then only FLOP/s is reported."""
  entry = chips.chip(getattr(device, "device_kind", ""))
  return entry.peak_flops if entry else None


class Writer:
  """Process 0 writes TensorBoard events and WORKDIR/metrics.jsonl; every process is silent otherwise."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      path = epath.Path(workdir)
      path.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(path / "tensorboard"))
      self._jsonl = (path / "metrics.jsonl").open("a")

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if not self._active:
      return
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()

  def image(self, step: int, name: str, image_hwc) -> None:
    if self._active:
      self._tb.add_image(name, image_hwc, step, dataformats="HWC")

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()


def progress_line(step: int, total: int, values: dict[str, Any], started: float, start_step: int) -> str:
  """One line: step, loss and friends, throughput, and the ETA from the average speed since the start."""
  elapsed = time.time() - started
  done = max(step - start_step, 1)
  eta = (total - step) * elapsed / done
  shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
  return f"[{step}/{total}] {shown} eta={_duration(eta)}"


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"
