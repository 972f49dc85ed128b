"""npp-jax against the original PyTorch code, side by side on this machine: sampling, train steps, peak memory,
torch.compile, and the NPP/NTP wall-clock ratio of whole schedules.

  python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy einops
  python bench/vs_reference.py --torch_python /tmp/torch/bin/python \
      --npp_repo CHECKOUT_OF_Next-Patch-Prediction [--llamagen_repo CHECKOUT_OF_LlamaGen] [--rounds 2] \
      [--only sample_tiny,train_tiny_k1,...]

Every measurement runs in a fresh process (ours: this interpreter; the reference: --torch_python over the checkouts,
through bench/vs_reference_torch.py), the two sides interleaved round by round so that both see the same machine.
The same shapes and random weights on both sides, at each precision of --precisions: float32, and bfloat16 as each
side's users run it (ours: model.dtype / the sampler's dtype bfloat16, products accumulating in float32, the
sampler's through its packed kernel where the CPU has AVX-512 BF16, as it chooses by default; the reference:
torch.autocast for training, eager and under torch.compile, and the model cast to bfloat16 for sampling). The
table gives every cell, float32 against float32 (the reference's faster of eager and compiled), and each side's
best (fastest of its precisions, eager or compiled) against the other's; above it, both sides' measured
matrix-product rates at both precisions, so a reader sees how close each side is to the machine. While a
measurement runs, the CPU time of everything else on the machine is read from /proc/stat: a run during which other
processes used more than --max_other_cores cores is discarded and repeated (up to --max_tries), since the machine's
speed drifts between hours and neighbours. Reported
figures are medians over the accepted rounds; "speed" is reference seconds / our seconds (above 1: we are faster).
Compilation and warm-up are excluded on both sides (torch.compile's too). Each side runs in the environment its
users get: ours under glibc.malloc.hugetlb=1, which every program of this package sets for itself
(npp_jax/huge_pages.py), the reference without it (--reference_huge_pages gives it the same).

Widths: tiny = 4 layers, 4 heads, dim 256, vocab 512, 8x8 codes, 10 classes; GPT-B width = 12 x 768, 12 heads,
vocab 16384, 16x16 codes, 1000 classes. Our side runs the trainer's compiled step with unrolled layers
(model.scan_layers=False, the CPU choice of configs/fashion.py; --ours_scan_layers to change) and the Sampler.
Not a test: it prints a table.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from npp_jax import cli
from npp_jax import config as config_lib
from npp_jax import errors
from npp_jax import huge_pages
from npp_jax import sharding
from npp_jax.kernels import library
from npp_jax.kernels import packed_matmul
from npp_jax.models import gpt
from npp_jax.sampling import decoding
from npp_jax.trainers import gpt_trainer

WIDTHS = {
    "tiny": dict(dim=256, n_layer=4, n_head=4, vocab_size=512, block_size=64, num_classes=10),
    "b": dict(dim=768, n_layer=12, n_head=12, vocab_size=16384, block_size=256, num_classes=1000),
}

# name -> (what is measured, spec). Specs are shared by both sides; "unit" is what one second figure refers to.
MEASUREMENTS = {
    "sample_tiny": ("sampling, tiny, batch 16, CFG 2.0 (s/batch)",
                    dict(kind="sample", width="tiny", batch=16, cfg_scale=2.0, repeats=3)),
    "sample_b": ("sampling, GPT-B width, batch 16, CFG 2.0 (s/batch)",
                 dict(kind="sample", width="b", batch=16, cfg_scale=2.0, repeats=1)),
    "train_tiny_k1": ("train step, tiny, batch 64, next-token (s/step)",
                      dict(kind="train", width="tiny", batch=64, patch_side=1, warmup=2, steps=10)),
    "train_tiny_k2": ("train step, tiny, batch 64, 2x2 patches (s/step)",
                      dict(kind="train", width="tiny", batch=64, patch_side=2, warmup=2, steps=20)),
    "train_tiny_k4": ("train step, tiny, batch 64, 4x4 patches (s/step)",
                      dict(kind="train", width="tiny", batch=64, patch_side=4, warmup=2, steps=40)),
    "train_b_k1": ("train step, GPT-B width, batch 2, next-token (s/step)",
                   dict(kind="train", width="b", batch=2, patch_side=1, warmup=2, steps=5)),
    "train_b_k2": ("train step, GPT-B width, batch 8, 2x2 patches (s/step)",
                   dict(kind="train", width="b", batch=8, patch_side=2, warmup=2, steps=5)),
    "compiled_tiny_k1": ("train step, tiny, batch 64, next-token; reference under torch.compile (s/step)",
                         dict(kind="train", width="tiny", batch=64, patch_side=1, warmup=3, steps=10, compiled=True)),
    "compiled_b_k1": ("train step, GPT-B width, batch 2, next-token; reference under torch.compile (s/step)",
                      dict(kind="train", width="b", batch=2, patch_side=1, warmup=3, steps=5, compiled=True)),
    # 3,200 images at batch 64 = 50 steps; (patch side, steps) per stage.
    "schedule_ntp": ("tiny, 3,200 images, next-token (s)",
                     dict(kind="schedule", width="tiny", batch=64, schedule=[(1, 50)])),
    "schedule_2stage": ("tiny, 3,200 images, 2x2 then 1x1 (s)",
                        dict(kind="schedule", width="tiny", batch=64, schedule=[(2, 25), (1, 25)])),
    "schedule_3stage": ("tiny, 3,200 images, 4x4, 2x2, 1x1 (s)",
                        dict(kind="schedule", width="tiny", batch=64, schedule=[(4, 12), (2, 13), (1, 25)])),
}


# ----------------------------------------------------------------------------------------------------------------------
# Our side (runs in a child process: `vs_reference.py --worker SPEC`).


# (rows, inner, cols) of the matrix products whose rates are printed: the default run's QKV, a GPT-B FFN at batch 2,
# a GPT-B decode step with guidance, and a large square one.
GEMM_SHAPES = [[4096, 192, 576], [512, 768, 3072], [32, 768, 2304], [2048, 2048, 2048]]


def our_gemm_rates(shapes: list[list[int]], calls: int = 50) -> dict[str, dict[str, float]]:
  """GFLOP/s of (rows x inner) @ (inner x cols), jitted, in float32 and in bfloat16 accumulating in float32, and
  with the sampler's packed bfloat16 kernel where this CPU runs it."""
  rates = {}
  xla_dot = lambda a, b: jax.numpy.dot(a, b, preferred_element_type=jax.numpy.float32)
  kinds = [("float32", "float32", xla_dot, lambda b: b), ("bfloat16", "bfloat16", xla_dot, lambda b: b)]
  if library.unavailable_reason() is None:
    kinds.append(("bfloat16 packed", "bfloat16", packed_matmul.matmul, packed_matmul.pack))
  for name, dtype, multiply, prepare in kinds:
    for m, k, n in shapes:
      a, b = jax.numpy.ones((m, k), dtype), prepare(jax.numpy.ones((k, n), dtype))
      product = jax.jit(multiply)
      product(a, b).block_until_ready()
      start = time.perf_counter()
      for _ in range(calls):
        out = product(a, b)
      out.block_until_ready()
      rates.setdefault(name, {})[f"{m}x{k}x{n}"] = 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9
  return rates


