"""The dry run's TPU slice naming, a real compile for a small TPU topology when libtpu is installed, the chip table,
the roofline model, and what the dry run prints on the 8 CPU devices."""

import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from npp_jax import sharding
from npp_jax.config import load_file as load_config_file
from npp_jax.trainers import chips
from npp_jax.trainers import dry_run
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import roofline

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("accelerator, expected", [
    ("v5p-64", ("v5p:2x4x4", "megacore")),    # 64 TensorCores = 32 chips on a 3D torus
    ("v5p-8", ("v5p:2x2x1", "megacore")),
    ("v4-16", ("v4:2x2x2", "megacore")),
    ("v4-128", ("v4:4x4x4", "megacore")),
    ("v5e-16", ("v5e:4x4", "default")),       # v5e and v6e count chips on a 2D torus
    ("v5litepod-8", ("v5e:2x4", "default")),
    ("v6e-256", ("v6e:16x16", "default")),
])
def test_topology_names(accelerator, expected):
  assert dry_run.topology_name(accelerator) == expected


@pytest.mark.parametrize("bad", ["v5p", "v5p-sixty", "v9-8", "v5e-12"])
def test_bad_topology_names_are_refused(bad):
  with pytest.raises(ValueError):
    dry_run.topology_name(bad)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e '.[tpu]')")
def test_compiles_the_tiny_config_for_a_v5e_slice():
  # libtpu takes a machine-wide lock unless told that other processes (a parallel run) may load it too.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  result = subprocess.run([sys.executable, "-m", "npp_jax.main", "--config", "configs/tiny.py", "--dry_run",
                           "--config.mesh.topology=v5e-8"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "compiling for v5e-8, mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in result.stdout
  assert "parameters: 140,288" in result.stdout
  assert result.stdout.count("of 16 GiB: fits") == 2  # one line per stage (patch sides 1 and 2)
  # The TPU's own census and a prediction from the v5e's figures, every loop's trips counted.
  assert result.stdout.count("collectives per step per device (as compiled for v5e-8):") == 2
  assert "all-reduce over data:" in result.stdout
  assert "loop without a known trip count" not in result.stdout
  assert result.stdout.count("predicted step (roofline model, not a measurement) on TPU v5") == 2


def test_chip_table_matches_full_device_kinds():
  assert chips.chip("NVIDIA H100 80GB HBM3").hbm_gib == 80
  assert chips.chip("NVIDIA H200").hbm_gib == 141
  assert chips.chip("TPU v5 lite").peak_flops == 197e12  # v5e, not v5p's "TPU v5"
  assert chips.chip("TPU v5").peak_flops == 459e12
  assert chips.chip("cpu") is None
  assert chips.TPU_GENERATIONS["v5e"].hbm_gib == 16 and chips.TPU_GENERATIONS["v5p"].hbm_gib == 95


def test_chip_table_has_bandwidths_with_sources_for_the_roofline():
  for entry in chips.CHIPS:
    assert entry.hbm_bandwidth and entry.source, entry
  assert chips.TPU_GENERATIONS["v5p"].hbm_bandwidth == 2765e9
  assert chips.TPU_GENERATIONS["v5e"].interconnect_bandwidth == 400e9
  assert chips.TPU_GENERATIONS["v4"].interconnect_bandwidth is None  # not published beside the others


def test_roofline_takes_the_slowest_of_compute_memory_and_interconnect():
  cost = roofline.StepCost(flops=2e12, hbm_bytes=1e9, wire_bytes=3e8, model_flops=1.5e12)
  # 2 ms of compute at 1 PFLOP/s, 1 ms of memory at 1 TB/s, 6 ms to send 0.3 GB over half of 100 GB/s.
  p = roofline.predict(cost, 1e15, 1e12, 1e11)
  assert (p.bound, p.step_s) == ("interconnect", pytest.approx(6e-3))
  assert (p.compute_s, p.memory_s, p.network_s) == (pytest.approx(2e-3), pytest.approx(1e-3), pytest.approx(6e-3))
  assert p.mfu == pytest.approx(1.5e12 / (6e-3 * 1e15))
  unknown_links = roofline.predict(cost, 1e15, 1e12, None)
  assert (unknown_links.bound, unknown_links.network_s) == ("compute", None)
  # A compiled count below the model's FLOPs missed loop iterations: the model's count is the floor.
  undercounted = roofline.predict(dataclasses.replace(cost, flops=1e12), 1e15, 1e12, None)
  assert undercounted.compute_s == pytest.approx(1.5e-3)


def test_step_cost_counts_every_layer_of_the_scan():
  """XLA's cost analysis counts a loop body once; step_cost extrapolates from two and three unrolled layers. Checked
  against a five-layer step compiled unrolled, whose cost analysis sees every layer."""
  config = load_config_file(str(REPO / "configs" / "tiny.py"))
  config.model.n_layer = 5
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  fast = {"xla_backend_optimization_level": 0}  # LLVM's level: XLA's HLO and its cost analysis are the same
  cost = roofline.step_cost(config, mesh, 2, census=[], compiler_options=fast)
  config.model.scan_layers = False
  setup = gpt_trainer.build(config, mesh, 2048)
  unrolled = gpt_trainer.make_train_step(setup, 2).lower(setup.abstract_state, gpt_trainer.abstract_batch(setup))
  flops, hbm_bytes = roofline.compiled_cost(unrolled.compile(compiler_options=fast))
  assert cost.flops == pytest.approx(flops, rel=1e-3)
  assert cost.hbm_bytes == pytest.approx(hbm_bytes, rel=0.05)
  assert cost.wire_bytes == 0
  # The model's own FLOPs: forward and backward once, no recomputation (remat is off here).
  assert cost.model_flops == pytest.approx(flops, rel=0.25)


def test_dry_run_prints_the_census_the_unsharded_parameters_and_no_roofline_for_a_cpu(capsys):
  config = load_config_file(str(REPO / "configs" / "tiny.py"))
  config.npp.stages = ((2, 1.0),)
  config.model.vocab_size = 63  # the tensor axis cannot split it
  config.mesh.shape = (1, 4, 2)
  report = dry_run.run(config)
  out = capsys.readouterr().out
  assert "parameter tok_embeddings dimension 0 (vocab, size 63) is not split over mesh axis tensor" in out
  assert "all-gather over fsdp:" in out and "all-reduce over tensor:" in out
  assert "no roofline: the chip table has no figures for 8 x cpu" in out
  stage = report["stages"][2]
  assert stage["census"][("all-gather", ("fsdp",))][1] > 0
  assert stage["cost"]["flops"] > 0 and "prediction" not in stage
