"""Does NPP pay off, and when? NPP schedules against next-token prediction at matched images and matched FLOPs.

  python -m npp_jax.study --config configs/study_fashion.py --workdir runs/study [--config.study.quick=True]

The config is a trainer config (what every arm starts from) plus a `study` section: the arms (each a partial config
merged over the base, e.g. its own npp.stages or learning rate), the seeds, the budgets (counted in steps of the
baseline arm, or with `study.budget_unit='epochs'` in passes over the training set, which `data.subset_per_class` can
make a small class-balanced subset) and how each budget is matched: `images` (every arm sees as many images as the
baseline; NPP then costs less) or `flops` (every arm gets the baseline's training FLOPs; NPP then sees more images).
Each (arm, steps, seed) is an ordinary trainer workdir, WORKDIR/runs/ARM-STEPSsteps-seedSEED, so the study resumes after
an interruption, never retrains a finished run, and any run can be sampled or evaluated on its own.

Every finished run is judged the same way: `study.num_samples` samples (labels cycling over the classes, the same
sampling key for every run) at `sample.cfg_scale` and at each scale of `study.cfg_sweep`, scored by the shipped
Fashion-MNIST classifier (Frechet distance in its feature space and label agreement, each with its standard error
from `study.bootstrap` resamplings of the images). A run's scores are cached in its workdir (study_eval.json).
With `eval.heldout_every` and `data.heldout_split` (e.g. the test images), every run also logs its next-token loss
on held-out codes (WORKDIR/codes_<split>, prepared once) about `study.heldout_points` times, so the report shows
whether each run has converged. WORKDIR/results.json holds every figure; WORKDIR/report.md and its plots are made
from it alone (`study_report`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging

from npp_jax import cli
from npp_jax import config_schema
from npp_jax import config as config_lib
from npp_jax import errors
from npp_jax import fileio
from npp_jax import npp
from npp_jax.checkpoints import checkpoint
from npp_jax.checkpoints import integrity
from npp_jax.checkpoints import workdir_lock
from npp_jax.data import pipeline
from npp_jax.data import prepare
from npp_jax.eval import fashion
from npp_jax.eval import study_report
from npp_jax.model_files import store
from npp_jax.models import gpt
from npp_jax.models import vq as vq_lib
from npp_jax.sampling import decoding
from npp_jax.sampling import generation
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import workdir as workdir_lib

MATCHES = ("images", "flops")
BUDGET_UNITS = ("steps", "epochs")
RESULTS_FILE = "results.json"
EVAL_FILE = "study_eval.json"
# Sections of a run's config that decide what it trains; a finished run is reused only if they are unchanged. The
# data section counts except where the codes are and how fast they are read.
RUN_IDENTITY = ("seed", "model", "npp", "optim", "train", "data")
NOT_IDENTITY = ("codes_dir", "heldout_codes_dir", "heldout_split", "heldout_images", "dir", "read_threads",
                "worker_count", "prefetch")


@dataclasses.dataclass(frozen=True)
class Run:
  """One trainer workdir of the study; `points` are the (budget, match) pairs it stands for."""

  arm: str
  seed: int
  steps: int
  points: tuple[tuple[float, str], ...]

  @property
  def name(self) -> str:
    return f"{self.arm}-{self.steps}steps-seed{self.seed}"


# ----------------------------------------------------------------------------------------------------------------------
# The plan: arm configs and the runs that cover every (arm, budget, match, seed).


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of the study config, with `study.quick_overrides` applied when `study.quick` is set."""
  config = ml_collections.ConfigDict(config.to_dict())
  if "study" not in config:
    raise errors.InvalidInput("the config has no `study` section (see configs/study_fashion.py)")
  if config.study.quick:
    _merge(config, config.study.quick_overrides, "study.quick_overrides")
  return config