def _our_config(spec: dict):
  config = config_lib.base_config()
  config.model.update(**WIDTHS[spec["width"]], dtype=spec["precision"], scan_layers=spec["scan_layers"])
  config.train.global_batch_size = spec["batch"]
  config.optim.lr, config.optim.warmup_steps = 1e-4, 0
  return config


def _our_train_steps(spec: dict, patch_sides: list[int]):
  """(compiled steps by patch side, state, batch) on one device."""
  config = _our_config(spec)
  config.npp.stages = tuple((k, 1.0 / len(patch_sides)) for k in patch_sides)
  config.train.total_steps = 100
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  setup = gpt_trainer.build(config, mesh, spec["batch"])
  state = gpt_trainer.fresh_state(setup)  # in the trainer's order: the state, then the steps
  steps = {s.patch_side: gpt_trainer.compile_train_step(setup, s.patch_side) for s in setup.stages}
  rng = np.random.default_rng(0)
  local = {"tokens": rng.integers(0, config.model.vocab_size, (spec["batch"], config.model.block_size), np.int32),
           "labels": rng.integers(0, config.model.num_classes, (spec["batch"],), np.int32)}
  return steps, state, sharding.global_batch(local, mesh)


def our_measurement(spec: dict) -> float:
  if spec["kind"] == "sample":
    model = gpt.GPT(_our_config(spec).model, rngs=nnx.Rngs(0))
    model.output[...] = np.random.default_rng(0).normal(0, 0.02, model.output.shape).astype(np.float32)
    sampler = decoding.Sampler(model, dtype=spec["precision"], devices=jax.devices()[:1])
    labels = np.arange(spec["batch"]) % model.cfg.num_classes
    settings = decoding.SamplingSettings(cfg_scale=spec["cfg_scale"])
    sampler(labels, jax.random.key(0), settings).block_until_ready()  # compile + warm-up
    start = time.perf_counter()
    for i in range(spec["repeats"]):
      sampler(labels, jax.random.key(i + 1), settings).block_until_ready()
    return (time.perf_counter() - start) / spec["repeats"]
  if spec["kind"] == "train":
    steps, state, batch = _our_train_steps(spec, [spec["patch_side"]])
    step = steps[spec["patch_side"]]
    for _ in range(spec["warmup"]):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / spec["steps"]
  if spec["kind"] == "schedule":
    sides = [k for k, n in spec["schedule"] for _ in range(n)]
    steps, state, batch = _our_train_steps(spec, sorted(set(sides)))
    for k in sorted(set(sides)):  # every program compiled and run once before the clock
      state, metrics = steps[k](state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for k in sides:
      state, metrics = steps[k](state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start
  raise ValueError(f"unknown measurement kind {spec['kind']!r}")


# ----------------------------------------------------------------------------------------------------------------------
# The driver.


def _busy_jiffies() -> int:
  """All CPU time spent on the machine (every core, user + system + irq), in clock ticks."""
  fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
  user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
  return user + nice + system + irq + softirq + steal


def run_once(command: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
  """Runs one measurement process (in `env`, default ours); returns (its JSON result, cores used meanwhile by other
  processes)."""
  tick = os.sysconf("SC_CLK_TCK")
  children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
  busy_before, start = _busy_jiffies(), time.monotonic()
  done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  elapsed, busy = time.monotonic() - start, _busy_jiffies() - busy_before
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  ours = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
  if done.returncode:
    raise SystemExit(f"measurement failed ({' '.join(command[:3])} ...):\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return result, max(0.0, busy / tick - ours) / elapsed


def measure(command: list[str], max_other: float, tries: int, env: dict[str, str] | None = None) -> dict | None:
  for _ in range(tries):
    result, other = run_once(command, env)
    if other <= max_other:
      return result
    print(f"    discarded: other processes used {other:.2f} cores", flush=True)
  return None


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("torch_python", None, "An interpreter with torch, numpy and einops.", flag_values=fv)
  flags.DEFINE_string("npp_repo", None, "A checkout of PKU-YuanGroup/Next-Patch-Prediction.", flag_values=fv)
  flags.DEFINE_string("llamagen_repo", None, "A checkout of FoundationVision/LlamaGen (its generate.py; default: "
                      "NPP's identical copy).", flag_values=fv)
  flags.DEFINE_integer("rounds", 2, "Accepted runs per side and measurement.", flag_values=fv)
  flags.DEFINE_list("only", sorted(MEASUREMENTS), "Measurements to run: " + ", ".join(sorted(MEASUREMENTS)),
                    flag_values=fv)
  flags.DEFINE_float("max_other_cores", 0.15, "Discard a run during which other processes used more cores.",
                     flag_values=fv)
  flags.DEFINE_integer("max_tries", 3, "Runs tried per accepted run.", flag_values=fv)
  flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Precisions to measure each side at.", flag_values=fv)
  flags.DEFINE_bool("reference_huge_pages", False, "Run the reference under glibc.malloc.hugetlb=1 as ours runs "
                    "(npp_jax/huge_pages.py); by default it runs as its users run it, without.", flag_values=fv)
  flags.DEFINE_bool("ours_scan_layers", False, "Our layers under lax.scan instead of unrolled.", flag_values=fv)
  flags.DEFINE_string("worker", None, "Internal: run one of our measurements (JSON spec) and print its result.",
                      flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  if fv.worker:  # a child: one of our measurements
    spec = json.loads(fv.worker)
    if spec["kind"] == "gemm":
      print(json.dumps({"gflops": our_gemm_rates(spec["shapes"])}))
      return
    seconds = our_measurement(spec)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return
  for name in ("torch_python", "npp_repo"):
    if not fv[name].value:
      raise errors.InvalidInput(f"--{name} is required")
  unknown = sorted(set(fv.only) - set(MEASUREMENTS))
  if unknown:
    raise errors.InvalidInput(f"unknown measurements {unknown}; choose from {sorted(MEASUREMENTS)}")
  bad = sorted(set(fv.precisions) - set(decoding.COMPUTE_DTYPES))
  if bad:
    raise errors.InvalidInput(f"unknown precisions {bad}; choose from {list(decoding.COMPUTE_DTYPES)}")
  here = pathlib.Path(__file__).resolve()
  reference_cmd = [fv.torch_python, str(here.with_name("vs_reference_torch.py")), "--npp_repo", fv.npp_repo]
  if fv.llamagen_repo:
    reference_cmd += ["--llamagen_repo", fv.llamagen_repo]
  ours_cmd = [sys.executable, str(here), "--worker"]
  reference_env = dict(os.environ) if fv.reference_huge_pages else huge_pages.without_added(os.environ)
  print(f"ours: jax {jax.__version__}, scan_layers={fv.ours_scan_layers}, GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', '')}; reference: {fv.torch_python}, GLIBC_TUNABLES="
        f"{reference_env.get('GLIBC_TUNABLES', '')}", flush=True)
  gemm = json.dumps({"kind": "gemm", "shapes": GEMM_SHAPES})
  print_gemm_rates({"reference": run_once(reference_cmd + ["--spec", gemm], reference_env)[0]["gflops"],
                    "ours": run_once(ours_cmd + [gemm])[0]["gflops"]})
  results = {}  # name -> (side, precision) -> accepted runs
  for name in fv.only:
    label, spec = MEASUREMENTS[name]
    print(f"{name}: {label}", flush=True)
    cells = results[name] = {}
    for r in range(fv.rounds):
      for precision in fv.precisions:
        for side in (("reference", "ours") if r % 2 == 0 else ("ours", "reference")):
          if side == "ours" and spec.get("compiled"):
            continue  # our compiled step is the plain train_* measurement
          side_spec = {**spec, "precision": precision}
          command = (reference_cmd + ["--spec", json.dumps({**side_spec, "model": WIDTHS[spec["width"]]})]
                     if side == "reference" else ours_cmd + [json.dumps({**side_spec,
                                                                          "scan_layers": fv.ours_scan_layers})])
          env = reference_env if side == "reference" else None
          result = measure(command, fv.max_other_cores, fv.max_tries, env)
          if result:
            cells.setdefault((side, precision), []).append(result)
            print(f"    {side} {precision}: {result['seconds']:.4f} s, peak RSS {result['peak_rss_mib']:,.0f} MiB",
                  flush=True)
  print_table(results, fv.precisions)


def print_gemm_rates(rates: dict) -> None:
  print("\nmatrix products on this machine, GFLOP/s (ours: bfloat16 operands accumulate in float32; \"packed\": the "
        "sampler's kernel, the weight packed once)")
  print("| rows x inner x cols | " + " | ".join(f"{side} {dtype}" for side in rates for dtype in rates[side]) + " |")
  print("|---" * (1 + sum(len(v) for v in rates.values())) + "|")
  for shape in rates["ours"]["float32"]:
    print(f"| {shape} | " + " | ".join(f"{rates[side][dtype][shape]:,.0f}" for side in rates for dtype in rates[side])
          + " |")
  print(flush=True)


def _median(runs: list[dict] | None, key: str = "seconds") -> float:
  return statistics.median(r[key] for r in runs) if runs else float("nan")


def print_table(results: dict, precisions: list[str]) -> None:
  """Every cell, float32 against float32, and best against best; 'speed' is reference seconds / ours."""
  columns = [f"reference {p}" for p in precisions] + [f"reference compiled {p}" for p in precisions] + [
      f"npp-jax {p}" for p in precisions]
  print("\n| measurement | " + " | ".join(columns) + " | f32 vs f32 | best vs best |")
  print("|---" * (len(columns) + 3) + "|")
  for name, cells in results.items():
    label, spec = MEASUREMENTS[name]
    if spec.get("compiled"):
      continue  # folded into its train_* row
    compiled = results.get(name.replace("train", "compiled"), {}) if name.startswith("train") else {}
    reference = {p: _median(cells.get(("reference", p))) for p in precisions}
    reference_compiled = {p: _median(compiled.get(("reference", p))) for p in precisions}
    ours = {p: _median(cells.get(("ours", p))) for p in precisions}
    row = [reference[p] for p in precisions] + [reference_compiled[p] for p in precisions] + [
        ours[p] for p in precisions]
    best = lambda values: min((v for v in values if v == v), default=float("nan"))  # NaN: not measured
    # The reference's float32 at its best: eager or compiled, whichever was faster.
    f32 = best([reference.get("float32", float("nan")), reference_compiled.get("float32", float("nan"))]
               ) / ours.get("float32", float("nan"))
    best_ratio = best(list(reference.values()) + list(reference_compiled.values())) / best(list(ours.values()))
    print(f"| {label} | " + " | ".join("—" if v != v else f"{v:.4f}" for v in row) +
          f" | {f32:.2f}x | {best_ratio:.2f}x |")
  for name in ("train_b_k1",):
    if name in results:
      for p in precisions:
        ref, ours = (_median(results[name].get((side, p)), "peak_rss_mib") for side in ("reference", "ours"))
        print(f"peak RSS, GPT-B width training, batch 2, {p}: reference {ref:,.0f} MiB, npp-jax {ours:,.0f} MiB "
              f"({ours / ref:.2f}x the memory)")
  if "schedule_ntp" in results:
    for side in ("reference", "ours"):
      for p in precisions:
        base = _median(results["schedule_ntp"].get((side, p)))
        ratios = [f"{name.split('_')[1]} {_median(results[name].get((side, p))) / base:.3f}"
                  for name in ("schedule_2stage", "schedule_3stage") if name in results]
        print(f"NPP/NTP wall-clock over 3,200 images, {side} {p}: " + ", ".join(ratios))


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages(this_program=True)
  sys.exit(main())
