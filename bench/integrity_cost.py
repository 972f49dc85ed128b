"""The integrity record's cost per GiB of checkpoint: writing the record after a save, and checking it before a
restore, against the save itself.

  python bench/integrity_cost.py                       # a GPT-B-sized train state (params, EMA, Adam mu and nu)
  python bench/integrity_cost.py --config configs/gpt_xl.py --workdir gs://BUCKET/tmp/integrity
  python bench/integrity_cost.py --gib 0.05            # a quick check that it works

The state is float32 arrays of the config's parameter count, times four (params, EMA, two Adam moments), or --gib
GiB when given. Timed: the Orbax save (to the commit), `integrity.write_record` and `integrity.verify` (each reads
every file back: on a local disk they mostly hit the page cache, on gs:// they download). Prints seconds per GiB.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from etils import epath  # noqa: E402

from npp_jax import config as config_lib  # noqa: E402
from npp_jax.checkpoints import checkpoint  # noqa: E402
from npp_jax.checkpoints import integrity  # noqa: E402
from npp_jax.models import gpt  # noqa: E402

_LEAF = 1 << 24  # 16 Mi elements (64 MiB) per array, about a large GPT layer


def make_state(num_floats: int) -> dict:
  """float32 arrays of `num_floats` elements in all, with distinct (non-constant) contents."""
  leaves, left, i = {}, num_floats, 0
  while left > 0:
    n = min(left, _LEAF)
    leaves[f"w{i:04d}"] = jax.random.normal(jax.random.key(i), (n,), jnp.float32)
    left, i = left - n, i + 1
  return {"step": jnp.zeros((), jnp.int32), "params": leaves}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/gpt_b.py", help="model whose train state size is used")
  p.add_argument("--gib", type=float, default=0.0, help="state size in GiB instead of the config's")
  p.add_argument("--workdir", default="", help="where to save (default: a temporary local directory)")
  args = p.parse_args(argv)
  if args.gib > 0:
    num_floats = int(args.gib * 2**30 / 4)
  else:
    num_floats = 4 * gpt.num_parameters(config_lib.load_file(args.config).model)
  gib = num_floats * 4 / 2**30
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    state = make_state(num_floats)
    jax.block_until_ready(state)
    mngr = checkpoint.manager(workdir, keep=1)
    started = time.perf_counter()
    mngr.save(1, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardSave(state),
                                                     meta=checkpoint.ocp.args.JsonSave({"step": 1})))
    mngr.wait_until_finished()
    save_s = time.perf_counter() - started
    step_dir = epath.Path(mngr.directory) / "1"
    started = time.perf_counter()
    record = integrity.write_record(step_dir)
    record_s = time.perf_counter() - started
    started = time.perf_counter()
    assert integrity.verify(step_dir) is None
    verify_s = time.perf_counter() - started
    on_disk = sum(size for size, _ in record["files"].values()) / 2**30
    mngr.close()
  print(f"state {gib:.3f} GiB ({on_disk:.3f} GiB on disk, {len(record['files'])} files) in {workdir or 'tmp'}")
  print(f"{'':14}{'seconds':>10}{'s/GiB':>10}")
  for name, seconds in (("orbax save", save_s), ("write_record", record_s), ("verify", verify_s)):
    print(f"{name:14}{seconds:10.3f}{seconds / on_disk:10.3f}")


if __name__ == "__main__":
  main()