def _merge(target: ml_collections.ConfigDict, overrides: Any, where: str) -> None:
  """Recursively sets `overrides` into `target`; a key the target lacks is an error (a typo would be silent)."""
  for key, value in overrides.items():
    if key not in target:
      raise errors.InvalidInput(f"{where}.{key} names no field of the trainer config")
    if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(target[key], ml_collections.ConfigDict):
      _merge(target[key], value, f"{where}.{key}")
    else:
      target[key] = copy.deepcopy(value)


def arm_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The trainer config of each arm: the base (everything but `study`) with the arm's overrides merged in."""
  base = ml_collections.ConfigDict(config.to_dict())
  del base["study"]
  arms = {}
  for name, overrides in config.study.arms.items():
    if not name.replace("_", "").isalnum():
      raise errors.InvalidInput(f"study arm name {name!r} must be letters, digits and underscores (it names "
                                "directories)")
    arm = copy.deepcopy(base)
    _merge(arm, overrides, f"study.arms.{name}")
    try:
      config_schema.check(arm, config_schema.TRAINER)
    except errors.InvalidInput as e:
      raise errors.InvalidInput(f"study.arms.{name}: {e}") from None
    npp.make_stages(arm.npp.stages, 1000, gpt.grid_side(arm.model))  # a bad schedule fails here, not mid-study
    arms[name] = arm
  if config.study.baseline not in arms:
    raise errors.InvalidInput(f"study.baseline={config.study.baseline!r} is not one of the arms ({', '.join(arms)})")
  return arms


def training_flops(config: ml_collections.ConfigDict, steps: int) -> float:
  """Training FLOPs of `steps` steps of the config's schedule (MaxText's count, as the trainer's MFU)."""
  grid = gpt.grid_side(config.model)
  per_sequence = lambda side: metrics_lib.train_flops_per_sequence(config.model, npp.coarse_grid(grid, side) ** 2)
  return float(sum(stage.steps * config.train.global_batch_size * per_sequence(stage.patch_side)
                   for stage in npp.make_stages(config.npp.stages, steps, grid)))


def matched_steps(arm: ml_collections.ConfigDict, baseline: ml_collections.ConfigDict, budget: int,
                  match: str) -> int:
  """The arm's step count that matches `budget` steps of the baseline in images or in training FLOPs."""
  if match == "images":
    images_seen = budget * baseline.train.global_batch_size
    return max(1, round(images_seen / arm.train.global_batch_size))
  if match == "flops":
    target = training_flops(baseline, budget)
    # FLOPs grow linearly with the steps up to the rounding of stage boundaries: estimate, then take the closest.
    estimate = max(1, round(target * 1000 / training_flops(arm, 1000)))
    candidates = range(max(1, estimate - 2), estimate + 3)
    return min(candidates, key=lambda s: (abs(training_flops(arm, s) - target), s))
  raise errors.InvalidInput(f"study.match entries must be one of {MATCHES}, got {match!r}")


def baseline_steps(config: ml_collections.ConfigDict, budget: float, train_images: int | None) -> int:
  """A budget in the baseline's steps: as given, or `budget` passes over the `train_images` training images."""
  if config.study.get("budget_unit", "steps") == "steps":
    return int(budget)
  if not train_images:
    raise ValueError("budgets in epochs need the number of training images")
  return max(1, round(budget * train_images / config.train.global_batch_size))


