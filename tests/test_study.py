"""The NPP-vs-NTP study (`python -m npp_jax.study`): budgets matched as configured, arms and seeds trained and judged,
an interrupted or partly deleted study resumed without retraining what is finished, and a report whose figures are
the ones the evaluation wrote."""

import json
import math
import os
import pathlib
import re
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from npp_jax import config as config_lib
from npp_jax import study
from npp_jax.data import prepare
from npp_jax.eval import study_report
from npp_jax.models import gpt
from npp_jax.trainers import gpt_trainer
from npp_jax.trainers import workdir as workdir_lib

from test_cli_errors import one_sentence
from test_default_pipeline import image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDY_CONFIG = str(REPO / "configs" / "study_fashion.py")


def load(**study_overrides):
  config = config_lib.load_file(STUDY_CONFIG)
  config.study.update(study_overrides)
  return config


def flops_by_hand(model, stages, steps, batch):
  """Training FLOPs written out for this test: 6 x matmul parameters per position plus causal attention
  (3 x 4 x L^2 x dim / 2 per layer), summed over the stages' sequence lengths (G/k)^2."""
  d, f, layers, vocab = model.dim, gpt.ffn_hidden_dim(model), model.n_layer, model.vocab_size
  matmul_params = layers * (4 * d * d + 3 * d * f) + d * vocab
  grid = int(math.isqrt(model.block_size))
  total, start, cumulative = 0.0, 0, 0.0
  for i, (side, fraction) in enumerate(stages):
    cumulative += fraction
    end = steps if i == len(stages) - 1 else round(cumulative * steps)
    length = (grid // side) ** 2
    total += (end - start) * batch * (6 * matmul_params * length + 6 * layers * length * length * d)
    start = end
  return total


def test_the_default_plan_matches_images_and_flops():
  config = study.resolve(load())
  arms, runs = study.plan(config)
  base = arms["ntp"]
  batch = base.train.global_batch_size
  assert set(arms) == {"ntp", "npp_2x2", "npp_4x4_2x2"}
  covered = set()
  for run in runs:
    arm = arms[run.arm]
    stages, model = arm.npp.stages, arm.model
    for budget, match in run.points:
      covered.add((run.arm, run.seed, budget, match))
      if match == "images":
        assert run.steps == budget
      else:
        target = flops_by_hand(base.model, base.npp.stages, budget, batch)
        got = flops_by_hand(model, stages, run.steps, batch)
        one_step = flops_by_hand(model, ((1, 1.0),), 1, batch)
        assert abs(got - target) <= one_step, (run, got / target)
        assert study.training_flops(arm, run.steps) == pytest.approx(got, rel=1e-9)
  assert covered == {(a, s, b, m) for a in arms for s in (0, 1) for b in (200, 400) for m in ("images", "flops")}
  # The baseline is the same run under both matchings, so it is trained once.
  ntp = [r for r in runs if r.arm == "ntp"]
  assert len(ntp) == 4 and all(set(r.points) == {(r.steps, "images"), (r.steps, "flops")} for r in ntp)
  # The paper's cost ratio at equal images: ~0.6 of next-token prediction.
  ratio = flops_by_hand(base.model, ((2, 0.5), (1, 0.5)), 400, batch) / flops_by_hand(base.model, ((1, 1.0),), 400,
                                                                                       batch)
  assert 0.6 < ratio < 0.65
  flops_matched = sorted(r.steps for r in runs if r.arm == "npp_2x2" and r.points[0][1] == "flops")
  assert [abs(s - b / ratio) <= 1 for s, b in zip(flops_matched, (200, 200, 400, 400))] == [True] * 4


def test_budgets_in_epochs_are_passes_over_the_training_set():
  config = study.resolve(config_lib.load_file(str(REPO / "configs" / "study_fashion_epochs.py")))
  arms, runs = study.plan(config, train_images=1000)
  assert set(arms) == {"ntp_constant", "ntp", "npp_2x2", "npp_2x2_constant"}
  assert arms["ntp_constant"].optim.schedule == arms["npp_2x2_constant"].optim.schedule == "warmup_constant"
  assert arms["ntp"].optim.schedule == arms["npp_2x2"].optim.schedule == "stagewise"
  batch = config.train.global_batch_size
  covered = set()
  for run in runs:
    for epochs, match in run.points:
      covered.add((run.arm, run.seed, epochs, match))
      base_steps = round(epochs * 1000 / batch)  # the baseline's steps for `epochs` passes over 1,000 images
      if match == "images":
        assert run.steps == base_steps
      else:
        target = study.training_flops(arms["ntp_constant"], base_steps)
        assert abs(study.training_flops(arms[run.arm], run.steps) - target) <= \
            study.training_flops(arms["ntp"], 1), run
  assert covered == {(a, s, e, m) for a in arms for s in (0, 1) for e in (5, 15, 45) for m in ("images", "flops")}
  assert sorted({r.steps for r in runs if r.arm == "ntp"}) == [78, 234, 703]
  with pytest.raises(ValueError, match="budgets in epochs need the number of training images"):
    study.plan(config)


def test_an_arm_override_must_name_a_trainer_field():
  config = load()
  config.study.arms.ntp = {"npp": {"stagez": ((1, 1.0),)}}
  with pytest.raises(ValueError, match="study.arms.ntp.npp.stagez names no field"):
    study.plan(study.resolve(config))


def test_cli_a_baseline_that_is_no_arm(tmp_path, capsys):
  code = study.main(["study", "--config", STUDY_CONFIG, "--workdir", str(tmp_path), "--config.study.baseline=nope"])
  assert code == 1
  one_sentence(capsys.readouterr().err, "study.baseline='nope' is not one of the arms")
  assert not any(tmp_path.iterdir())  # nothing written


def test_a_finished_run_is_reused_unless_its_recipe_changed(tmp_path):
  arms, runs = study.plan(study.resolve(load()))
  run = runs[0]
  config = study.run_config(arms[run.arm], run, str(tmp_path / "codes"))
  stored = json.loads(config.to_json_best_effort())
  del stored["optim"]["stage_lr_scales"]  # a run from before the field existed: it trained with the default
  (tmp_path / "config.json").write_text(json.dumps(stored))
  (tmp_path / workdir_lib.DONE_FILE).write_text(f"{run.steps}\n")
  assert study.train_run(config, str(tmp_path), print) is False  # finished: not trained again
  stored["optim"]["lr"] *= 2
  stored["seed"] += 1
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ValueError, match=re.escape("(seed, optim.lr differ from the study config)")):
    study.train_run(config, str(tmp_path), print)


