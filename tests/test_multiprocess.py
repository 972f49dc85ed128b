"""Two processes x 4 CPU devices over loopback (jax.distributed + gloo) train exactly like 1 process x 8 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

ARGS = ["--config", "configs/tiny.py", "--config.npp.stages=((2, 0.5), (1, 0.5))", "--config.train.total_steps=4",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2"]
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO))
  return env


def _launch(workdir, devices, extra=()):
  return subprocess.Popen([sys.executable, "-m", "npp_jax.main", *ARGS, "--workdir", str(workdir), *extra],
                          cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc) -> str:
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"process did not finish in {TIMEOUT_S} s:\n{proc.communicate()[0][-3000:]}")
  assert proc.returncode == 0, out[-3000:]
  return out


def _losses(workdir) -> list[float]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["loss"] for line in lines]


def _final_params(workdir):
  """The newest checkpoint's parameters, restored onto this process's first device (the savers had others)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from npp_jax.checkpoints import checkpoint  # pylint: disable=g-import-not-at-top
  from npp_jax.config import load_file  # pylint: disable=g-import-not-at-top
  from npp_jax.models import gpt  # pylint: disable=g-import-not-at-top

  config = load_file(str(REPO / "configs" / "tiny.py"))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: gpt.GPT(config.model, rngs=nnx.Rngs(0)))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  step = checkpoint.manager(str(workdir), read_only=True).latest_step()
  return step, jax.tree.map(np.asarray, checkpoint.restore_params(str(workdir), target))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  single = _launch(root / "single", 8)
  out_single = _finish(single)
  port = _free_port()
  coordinator = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--init_timeout", "120"]
  procs = [_launch(root / "multi", 4, coordinator + ["--process_id", str(i)]) for i in range(2)]
  outs = [_finish(p) for p in procs]
  return root, out_single, outs


def test_same_losses_and_checkpoint_as_one_process(runs):
  root, _, outs = runs
  assert "2 processes" in outs[0]
  np.testing.assert_allclose(_losses(root / "multi"), _losses(root / "single"), rtol=1e-6, atol=1e-6)
  step_multi, params_multi = _final_params(root / "multi")
  step_single, params_single = _final_params(root / "single")
  assert step_multi == step_single == 4
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(params_multi), jax.tree.leaves(params_single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_only_process_zero_writes_logs(runs):
  root, _, outs = runs
  assert "[4/4]" in outs[0] and "[4/4]" not in outs[1]
  assert len(_losses(root / "multi")) == 4  # one line per step, not one per process


def test_missing_process_fails_clearly_within_timeout(tmp_path):
  port = _free_port()
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "npp_jax.main", *ARGS, "--workdir", str(tmp_path / "w"),
                         "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "0",
                         "--init_timeout", "5"], cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "could not join the multi-process run" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert time.time() - start < 60