def check(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The arm configs, once the study section has been checked (before the study writes anything)."""
  study = config.study
  if not study.budgets or any(float(b) <= 0 for b in study.budgets):
    raise errors.InvalidInput(f"study.budgets must be positive, got {tuple(study.budgets)}")
  if study.get("budget_unit", "steps") not in BUDGET_UNITS:
    raise errors.InvalidInput(f"study.budget_unit must be one of {BUDGET_UNITS}, got {study.budget_unit!r}")
  if not study.seeds:
    raise errors.InvalidInput("study.seeds is empty")
  if not study.match:
    raise errors.InvalidInput(f"study.match is empty: give some of {MATCHES}")
  arms = arm_configs(config)
  unknown = [name for name in study.get("also_against", ()) if name not in arms]
  if unknown:
    raise errors.InvalidInput(f"study.also_against names {', '.join(map(repr, unknown))}, not one of the arms "
                              f"({', '.join(arms)})")
  return arms


def plan(config: ml_collections.ConfigDict, train_images: int | None = None
         ) -> tuple[dict[str, ml_collections.ConfigDict], list[Run]]:
  """(arm configs, runs). Runs that coincide (the baseline under both matches) are trained once. A run's points
  name its budgets as given (steps or epochs)."""
  study = config.study
  arms = check(config)
  baseline = arms[study.baseline]
  points: dict[tuple[str, int, int], list[tuple[float, str]]] = {}
  for budget in study.budgets:
    base_steps = baseline_steps(config, budget, train_images)
    for match in study.match:
      for name, arm in arms.items():
        steps = matched_steps(arm, baseline, base_steps, match)
        for seed in study.seeds:
          points.setdefault((name, int(seed), steps), []).append((budget, match))
  runs = [Run(name, seed, steps, tuple(p)) for (name, seed, steps), p in points.items()]
  return arms, runs


def run_config(arm: ml_collections.ConfigDict, run: Run, codes_dir: str, heldout_dir: str = "",
               heldout_points: int = 0) -> ml_collections.ConfigDict:
  """The trainer config of one run: the arm's, with the run's seed and steps, on the study's shared codes; with
  held-out codes, the held-out loss about `heldout_points` times (and at the end)."""
  config = copy.deepcopy(arm)
  config.seed = run.seed
  config.train.total_steps = run.steps
  config.data.codes_dir = codes_dir
  config.data.heldout_codes_dir = heldout_dir
  config.eval.heldout_every = -(-run.steps // heldout_points) if heldout_dir and heldout_points else 0
  # The study judges every run itself (study_eval.json); the trainer only leaves the final sample grid.
  config.eval.update(every=0, classifier="", inception="")
  return config


# ----------------------------------------------------------------------------------------------------------------------
# Training and judging one run.


def _check_same_run(run_dir: str, config: ml_collections.ConfigDict) -> None:
  path = pathlib.Path(run_dir, checkpoint.CONFIG_FILE)
  if not path.exists():
    return
  stored = json.loads(path.read_text())
  changed = config_lib.differences(stored, json.loads(config.to_json_best_effort()), RUN_IDENTITY,
                                   ignore=NOT_IDENTITY)
  if changed:
    raise errors.InvalidInput(f"{run_dir} was trained with other settings ({', '.join(changed)} differ from the study "
                              "config); use a new study workdir or remove that run")


def train_run(config: ml_collections.ConfigDict, run_dir: str, log: Callable[[str], None]) -> bool:
  """Trains (or resumes) the run unless it is finished; True if it trained."""
  _check_same_run(run_dir, config)
  if os.path.exists(os.path.join(run_dir, workdir_lib.DONE_FILE)):
    return False
  log(f"training {os.path.basename(run_dir)}")
  gpt_trainer.run(config, run_dir)
  return True


def logged_history(run_dir: str, key: str = "loss") -> list[dict]:
  """The trainer's metrics.jsonl rows holding `key` (the training rows, or e.g. heldout_loss), one per step; after a
  resume the last execution of a step wins."""
  rows: dict[int, dict] = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]


def training_seconds(history: list[dict]) -> float:
  """Wall-clock of the training loop (compilation and checkpoint saves included; the final sampling not): each
  logged row covers the steps since the previous one at its steps_per_s."""
  seconds, previous = 0.0, 0
  for row in history:
    seconds += (row["step"] - previous) / row["steps_per_s"]
    previous = row["step"]
  return seconds


def _checkpoint_id(run_dir: str, step: int) -> str:
  """The sha256 of the final step's integrity record (the CRC32 of every file): a retrained model gets new scores."""
  record = pathlib.Path(run_dir, checkpoint.CHECKPOINT_DIR, str(step), integrity.record_name(0))
  return fileio.file_sha256(record) if record.exists() else ""


class Judge:
  """Samples a run's final model and scores the samples with the shipped classifier, the same way for every run."""

  def __init__(self, config: ml_collections.ConfigDict):
    study = config.study
    self.scales = tuple(dict.fromkeys([float(config.sample.cfg_scale), *map(float, study.cfg_sweep)]))
    self.settings = {"num_samples": int(study.num_samples), "seed": int(study.eval_seed),
                     "cfg_scales": list(self.scales),
                     "temperature": float(config.sample.temperature), "top_k": int(config.sample.top_k),
                     "top_p": float(config.sample.top_p), "classifier": "fashion",
                     "bootstrap": int(study.bootstrap)}
    self._sample_cfg = config.sample
    for scale in self.scales:
      self._sampling(scale).validate(config.model.vocab_size)
    self._batch = int(config.eval.batch_size)
    self._evaluator = fashion.Evaluator()
    self._decode = vq_lib.make_decode_fn(store.load_vq(config.vq))

  def _sampling(self, scale: float) -> decoding.SamplingSettings:
    return decoding.SamplingSettings.from_config(self._sample_cfg, cfg_scale=scale)

  def __call__(self, run_dir: str, steps: int) -> dict[str, dict[str, float]]:
    """{cfg scale (as text): {"fd", "agreement", "fd_se", "agreement_se"}} (the last two: the sampling noise of
    `num_samples` images), cached in RUN_DIR/study_eval.json for these settings and this checkpoint."""
    settings = {**self.settings, "step": steps, "checkpoint": _checkpoint_id(run_dir, steps)}
    cache = pathlib.Path(run_dir, EVAL_FILE)
    if cache.exists():
      cached = json.loads(cache.read_text())
      if cached.get("settings") == settings:
        return cached["scores"]
    model, model_config = store.load_model(run_dir)
    sampler = decoding.Sampler(model)
    n = settings["num_samples"]
    labels = np.arange(n) % model_config.model.num_classes
    key = jax.random.key(settings["seed"])
    scores = {}
    for scale in self.scales:
      samples = np.concatenate([batch for _, batch in generation.sample_images(
          sampler, self._decode, labels, key, self._sampling(scale), batch_size=self._batch)])
      result = self._evaluator(samples, labels, bootstrap=self.settings["bootstrap"])
      scores[str(scale)] = {k: float(result[k]) for k in ("fd", "agreement", "fd_se", "agreement_se")}
    fileio.write_text(cache, json.dumps({"settings": settings, "scores": scores}, indent=1))
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# The study.


def run_study(config: ml_collections.ConfigDict, workdir: str, *, command: str = "",
              log: Callable[[str], None] = logging.info) -> dict:
  """Trains and judges every run of the study (reusing finished ones), writes results.json, report.md and plots."""
  config = resolve(config)
  check(config)
  workdir = os.path.abspath(workdir)
  lock = workdir_lock.acquire(workdir, log)  # one study per workdir; each run takes its own lock too
  try:
    started = time.time()
    codes_dir = _prepare_codes(config, workdir, log)
    heldout_dir = _prepare_heldout_codes(config, workdir, log)
    train_images = training_set_size(config, codes_dir)
    arms, runs = plan(config, train_images)
    log(f"{train_images:,} training images; {len(runs)} runs: " + ", ".join(r.name for r in runs))
    judge = Judge(config)  # the base config: every arm is judged with the same settings
    records = []
    for i, run in enumerate(runs):
      run_dir = os.path.join(workdir, "runs", run.name)
      cfg = run_config(arms[run.arm], run, codes_dir, heldout_dir, int(config.study.get("heldout_points", 0)))
      trained = train_run(cfg, run_dir, log)
      scores = judge(run_dir, run.steps)
      records.append(_record(run, cfg, run_dir, scores, trained, train_images))
      log(f"[{i + 1}/{len(runs)}] {run.name}: " + ", ".join(
          f"cfg {scale}: fd={s['fd']:.4g} agreement={s['agreement']:.4f}" for scale, s in scores.items()))
    baseline_model = arms[config.study.baseline].model
    results = {
        "command": command,
        "study": config.study.to_dict(),
        "baseline": config.study.baseline,
        "budget_unit": config.study.get("budget_unit", "steps"),
        "train_images": train_images,
        "fixed_cfg_scale": float(config.sample.cfg_scale),
        "eval": judge.settings,
        "arms": {name: {"stages": [list(s) for s in arm.npp.stages],
                        "overrides": config.study.arms[name].to_dict()} for name, arm in arms.items()},
        "model": {"parameters": gpt.num_parameters(baseline_model), "grid": gpt.grid_side(baseline_model),
                  "vocab_size": baseline_model.vocab_size},
        "machine": {"cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "python": platform.python_version()},
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "study_seconds_this_invocation": time.time() - started,
        "runs": records,
    }
    fileio.write_text(os.path.join(workdir, RESULTS_FILE), json.dumps(results, indent=1))
    study_report.write(results, workdir)
    return results
  finally:
    lock.close()


def _prepare_codes(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None]) -> str:
  """One set of codes for every run: the base config's codes_dir, or WORKDIR/codes prepared once."""
  if config.data.codes_dir:
    return config.data.codes_dir
  return prepare.prepare_once(config, os.path.join(workdir, "codes"), log)


def _prepare_heldout_codes(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None]) -> str:
  """The held-out codes every run is scored on, prepared once for the whole study; "" when the study has none."""
  return prepare.heldout_codes_once(config, workdir, log) if config.eval.heldout_every else ""


