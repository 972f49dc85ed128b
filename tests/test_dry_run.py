"""The dry run's TPU slice naming, and a real compile for a small TPU topology when libtpu is installed."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from npp_jax.trainers import chips
from npp_jax.trainers import dry_run

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


def test_chip_table_matches_full_device_kinds():
  assert chips.chip("NVIDIA H100 80GB HBM3").hbm_gib == 80
  assert chips.chip("NVIDIA H200").hbm_gib == 141
  assert chips.chip("TPU v5 lite").peak_flops == 197e12  # v5e, not v5p's "TPU v5"
  assert chips.chip("TPU v5").peak_flops == 459e12
  assert chips.chip("cpu") is None
  assert chips.TPU_GENERATIONS["v5e"].hbm_gib == 16 and chips.TPU_GENERATIONS["v5p"].hbm_gib == 95
