"""Bad-input replay (not a test; the sibling of reliability.py): every case a new user could type that must be
refused, and the edge values that must still work. Each case is one command line run as a new process.

  python bench/bad_inputs.py              # every case (a few minutes on 2 cores)
  python bench/bad_inputs.py --only init  # the cases whose name holds 'init'
  python bench/bad_inputs.py --list       # the cases, without running them

A refusal must end with exit status 1, one `error:` line (the last line; log lines may come before it) holding the
case's fragments, no traceback on stderr, and every file under the case's directory unchanged (paths, sizes and
modification times, before and after). A success must exit 0 and leave what its check looks for.

Command lines may name {work} (a fresh path under the case's directory, not created), {model} (a tiny trained model
directory, made by the first success case), {file} (a config file of the case) and {root} (the case's directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny.py"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
MISSPELT = f"import runpy\ndef get_config():\n  c = runpy.run_path({str(REPO / TINY)!r})['get_config']()\n" \
           "  c.train.log_evry = 5\n  return c\n"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  argv: tuple[str, ...]  # python -m ARGV...
  fragments: tuple[str, ...] = ()  # a refusal: what its error line must hold
  succeeds: Callable[[pathlib.Path], bool] | None = None  # a success: its check of the case's directory
  file: str = ""  # the text of {file}


def refused(name: str, *argv_and_fragments: str | tuple[str, ...]) -> Case:
  argv, fragments = argv_and_fragments[:-1], argv_and_fragments[-1]
  return Case(name, tuple(argv), fragments if isinstance(fragments, tuple) else (fragments,))


def trainer(*overrides: str) -> tuple[str, ...]:
  return ("npp_jax.main", "--config", TINY, "--workdir", "{work}", *overrides)


def steps_kept(n: int) -> Callable[[pathlib.Path], bool]:
  def check(root):
    steps = [p for p in (root / "work" / "checkpoints").iterdir() if p.name.isdigit()]
    return (root / "work" / "DONE").exists() and len(steps) == n
  return check


CASES = [
    # -- the audit's cases: values inside a config ---------------------------------------------------------------
    refused("keep_checkpoints=0 would delete every checkpoint", *trainer("--config.train.keep_checkpoints=0"),
            ("train.keep_checkpoints=0", "delete every checkpoint")),
    refused("keep_checkpoints=-1", *trainer("--config.train.keep_checkpoints=-1"), "train.keep_checkpoints=-1"),
    refused("log_every=0", *trainer("--config.train.log_every=0"), ("train.log_every=0", "integer >= 1")),
    refused("checkpoint_every=0", *trainer("--config.train.checkpoint_every=0"), "train.checkpoint_every=0"),
    refused("global_batch_size=0", *trainer("--config.train.global_batch_size=0"), "train.global_batch_size=0"),
    refused("tokenizer batch_size=0", "npp_jax.train_tokenizer", "--config", "configs/vq_fashion.py", "--workdir",
            "{work}", "--config.train.batch_size=0", "train.batch_size=0"),
    refused("tokenizer log_every=0", "npp_jax.train_tokenizer", "--config", "configs/vq_fashion.py", "--workdir",
            "{work}", "--config.train.log_every=0", "train.log_every=0"),
    refused("remat=bogus", *trainer("--config.model.remat=bogus"), ("model.remat='bogus'", "'none', 'full', 'dots'")),
    refused("mesh.shape=abc", *trainer("--config.mesh.shape=abc"), ("mesh.shape=('abc',)", "3 integer sizes")),
    refused("init_from of other sizes", *trainer("--config.init_from={model}", "--config.model.dim=32"),
            ("does not fit the config", "has shape", "set model.dim=64")),
    refused("sample with a config of other sizes", "npp_jax.sample", "--checkpoint", "{model}", "--vq",
            "{model}/config.json", "--config", TINY, "--config.model.n_layer=3", "--num_images", "2", "--out",
            "{work}", ("does not fit the config", "has shape", "set model.n_layer=2")),
    # -- more values of the same kinds -----------------------------------------------------------------------------
    refused("log_every=abc", *trainer("--config.train.log_every=abc"), ("train.log_every='abc'", "integer")),
    refused("lr=-1", *trainer("--config.optim.lr=-1"), ("optim.lr=-1.0", "> 0")),
    refused("patch side 3 on an 8x8 grid", *trainer("--config.npp.stages=((3,1.0),)"), "patch side 3 does not divide"),
    refused("stage fractions that sum to 1.2", *trainer("--config.npp.stages=((2,0.7),(1,0.5))"), "must sum to 1"),
    refused("no stages", *trainer("--config.npp.stages=()"), "npp.stages=()"),
    refused("block_size not square", *trainer("--config.model.block_size=60"), "model.block_size=60"),
    refused("n_head does not divide dim", *trainer("--config.model.n_head=5"), "model.n_head=5"),
    refused("grad_accum_steps does not divide the batch", *trainer("--config.train.grad_accum_steps=3"),
            "train.grad_accum_steps=3"),
    refused("batch over 3 data shards", *trainer("--config.mesh.shape=(3,1,1)"), "does not split over the 3 devices"),
    refused("mesh of 2 devices on 1", *trainer("--config.mesh.shape=(1,1,2)"), "needs 2 devices"),
    refused("two -1 in mesh.shape", *trainer("--config.mesh.shape=(-1,-1,1)"), "mesh.shape=(-1, -1, 1)"),
    refused("stage_lr_scales of another length", *trainer("--config.optim.stage_lr_scales=(1.0,)"),
            "optim.stage_lr_scales=(1.0,)"),
    refused("top_p=0", *trainer("--config.sample.top_p=0"), "sample.top_p=0.0"),
    refused("cfg_scale=0.5", *trainer("--config.sample.cfg_scale=0.5"), "sample.cfg_scale=0.5"),
    refused("data.kind=bogus", *trainer("--config.data.kind=bogus"), "data.kind='bogus'"),
    refused("eval.classifier=bogus", *trainer("--config.eval.classifier=bogus"), "eval.classifier='bogus'"),
    refused("dropout 1.5", *trainer("--config.model.resid_dropout_p=1.5"), "model.resid_dropout_p=1.5"),
    refused("scan_layers=maybe", *trainer("--config.model.scan_layers=maybe"), "model.scan_layers='maybe'"),
    refused("tokenizer of another vocabulary", *trainer("--config.vq.checkpoint=x", "--config.vq.codebook_size=32"),
            "differs from vq.codebook_size=32"),
    refused("a reference batch that does not exist", *trainer("--config.eval.reference={root}/ref.npz"),
            "eval.reference='/"),
    refused("init_from that does not exist", *trainer("--config.init_from={root}/nothing"), "init_from='/"),
    refused("an unknown field", *trainer("--config.train.nope=1"), "train.nope is not a field of the trainer config"),
    Case("a misspelt field in a config file", ("npp_jax.main", "--config", "{file}", "--workdir", "{work}"),
         ("train.log_evry is not a field", "did you mean train.log_every?"), file=MISSPELT),
    refused("classifier steps=0", "npp_jax.train_classifier", "--config", "configs/fashion_classifier.py", "--out",
            "{work}", "--config.steps=0", "steps=0"),
    refused("prepare augmentation=bogus", "npp_jax.prepare", "--config", "configs/prepare_imagenet.py", "--out",
            "{work}", "--config.data.augmentation=bogus", "data.augmentation='bogus'"),
    refused("study budgets=(0,)", "npp_jax.study", "--config", "configs/study_fashion.py", "--workdir", "{work}",
            "--config.study.budgets=(0,)", "study.budgets=(0,)"),
    refused("study keep_checkpoints=0", "npp_jax.study", "--config", "configs/study_fashion.py", "--workdir", "{work}",
            "--config.train.keep_checkpoints=0", "train.keep_checkpoints=0"),
    # -- the entry points' own flags -------------------------------------------------------------------------------
    refused("coordinator without a process count", *trainer("--coordinator=localhost:1234"),
            "--coordinator, --num_processes and --process_id go together"),
    refused("process_id past the count", *trainer("--coordinator=localhost:1234", "--num_processes=2",
                                                  "--process_id=2"), "--process_id below --num_processes"),
    refused("num_processes=0", *trainer("--num_processes=0"), "--num_processes=0"),
    refused("prepare process_index past the count", "npp_jax.prepare", "--config", "configs/prepare_imagenet.py",
            "--out", "{work}", "--process_index=3", "--process_count=2",
            "--process_index=3 and --process_count=2 must be given together"),
    refused("sample num_images=0", "npp_jax.sample", "--checkpoint", "{model}", "--vq", "{model}/config.json",
            "--num_images=0", "--out", "{work}", "--num_images=0"),
    refused("sample batch_size=0", "npp_jax.sample", "--checkpoint", "{model}", "--vq", "{model}/config.json",
            "--num_images=2", "--batch_size=0", "--out", "{work}", "--batch_size=0"),
    refused("sample seed=-1", "npp_jax.sample", "--checkpoint", "{model}", "--vq", "{model}/config.json",
            "--num_images=2", "--seed=-1", "--out", "{work}", "--seed=-1"),
    refused("sample top_p=2", "npp_jax.sample", "--checkpoint", "{model}", "--vq", "{model}/config.json",
            "--num_images=2", "--top_p=2", "--out", "{work}", "top_p must be in (0, 1]"),
    refused("demo port=70000", "npp_jax.demo", "--checkpoint", "{model}", "--vq", "{model}/config.json",
            "--port=70000", "--port=70000"),
    refused("demo max_images=0", "npp_jax.demo", "--checkpoint", "{model}", "--vq", "{model}/config.json",
            "--max_images=0", "--max_images=0"),
    refused("evaluate batch_size=0", "npp_jax.evaluate", "--samples", "{root}/s.npz", "--ref", "{root}/r.npz",
            "--inception", "{root}/i.pth", "--batch_size=0", "--batch_size=0"),
    # -- edge values that must work ----------------------------------------------------------------------------------
    Case("keep_checkpoints=1, log_every=1, checkpoint_every=1 (makes {model})",
         trainer("--config.train.total_steps=4", "--config.train.keep_checkpoints=1", "--config.train.log_every=1",
                 "--config.train.checkpoint_every=1"), succeeds=steps_kept(1)),
    Case("init_from of the same sizes", trainer("--config.init_from={model}", "--config.train.total_steps=2",
                                                "--config.train.checkpoint_every=2"), succeeds=steps_kept(1)),
    Case("grad_accum_steps=2 over mesh.shape=(1,1,1)",
         trainer("--config.train.grad_accum_steps=2", "--config.mesh.shape=(1,1,1)", "--config.train.total_steps=2",
                 "--config.train.checkpoint_every=2"), succeeds=steps_kept(1)),
]


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every path under root with its size and modification time (a directory's changes when an entry is added)."""
  return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
          for p in root.rglob("*")}