def training_set_size(config: ml_collections.ConfigDict, codes_dir: str) -> int:
  """How many images an epoch of every run passes over (data.subset_per_class applied)."""
  spec = pipeline.InputSpec(config.model.vocab_size, gpt.grid_side(config.model), config.model.num_classes)
  return pipeline.TrainInput(config.data, spec, global_batch=1, seed=0, codes_dir=codes_dir).num_images


def _record(run: Run, config: ml_collections.ConfigDict, run_dir: str, scores: dict, trained: bool,
            train_images: int) -> dict:
  history = logged_history(run_dir)
  grid = gpt.grid_side(config.model)
  return {
      "name": run.name, "arm": run.arm, "seed": run.seed, "steps": run.steps,
      "points": [list(p) for p in run.points],
      "batch_size": int(config.train.global_batch_size),
      "images": run.steps * int(config.train.global_batch_size),
      "epochs": run.steps * int(config.train.global_batch_size) / train_images,
      "flops": training_flops(config, run.steps),
      "seconds": training_seconds(history),
      "trained_now": trained,
      "stages": [{"patch_side": s.patch_side, "start": s.start, "end": s.end}
                 for s in npp.make_stages(config.npp.stages, run.steps, grid)],
      "loss": [[row["step"], row["loss"]] for row in history],
      "heldout_loss": [[row["step"], row["heldout_loss"]] for row in logged_history(run_dir, "heldout_loss")],
      "scores": scores,
  }


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Study config file (configs/study_fashion.py).", config_schema.STUDY)
  flags.DEFINE_string("workdir", None, "The study's directory: runs/, results.json, report.md and plots.",
                      flag_values=fv)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  command = " ".join(["python -m npp_jax.study", *map(shlex.quote, argv[1:])])  # the report's first line

  def run_from_flags(fv: flags.FlagValues) -> str:
    run_study(fv.config, fv.workdir, command=command)
    return f"wrote {os.path.join(os.path.abspath(fv.workdir), study_report.REPORT_FILE)}"

  return cli.main(run_from_flags, define_flags, argv, doc=__doc__, required=("config", "workdir"))


if __name__ == "__main__":
  sys.exit(main())