def test_training_seconds_counts_the_last_execution_of_each_window(tmp_path):
  rows = [{"step": 10, "loss": 5.0, "steps_per_s": 5.0}, {"step": 20, "loss": 4.0, "steps_per_s": 2.0},
          {"step": 20, "loss": 4.1, "steps_per_s": 10.0},  # replayed after a resume from step 10
          {"step": 30, "loss": 3.0, "steps_per_s": 1.0}, {"step": 30, "eval/fd": 9.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  history = study.logged_history(str(tmp_path))
  assert [r["loss"] for r in history] == [5.0, 4.1, 3.0]
  assert study.training_seconds(history) == pytest.approx(10 / 5 + 10 / 10 + 10 / 1)


def synthetic_results(fd_ntp, fd_npp, agreement_ntp, agreement_npp):
  """A results.json of two arms, two seeds, one budget matched by images, scores at cfg 3.0 and 1.0."""
  runs = []
  for arm, fds, agreements, flops in (("ntp", fd_ntp, agreement_ntp, 10.0), ("npp", fd_npp, agreement_npp, 6.0)):
    for seed, (fd, agreement) in enumerate(zip(fds, agreements)):
      runs.append({"name": f"{arm}-100steps-seed{seed}", "arm": arm, "seed": seed, "steps": 100,
                   "points": [[100, "images"]], "batch_size": 4, "images": 400, "flops": flops,
                   "seconds": 20.0 + seed, "trained_now": True, "stages": [{"patch_side": 1, "start": 0, "end": 100}],
                   "loss": [[50, 3.0], [100, 2.0]],
                   "scores": {"3.0": {"fd": fd, "agreement": agreement, "fd_se": 0.5, "agreement_se": 0.01},
                              "1.0": {"fd": fd + 100, "agreement": agreement / 2, "fd_se": 0.5,
                                      "agreement_se": 0.01}}})
  return {"command": "python -m npp_jax.study --config X --workdir Y",
          "study": {"seeds": [0, 1], "budgets": [100], "match": ["images"]},
          "baseline": "ntp", "fixed_cfg_scale": 3.0,
          "eval": {"num_samples": 1000, "seed": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "bootstrap": 100,
                   "cfg_scales": [3.0, 1.0]},
          "arms": {"ntp": {"stages": [[1, 1.0]]}, "npp": {"stages": [[2, 0.5], [1, 0.5]]}},
          "model": {"parameters": 1000, "grid": 8, "vocab_size": 512},
          "machine": {"cpu_count": 2, "device": "cpu", "jax": "0"}, "finished": "now",
          "study_seconds_this_invocation": 100.0, "runs": runs}


def test_report_means_spreads_and_verdicts():
  results = synthetic_results(fd_ntp=[50.0, 54.0], fd_npp=[30.0, 31.0], agreement_ntp=[0.80, 0.82],
                              agreement_npp=[0.79, 0.83])
  text = study_report.markdown(results)
  assert text.splitlines()[5] == results["command"]
  sd = lambda v: float(np.std(v, ddof=1))
  ntp_row = next(line for line in text.splitlines() if line.startswith("| 100 | images | `ntp` |"))
  assert f"{52.0:.1f} ± {sd([50, 54]):.1f}" in ntp_row and f"{0.81:.3f} ± {sd([0.80, 0.82]):.3f}" in ntp_row
  assert "| 10 (1.000) |" in ntp_row  # FLOPs and their ratio to the baseline
  npp_row = next(line for line in text.splitlines() if line.startswith("| 100 | images | `npp` |"))
  assert "(0.600)" in npp_row
  # The best guidance per arm from the sweep: 3.0 gives the lower FD and the higher agreement here.
  assert npp_row.endswith(f"{30.5:.1f} ± {sd([30, 31]):.1f} (3.0) | {0.81:.3f} ± {sd([0.79, 0.83]):.3f} (3.0) |")
  compared = next(line for line in text.splitlines() if line.startswith("| 100 | images | `npp` | 0.600 |"))
  fd_se = math.sqrt((sd([30, 31]) ** 2 + 0.5 ** 2) / 2 + (sd([50, 54]) ** 2 + 0.5 ** 2) / 2)  # seeds and sampling
  assert f"{-21.5:+.1f} ± {fd_se:.1f} (better)" in compared
  assert "+0.000 ± " in compared and "(no difference beyond 2 standard errors)" in compared
  worse = study_report.markdown(synthetic_results([50.0, 50.5], [60.0, 60.5], [0.8, 0.8], [0.6, 0.61]))
  compared = next(line for line in worse.splitlines() if line.startswith("| 100 | images | `npp` | 0.600 |"))
  assert compared.count("(worse)") == 2


def test_convergence_reads_the_heldout_curve():
  def run(losses):
    return {"steps": 100, "heldout_loss": [[10 * (i + 1), loss] for i, loss in enumerate(losses)]}

  falling = study_report.convergence(run([5, 4, 3.5, 3.2, 3.1, 3.0, 2.95, 2.9, 2.85, 2.8]))
  assert falling["verdict"] == "still falling"
  assert falling["last_quarter_change"] == pytest.approx(2.8 / 2.95 - 1)  # against step 70, the last <= 75
  rising = study_report.convergence(run([5, 4, 3, 2.9, 2.95, 3.0, 3.0, 3.0, 3.0, 3.0]))
  assert (rising["verdict"], rising["minimum"], rising["minimum_step"]) == ("rising", 2.9, 40)
  assert study_report.convergence(run([5, 4, 3, 3, 3, 3, 3, 3, 3, 2.99]))["verdict"] == "flat"


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
  """The quick study on a small image folder, with one extra guidance scale; the workdir and the config."""
  root = tmp_path_factory.mktemp("study")
  config = load(quick=True, cfg_sweep=(1.5,))
  config.data.update(source="folder", dir=str(image_folder(root / "images")), shard_size=16, subset_per_class=3)
  # Held-out codes of other images through the same tokenizer; each run scores them twice.
  heldout = ml_collections.ConfigDict(config.to_dict())
  heldout.data.dir = str(image_folder(root / "heldout", per_class=2))
  config.data.heldout_codes_dir = prepare.prepare_once(heldout, str(root / "heldout_codes"), print)
  config.eval.heldout_every = 1
  config.study.heldout_points = 2
  workdir = root / "study"
  study.run_study(config, str(workdir), command="python -m npp_jax.study (test)")
  return workdir, config


def evaluation_outputs(workdir):
  return {p.parent.name: json.loads(p.read_text())["scores"] for p in sorted(workdir.glob(f"runs/*/{study.EVAL_FILE}"))}


def test_quick_study_trains_every_arm_and_seed_and_reports_the_evaluations(quick_study):
  workdir, config = quick_study
  _, runs = study.plan(study.resolve(config))
  names = {r.name for r in runs}
  assert names == {"ntp-8steps-seed0", "ntp-8steps-seed1", "npp_2x2-8steps-seed0", "npp_2x2-8steps-seed1",
                   "npp_4x4_2x2-8steps-seed0", "npp_4x4_2x2-8steps-seed1", "npp_2x2-13steps-seed0",
                   "npp_2x2-13steps-seed1", "npp_4x4_2x2-14steps-seed0", "npp_4x4_2x2-14steps-seed1"}
  for name in names:
    run_dir = workdir / "runs" / name
    assert (run_dir / workdir_lib.DONE_FILE).read_text().strip() == name.split("-")[1].removesuffix("steps")
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["seed"] == int(name[-1]) and stored["model"]["dim"] == 64  # the quick model
  # The two seeds train different models.
  scores = evaluation_outputs(workdir)
  assert set(scores) == names and all(set(s) == {"3.0", "1.5"} for s in scores.values())
  assert scores["ntp-8steps-seed0"] != scores["ntp-8steps-seed1"]

  results = json.loads((workdir / study.RESULTS_FILE).read_text())
  assert {r["name"]: r["scores"] for r in results["runs"]} == scores
  assert results["train_images"] == 3 * 10  # data.subset_per_class of each class
  for run in results["runs"]:  # the held-out loss at half the run and at its end
    assert [step for step, _ in run["heldout_loss"]] == [-(-run["steps"] // 2), run["steps"]], run["name"]
    assert run["epochs"] == pytest.approx(run["steps"] * 16 / 30)
  report = (workdir / study_report.REPORT_FILE).read_text()
  assert "## Has each run converged?" in report
  # Every run's row carries the numbers its study_eval.json holds.
  for name, s in scores.items():
    row = next(line for line in report.splitlines() if line.startswith(f"| `{name}` |"))
    cells = [f"{s[c]['fd']:.1f} ± {s[c]['fd_se']:.1f} / {s[c]['agreement']:.3f} ± {s[c]['agreement_se']:.3f}"
             for c in ("3.0", "1.5")]
    assert row.endswith(f"| {cells[0]} | {cells[1]} |"), row
    assert all(s[c]["fd_se"] > 0 and 0 < s[c]["agreement_se"] < 0.2 for c in ("3.0", "1.5"))
  # The table's means and spreads are those of the seeds' evaluations.
  for arm, steps, match in (("ntp", 8, "images"), ("npp_2x2", 13, "flops"), ("npp_4x4_2x2", 8, "images")):
    fds = [scores[f"{arm}-{steps}steps-seed{s}"]["3.0"]["fd"] for s in (0, 1)]
    row = next(line for line in report.splitlines() if line.startswith(f"| 8 | {match} | `{arm}` | {steps} |"))
    assert f"| {np.mean(fds):.1f} ± {np.std(fds, ddof=1):.1f} |" in row, row
  for plot in study_report.PLOTS.values():
    with Image.open(workdir / plot) as image:
      assert image.size[0] > 500 and image.size[1] > 200
      assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_quick_study_resumes_without_retraining_finished_runs(quick_study, monkeypatch):
  workdir, config = quick_study
  runs_dir = workdir / "runs"
  interrupted, lost = runs_dir / "npp_2x2-13steps-seed1", runs_dir / "ntp-8steps-seed0"
  old_scores = evaluation_outputs(workdir)
  (interrupted / workdir_lib.DONE_FILE).unlink()  # killed after its last checkpoint, before DONE
  shutil.rmtree(lost)
  before = {p.parent.name: p.stat().st_mtime_ns for p in runs_dir.glob(f"*/{study.EVAL_FILE}")}
  trained = []
  real_run = gpt_trainer.run
  monkeypatch.setattr(gpt_trainer, "run", lambda cfg, run_dir: (trained.append(os.path.basename(run_dir)),
                                                          real_run(cfg, run_dir))[1])
  study.run_study(config, str(workdir))
  assert sorted(trained) == sorted([interrupted.name, lost.name])
  assert (interrupted / workdir_lib.DONE_FILE).exists() and (lost / workdir_lib.DONE_FILE).exists()
  after = {p.parent.name: p.stat().st_mtime_ns for p in runs_dir.glob(f"*/{study.EVAL_FILE}")}
  assert {n for n in before if before[n] != after[n]} == set()  # judged once: the cached scores were reused
  scores = evaluation_outputs(workdir)
  assert scores[interrupted.name] == old_scores[interrupted.name]  # resumed at its final step: the same model
  assert scores[lost.name] == old_scores[lost.name]  # retrained from scratch: seeded, so the same model again
  results = json.loads((workdir / study.RESULTS_FILE).read_text())
  assert {r["name"] for r in results["runs"] if r["trained_now"]} == {interrupted.name, lost.name}

  # A finished run is never reused for a changed recipe: one sentence, before anything is trained.
  changed = load(quick=True, cfg_sweep=(1.5,))
  changed.data.update(config.data)
  changed.study.arms.npp_2x2 = {"npp": {"stages": ((2, 0.5), (1, 0.5))}, "optim": {"lr": 1e-3}}
  trained.clear()
  with pytest.raises(ValueError, match=re.escape("npp_2x2-8steps-seed0 was trained with other settings (optim")):
    study.run_study(changed, str(workdir))
  assert trained == []
