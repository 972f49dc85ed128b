"""A roofline model of a compiled train step: a predicted step time and MFU per chip. A model, not a measurement.

The step's FLOPs take their time at the chip's peak rate, its HBM bytes at the chip's memory bandwidth, and the
bytes each device sends in collectives at half the chip's (bidirectional) interconnect bandwidth. The prediction
is the longest of the three, as if the other two overlapped it perfectly and every unit ran at its peak: a lower
bound on the step time, so an upper bound on the MFU. What bounds the step (compute, memory or interconnect) is the
useful part; how far real steps fall short of the bound is what bench/roofline_check.py and bench/gpu_check.py
measure.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from npp_jax import npp
from npp_jax.models import gpt
from npp_jax.trainers import chips
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import hlo_census
from npp_jax.trainers import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What one train step costs each device."""

  flops: float  # as compiled, recomputation under remat included
  hbm_bytes: float  # bytes read and written in device memory
  wire_bytes: float  # bytes sent in collectives (hlo_census.Collective.wire_bytes_per_step)
  model_flops: float  # the model's own FLOPs (forward and backward once), for MFU


@dataclasses.dataclass(frozen=True)
class Prediction:
  compute_s: float
  memory_s: float
  network_s: float | None  # None where the chip table has no interconnect figure
  step_s: float
  bound: str  # compute | memory | interconnect
  mfu: float


def predict(cost: StepCost, peak_flops: float, hbm_bandwidth: float,
            interconnect_bandwidth: float | None) -> Prediction:
  """The roofline of `cost` on a chip with these peak rates (FLOP/s, bytes/s, bidirectional bytes/s).

  The chip executes at least the model's FLOPs: where XLA's count is lower it has missed loop iterations (a TPU
  splits large gathered products into loops of permutes and partial products, whose bodies it counts once).
  """
  times = {"compute": max(cost.flops, cost.model_flops) / peak_flops, "memory": cost.hbm_bytes / hbm_bandwidth}
  network = None
  if interconnect_bandwidth:
    network = times["interconnect"] = cost.wire_bytes / (interconnect_bandwidth / 2)
  bound = max(times, key=times.get)
  step = times[bound]
  return Prediction(times["compute"], times["memory"], network, step, bound,
                    cost.model_flops / (step * peak_flops) if step > 0 else 0.0)


def predict_on_chip(cost: StepCost, chip: chips.Chip) -> Prediction | None:
  if not chip.hbm_bandwidth:
    return None
  return predict(cost, chip.peak_flops, chip.hbm_bandwidth, chip.interconnect_bandwidth)


def describe(prediction: Prediction, chip: chips.Chip) -> str:
  network = "unknown" if prediction.network_s is None else f"{prediction.network_s * 1e3:.1f} ms"
  return (f"predicted step (roofline model, not a measurement) on {chip.device_kind}: "
          f"{prediction.step_s * 1e3:.1f} ms, {prediction.bound}-bound (compute {prediction.compute_s * 1e3:.1f} ms, "
          f"memory {prediction.memory_s * 1e3:.1f} ms, interconnect {network}), MFU at most {prediction.mfu:.1%}; "
          f"peaks {chip.peak_flops / 1e12:.0f} TFLOP/s, HBM {chip.hbm_bandwidth / 1e9:.0f} GB/s, interconnect "
          + (f"{chip.interconnect_bandwidth / 1e9:.0f} GB/s" if chip.interconnect_bandwidth else "unknown")
          + f" ({chip.source})")


def compiled_cost(compiled: jax.stages.Compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a compiled program by XLA's cost analysis (per device for a partitioned one).

  XLA counts a while loop's body once, whatever its trip count: see `step_cost` for programs with loops.
  """
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]), float(analysis["bytes accessed"])


def step_cost(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, patch_side: int,
              census: list[hlo_census.Collective], compiler_options: dict | None = None) -> StepCost:
  """The per-device cost of a stage's train step, with `census` the collectives of its compiled program.

  XLA's cost analysis counts the body of the layer scan (and of the accumulation loop) once, so FLOPs and bytes
  come from two small unrolled compiles, of two and of three layers on one micro-batch, extrapolated to n_layer
  layers and `grad_accum_steps` micro-batches (the optimizer update is then counted once per micro-batch: an
  over-estimate of its bytes when accumulating). Not from one layer: with a single layer XLA simplifies the
  gradient's assembly into the layer stack away, so that layer costs less than each of several.
  """
  accum = config.train.grad_accum_steps
  costs = []
  for layers in (2, 3):
    small = ml_collections.ConfigDict(config.to_dict())
    small.model.update(n_layer=layers, scan_layers=False)
    small.train.update(grad_accum_steps=1, global_batch_size=config.train.global_batch_size // accum)
    setup = gpt_trainer.build(small, mesh, config.train.num_images)
    step = gpt_trainer.make_train_step(setup, patch_side)
    lowered = step.lower(setup.abstract_state, gpt_trainer.abstract_batch(setup))
    costs.append(compiled_cost(lowered.compile(compiler_options=compiler_options)))
  (flops_2, bytes_2), (flops_3, bytes_3) = costs
  layers = config.model.n_layer
  flops = accum * (flops_2 + (layers - 2) * (flops_3 - flops_2))
  hbm_bytes = accum * (bytes_2 + (layers - 2) * (bytes_3 - bytes_2))
  seq = npp.coarse_grid(gpt.grid_side(config.model), patch_side) ** 2
  model_flops = metrics_lib.train_flops_per_sequence(config.model, seq) * config.train.global_batch_size / mesh.size
  wire = sum(c.wire_bytes_per_step or 0 for c in census)
  return StepCost(flops, hbm_bytes, wire, model_flops)


def estimate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, patch_side: int,
             compiled: jax.stages.Compiled) -> tuple[list[hlo_census.Collective], StepCost]:
  """(the collective census, the per-device cost) of a stage's compiled train step."""
  census = hlo_census.census(compiled.as_text(), mesh)
  return census, step_cost(config, mesh, patch_side, census)
