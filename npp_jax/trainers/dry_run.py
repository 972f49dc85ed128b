"""Compile the train step from the abstract state, without allocating the model, and report its cost.

For the current devices, or for a TPU slice (config.mesh.topology, e.g. v5p-64) through
jax.experimental.topologies when libtpu is installed: a laptop can check that GPT-XXL fits a slice before anyone
pays for it, what its collectives move per step, which parameters the mesh leaves whole, and what the step should
cost there by a roofline model (trainers/roofline.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import ml_collections

import jax
from jax.experimental import topologies

from npp_jax import errors
from npp_jax import npp
from npp_jax import sharding
from npp_jax.models import gpt
from npp_jax.trainers import chips
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import hlo_census
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import roofline

# Generations whose slice names count TensorCores (two per chip, driven as one "megacore" device) and whose chips
# form a 3D torus; the others count chips on a 2D torus.
_MEGACORE_3D = ("v4", "v5p")


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """Splits a power-of-two chip count over `dims` torus axes as evenly as possible, larger axes last."""
  if chips < 1 or chips & (chips - 1):
    raise errors.InvalidInput(f"a TPU slice has a power-of-two number of chips, got {chips}")
  shape = [1] * dims
  axis = dims - 1
  while chips > 1:
    shape[axis] *= 2
    chips //= 2
    axis = axis - 1 if axis > 0 else dims - 1
  shape = sorted(shape)
  # Slices below a full cube keep their unit axis last, as gcloud names them (v4-8 is 2x2x1).
  return tuple(shape[1:] + shape[:1]) if dims == 3 and shape[0] == 1 else tuple(shape)


def topology_name(accelerator: str) -> tuple[str, str]:
  """gcloud's accelerator type (v5p-64, v5e-16, v4-8, v6e-8) -> (libtpu topology name, chip config)."""
  try:
    generation, count = accelerator.lower().split("-")
    count = int(count)
  except ValueError:
    raise errors.InvalidInput(f"mesh.topology must look like v5p-64 or v5e-16, got {accelerator!r}") from None
  if generation in ("v5litepod", "v5lite"):
    generation = "v5e"
  if generation not in chips.TPU_GENERATIONS:
    raise errors.InvalidInput(f"unknown TPU generation {generation!r} in {accelerator!r}; known: "
                              f"{sorted(chips.TPU_GENERATIONS)}")
  if generation in _MEGACORE_3D:
    shape = _torus(max(count // 2, 1), 3)
    return f"{generation}:{'x'.join(map(str, shape))}", "megacore"
  return f"{generation}:{'x'.join(map(str, _torus(count, 2)))}", "default"


def topology_devices(accelerator: str) -> tuple[list, float | None]:
  """The devices of a TPU slice named as gcloud names it, compiled against libtpu on any host."""
  name, chip_config = topology_name(accelerator)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as e:  # noqa: BLE001  (missing libtpu, unknown name: one sentence for the user)
    hint = "" if importlib.util.find_spec("libtpu") else "; it needs libtpu: pip install -e '.[tpu]'"
    raise errors.InvalidInput(f"cannot compile for TPU topology {accelerator!r} = {name} "
                              f"({str(e).strip().splitlines()[0][:200]}){hint}") from None
  return list(desc.devices), chips.TPU_GENERATIONS[name.split(":")[0]].hbm_gib


def run(config: ml_collections.ConfigDict) -> dict:
  if config.mesh.topology:
    devices, _ = topology_devices(config.mesh.topology)
    chip = chips.TPU_GENERATIONS[topology_name(config.mesh.topology)[0].split(":")[0]]
  else:
    devices = jax.devices()
    chip = chips.chip(devices[0].device_kind)
  hbm_gib = chip.hbm_gib if chip else None
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  setup = gpt_trainer.build(config, mesh, config.train.num_images)
  where = config.mesh.topology or f"{len(devices)} x {devices[0].device_kind}"
  print(f"compiling for {where}, mesh {dict(mesh.shape)}", flush=True)
  print(f"parameters: {gpt.num_parameters(config.model):,}", flush=True)
  for line in gpt_trainer.replication_lines(setup):
    print(line, flush=True)

  report = {"parameters": gpt.num_parameters(config.model), "stages": {},
            "unsharded": [u.sentence() for u in setup.unsharded]}
  grid = gpt.grid_side(config.model)
  for patch_side in sorted({s.patch_side for s in setup.stages}):
    step = gpt_trainer.make_train_step(setup, patch_side)
    seq = npp.coarse_grid(grid, patch_side) ** 2
    flops = metrics_lib.train_flops_per_sequence(config.model, seq) * config.train.global_batch_size
    try:
      compiled = step.lower(setup.abstract_state, gpt_trainer.abstract_batch(setup)).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The TPU compiler refuses programs that cannot fit: that is the answer the user asked for.
      reason = str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
      print(f"patch side {patch_side} (sequence {seq}): {flops / 1e12:.2f} TFLOPs per step (model), "
            f"DOES NOT FIT: {reason}", flush=True)
      report["stages"][patch_side] = {"tflops_per_step": flops / 1e12, "fits": False, "reason": reason}
      continue
    memory = compiled.memory_analysis()
    gib = lambda b: b / 2**30
    args, temp, out = memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes
    alias = memory.alias_size_in_bytes
    total = args + temp + out - alias
    line = (f"patch side {patch_side} (sequence {seq}): {flops / 1e12:.2f} TFLOPs per step (model), "
            f"per device: arguments {gib(args):.2f} GiB, temporaries {gib(temp):.2f} GiB, "
            f"outputs {gib(out):.2f} GiB, aliased {gib(alias):.2f} GiB, total {gib(total):.2f} GiB")
    if hbm_gib:
      line += f" of {hbm_gib} GiB: " + ("fits" if gib(total) <= hbm_gib else "DOES NOT FIT")
    print(line, flush=True)
    stage = {"tflops_per_step": flops / 1e12, "total_gib": gib(total), "argument_gib": gib(args),
             "temp_gib": gib(temp), "fits": None if not hbm_gib else gib(total) <= hbm_gib}
    stage.update(_traffic(config, mesh, patch_side, compiled, chip, where))
    report["stages"][patch_side] = stage
  return report


def _traffic(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, patch_side: int, compiled,
             chip: chips.Chip | None, where: str) -> dict:
  """Prints the compiled step's collective census and cost, and the roofline prediction where the chip is known."""
  census, cost = roofline.estimate(config, mesh, patch_side, compiled)
  print(f"  collectives per step per device (as compiled for {where}):", flush=True)
  for line in hlo_census.format_census(census) or ["none"]:
    print(f"    {line}", flush=True)
  if any(c.calls is None for c in census):
    print("    (a loop without a known trip count holds collectives: counted once above)", flush=True)
  print(f"  per device per step: {cost.flops / 1e12:.3f} TFLOPs as compiled, {cost.hbm_bytes / 2**30:.2f} GiB of "
        f"memory traffic, {cost.wire_bytes / 2**20:.1f} MiB sent in collectives", flush=True)
  if cost.flops < cost.model_flops:
    print(f"    (below the model's {cost.model_flops / 1e12:.3f} TFLOPs: XLA's count misses loop iterations; the "
          f"prediction uses the model's)", flush=True)
  result = {"census": hlo_census.summary(census), "cost": dataclasses.asdict(cost)}
  prediction = roofline.predict_on_chip(cost, chip) if chip else None
  if prediction is None:
    print(f"  no roofline: the chip table has no figures for {where} (bench/roofline_check.py measures a CPU's)",
          flush=True)
  else:
    print(f"  {roofline.describe(prediction, chip)}", flush=True)
    result["prediction"] = dataclasses.asdict(prediction)
  return result