def run_case(case: Case, root: pathlib.Path, model: pathlib.Path) -> tuple[bool, str]:
  root.mkdir(parents=True)
  (root / "file.py").write_text(case.file)
  names = {"work": str(root / "work"), "model": str(model), "file": str(root / "file.py"), "root": str(root)}
  argv = [a.format(**names) for a in case.argv]
  before = snapshot(root) if case.succeeds is None else {}
  before_model = snapshot(model) if model.exists() else {}
  result = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900, check=False)
  lines = result.stderr.strip().splitlines()
  last = lines[-1] if lines else "(no output)"
  if case.succeeds is not None:
    ok = result.returncode == 0 and case.succeeds(root)
    return ok, "succeeded as it should" if ok else f"FAILED: exit {result.returncode}: {last[:200]}"
  errors = [line for line in lines if line.startswith("error: ")]
  problems = []
  if result.returncode != 1:
    problems.append(f"exit {result.returncode}")
  if "Traceback" in result.stderr:
    problems.append("a traceback")
  if len(errors) != 1 or last != errors[0]:
    problems.append(f"{len(errors)} error lines, last line {last[:120]!r}")
  missing = [f for f in case.fragments if f not in last]
  if missing:
    problems.append(f"no {missing}")
  changed = sorted(set(before.items()) ^ set(snapshot(root).items()))
  if changed:
    problems.append(f"disk changed: {sorted({c[0] for c in changed})[:4]}")
  if model.exists() and snapshot(model) != before_model:
    problems.append("the model directory changed")
  return not problems, (last[:150] if not problems else "FAILED: " + "; ".join(problems) + f" ({last[:150]})")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="run the cases whose name holds this")
  p.add_argument("--list", action="store_true", help="print the cases and exit")
  p.add_argument("--keep", action="store_true", help="keep the case directories (printed)")
  args = p.parse_args(argv)
  if args.list:
    for case in CASES:
      kind = "succeeds" if case.succeeds else "refused: " + " | ".join(case.fragments)
      print(f"{case.name}: python -m {' '.join(case.argv)}  -> {kind}")
    return 0
  root = pathlib.Path(tempfile.mkdtemp(prefix="npp-bad-inputs-"))
  # The first success trains the tiny model the other cases read; it runs first whatever --only says.
  maker = next(c for c in CASES if "(makes {model})" in c.name)
  model = root / "made" / "work"
  chosen = [c for c in CASES if args.only in c.name and c is not maker]
  rows = []
  try:
    for case in [maker, *chosen]:
      started = time.time()
      ok, got = run_case(case, root / ("made" if case is maker else f"case{len(rows)}"), model)
      rows.append((case, ok, got))
      print(f"{'ok ' if ok else 'BAD'} {case.name}: {got} ({time.time() - started:.0f} s)", flush=True)
      if case is maker and not ok:
        break
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  refusals = [r for r in rows if r[0].succeeds is None]
  successes = [r for r in rows if r[0].succeeds is not None]
  print(f"\n{len(rows)} cases: {sum(r[1] for r in refusals)}/{len(refusals)} clear refusals with nothing changed on "
        f"disk, {sum(r[1] for r in successes)}/{len(successes)} correct successes"
        + (f"; case directories in {root}" if args.keep else ""))
  for case, ok, got in rows:
    if not ok:
      print(f"  left: {case.name}: {got}")
  return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
