"""The study's report: WORKDIR/report.md and its plots, made from results.json alone (every figure in them is one
the study computed, never re-typed).

Plots (matplotlib, Agg): quality against the budget (one row per matching), against training FLOPs and against
wall-clock, and the loss curves (training, and held-out where the runs logged it) with the stage switches marked.
The table gives, per budget and matching, each arm's mean and standard deviation over seeds; the comparisons give
each arm's difference to the baseline (and to each arm of `study.also_against`) with its standard error (seeds and
sampling noise); the convergence table reads the held-out curves.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from npp_jax import fileio  # noqa: E402

REPORT_FILE = "report.md"
PLOTS = {"budget": "quality_vs_budget.png", "flops": "quality_vs_flops.png", "seconds": "quality_vs_wallclock.png",
         "loss": "loss_curves.png"}
# A held-out curve that still fell by more than this fraction over a run's last quarter is "still falling"; one
# that ends this far above its minimum is "rising" (the run overfits).
CONVERGENCE_TOLERANCE = 0.01
METRICS = (("fd", "Frechet distance (classifier features, lower is better)"),
           ("agreement", "label agreement (higher is better)"))


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = [float(v) for v in values]
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def budget_unit(results: dict) -> str:
  return results.get("budget_unit", "steps")


def references(results: dict) -> list[str]:
  """The arms every other arm is compared with: the baseline, then study.also_against."""
  return [results["baseline"], *[a for a in results["study"].get("also_against", ()) if a != results["baseline"]]]


def arm_order(results: dict) -> list[str]:
  """The reference arms first, then the other arms by name."""
  first = references(results)
  return [*first, *sorted(a for a in results["arms"] if a not in first)]


def groups(results: dict) -> dict[tuple[int, str, str], list[dict]]:
  """{(budget, match, arm): [run records over seeds]}, budgets ascending, the baseline first."""
  out: dict[tuple[int, str, str], list[dict]] = {}
  order, matches = arm_order(results), list(results["study"]["match"])
  for run in results["runs"]:
    for budget, match in run["points"]:
      out.setdefault((budget, match, run["arm"]), []).append(run)
  return dict(sorted(out.items(), key=lambda kv: (kv[0][0], matches.index(kv[0][1]), order.index(kv[0][2]))))


def scores(runs: list[dict], scale: str, metric: str) -> list[float]:
  return [run["scores"][scale][metric] for run in runs]


def best_scores(runs: list[dict], metric: str) -> tuple[str, list[float]]:
  """The guidance scale with the best mean over seeds (lowest FD / highest agreement) and its per-seed values."""
  sign = 1 if metric == "fd" else -1
  scales = list(runs[0]["scores"])
  best = min(scales, key=lambda s: sign * mean_sd(scores(runs, s, metric))[0])
  return best, scores(runs, best, metric)


def _fmt(mean: float, sd: float, metric: str) -> str:
  return f"{mean:.3f} ± {sd:.3f}" if metric == "agreement" else f"{mean:.1f} ± {sd:.1f}"


def difference(arm_runs: list[dict], base_runs: list[dict], scale: str, metric: str) -> tuple[float, float, str]:
  """(arm mean - baseline mean, its standard error, a verdict at two standard errors).

  The error adds the spread over seeds (sd^2 / n per side) and the sampling noise of the evaluation (the mean
  bootstrap variance / n per side): with two seeds the sd alone can be near 0 by chance.
  """
  def variance_of_mean(runs):
    sd = mean_sd(scores(runs, scale, metric))[1]
    sampling = sum(r["scores"][scale][f"{metric}_se"] ** 2 for r in runs) / len(runs)
    return (sd ** 2 + sampling) / len(runs)

  diff = mean_sd(scores(arm_runs, scale, metric))[0] - mean_sd(scores(base_runs, scale, metric))[0]
  se = math.sqrt(variance_of_mean(arm_runs) + variance_of_mean(base_runs))
  better = diff < 0 if metric == "fd" else diff > 0
  if abs(diff) <= 2 * se:
    verdict = "no difference beyond 2 standard errors"
  else:
    verdict = "better" if better else "worse"
  return diff, se, verdict


def markdown(results: dict) -> str:
  grouped = groups(results)
  baseline = results["baseline"]
  fixed = str(results["fixed_cfg_scale"])
  sweep = len(results["eval"]["cfg_scales"]) > 1
  ev, model, machine = results["eval"], results["model"], results["machine"]
  seeds = results["study"]["seeds"]
  lines = [
      "# NPP against next-token prediction: the study",
      "",
      "Made by:",
      "",
      "```bash",
      results["command"] or "python -m npp_jax.study (in-process)",
      "```",
      "",
      f"- Model: {model['parameters']:,} parameters; code grid {model['grid']}x{model['grid']}, "
      f"vocabulary {model['vocab_size']}. " + _budget_sentence(results),
      "- Arms: " + "; ".join(f"`{name}` stages {tuple(tuple(s) for s in results['arms'][name]['stages'])}"
                               for name in arm_order(results)) + ".",
      f"- Seeds: {', '.join(map(str, seeds))}. Every run is judged on {ev['num_samples']:,} samples (labels cycling "
      f"over the classes, sampling seed {ev['seed']}, temperature {ev['temperature']}, top-k {ev['top_k']}, "
      f"top-p {ev['top_p']}) by the shipped Fashion-MNIST classifier: Frechet distance (FD) in its feature space "
      "and label agreement.",
      f"- Guidance {fixed} for the table" + (f"; the sweep over {', '.join(map(str, ev['cfg_scales']))} gives each "
                                             "arm's best scale in the last columns." if sweep else "."),
      "- `images`: every arm sees as many images as the baseline (NPP then costs less). `flops`: every arm gets the "
      "baseline's training FLOPs (NPP then sees more images). FLOPs are MaxText's count (6 x matmul parameters per "
      "token plus causal attention); wall-clock is the training loop's (compilation and checkpoints included).",
      f"- ± is the standard deviation over seeds (n = {len(seeds)}). Machine: {machine['cpu_count']} CPU cores "
      f"({machine['device']}), jax {machine['jax']}; finished {results['finished']}.",
      f"- Training wall-clock summed over the {len(results['runs'])} runs: "
      f"{sum(r['seconds'] for r in results['runs']) / 60:.1f} min. The invocation that wrote this report took "
      f"{results['study_seconds_this_invocation'] / 60:.1f} min and trained "
      f"{sum(r['trained_now'] for r in results['runs'])} of them; finished runs and their cached scores are reused.",
      "",
      f"![quality against the budget]({PLOTS['budget']})",
      "",
      "![quality against training FLOPs](" + PLOTS["flops"] + ")",
      "",
      "![quality against wall-clock](" + PLOTS["seconds"] + ")",
      "",
      "![loss curves](" + PLOTS["loss"] + ")",
      "",
      "## Results",
      "",
  ]
  epochs = budget_unit(results) == "epochs"
  header = (f"| budget ({budget_unit(results)}) | matched | arm | steps | " + ("epochs | " if epochs else "") +
            "images | FLOPs (x baseline) | wall-clock s | FD | agreement |")
  rule = "|---|---|---|---|---|---|---|---|---|" + ("---|" if epochs else "")
  if sweep:
    header += " best FD (cfg) | best agreement (cfg) |"
    rule += "---|---|"
  lines += [header, rule]
  for (budget, match, arm), runs in grouped.items():
    base_flops = grouped[(budget, match, baseline)][0]["flops"]
    flops = runs[0]["flops"]
    seconds = mean_sd(r["seconds"] for r in runs)
    row = (f"| {budget} | {match} | `{arm}` | {runs[0]['steps']} | " +
           (f"{runs[0]['epochs']:.1f} | " if epochs else "") + f"{runs[0]['images']:,} | "
           f"{flops:.3g} ({flops / base_flops:.3f}) | {seconds[0]:.0f} ± {seconds[1]:.0f} | "
           f"{_fmt(*mean_sd(scores(runs, fixed, 'fd')), 'fd')} | "
           f"{_fmt(*mean_sd(scores(runs, fixed, 'agreement')), 'agreement')} |")
    if sweep:
      for metric in ("fd", "agreement"):
        scale, values = best_scores(runs, metric)
        row += f" {_fmt(*mean_sd(values), metric)} ({scale}) |"
    lines.append(row)
  for reference in references(results):
    lines += comparison_lines(results, grouped, reference)
  if any(run.get("heldout_loss") for run in results["runs"]):
    lines += convergence_lines(results)
  lines += ["", "## Every run", "", "Each figure ± its sampling error (bootstrap over the samples).", "",
            "| run | steps | wall-clock s | " +
            " | ".join(f"FD / agreement at cfg {s}" for s in ev["cfg_scales"]) + " |",
            "|---|---|---|" + "---|" * len(ev["cfg_scales"])]
  for run in results["runs"]:
    cells = []
    for scale in map(str, ev["cfg_scales"]):
      x = run["scores"][scale]
      cells.append(f"{x['fd']:.1f} ± {x['fd_se']:.1f} / {x['agreement']:.3f} ± {x['agreement_se']:.3f}")
    lines.append(f"| `{run['name']}` | {run['steps']} | {run['seconds']:.0f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _budget_sentence(results: dict) -> str:
  if budget_unit(results) == "epochs":
    return (f"Budgets are epochs of the baseline arm `{results['baseline']}`: passes over the "
            f"{results['train_images']:,} training images (an arm matched at equal FLOPs trains more epochs).")
  return f"Budgets are counted in steps of the baseline arm `{results['baseline']}`."


def comparison_lines(results: dict, grouped: dict, reference: str) -> list[str]:
  """The section comparing every other arm with `reference`, budget by budget."""
  fixed, ev = str(results["fixed_cfg_scale"]), results["eval"]
  title = "the baseline" if reference == results["baseline"] else f"`{reference}`"
  lines = ["", f"## Each arm against {title}", "",
           f"Difference arm minus `{reference}` at guidance {fixed}, ± its standard error (the spread over seeds plus "
           f"the sampling noise of {ev['num_samples']:,} samples, from {ev['bootstrap']} bootstrap resamplings); the "
           f"verdict is at two standard errors. Cost is the arm's training FLOPs and wall-clock over `{reference}`'s.",
           "",
           "| budget | matched | arm | FLOPs ratio | wall-clock ratio | FD difference | agreement difference |",
           "|---|---|---|---|---|---|---|"]
  for (budget, match, arm), runs in grouped.items():
    base = grouped.get((budget, match, reference))
    if arm == reference or base is None:
      continue
    cells = []
    for metric in ("fd", "agreement"):
      diff, se, verdict = difference(runs, base, fixed, metric)
      digits = 1 if metric == "fd" else 3
      cells.append(f"{diff:+.{digits}f} ± {se:.{digits}f} ({verdict})")
    flops_ratio = runs[0]["flops"] / base[0]["flops"]
    seconds_ratio = mean_sd(r["seconds"] for r in runs)[0] / mean_sd(r["seconds"] for r in base)[0]
    lines.append(f"| {budget} | {match} | `{arm}` | {flops_ratio:.3f} | {seconds_ratio:.3f} | {cells[0]} | "
                 f"{cells[1]} |")
  return lines


def convergence(run: dict) -> dict:
  """What a run's held-out curve says: its final value, its relative change since the last evaluation at or before
  three quarters of the run, its minimum and where, and a verdict at CONVERGENCE_TOLERANCE: "still falling",
  "rising" (past its minimum) or "flat"."""
  steps, losses = zip(*run["heldout_loss"])
  final = losses[-1]
  quarter = ([loss for step, loss in zip(steps, losses) if step <= 0.75 * run["steps"]] or losses[:1])[-1]
  low = min(range(len(losses)), key=losses.__getitem__)
  change = (final - quarter) / quarter
  if change < -CONVERGENCE_TOLERANCE:
    verdict = "still falling"
  elif (final - losses[low]) / losses[low] > CONVERGENCE_TOLERANCE:
    verdict = "rising"
  else:
    verdict = "flat"
  return {"final": final, "last_quarter_change": change, "minimum": losses[low], "minimum_step": steps[low],
          "verdict": verdict}


def convergence_lines(results: dict) -> list[str]:
  lines = ["", "## Has each run converged?", "",
           "Each run's next-token loss on held-out images (the same images for every run; whatever the stage, the "
           "1x1 loss). `still falling`: it fell more than "
           f"{CONVERGENCE_TOLERANCE:.0%} over the run's last quarter, so the run is not converged; `rising`: it ends "
           f"more than {CONVERGENCE_TOLERANCE:.0%} above its minimum, so the run overfits its training set; `flat`: "
           "neither. Mean over seeds; the verdicts are per seed.", "",
           "| budget | matched | arm | epochs | final held-out loss | change over the last quarter "
           "| minimum (at epoch) | verdicts |", "|---|---|---|---|---|---|---|---|"]
  for (budget, match, arm), runs in groups(results).items():
    if not all(r.get("heldout_loss") for r in runs):
      continue
    found = [convergence(r) for r in runs]
    per_epoch = runs[0]["epochs"] / runs[0]["steps"]
    final, change = (mean_sd(c[k] for c in found) for k in ("final", "last_quarter_change"))
    minimum = mean_sd(c["minimum"] for c in found)[0]
    at = mean_sd(c["minimum_step"] * per_epoch for c in found)[0]
    lines.append(f"| {budget} | {match} | `{arm}` | {runs[0]['epochs']:.1f} | "
                 f"{final[0]:.4f} ± {final[1]:.4f} | {change[0]:+.2%} | {minimum:.4f} ({at:.1f}) | "
                 f"{', '.join(c['verdict'] for c in found)} |")
  return lines


def _arm_colors(results: dict) -> dict[str, str]:
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  return {arm: cycle[i % len(cycle)] for i, arm in enumerate(arm_order(results))}


def plot_quality(results: dict, x_key: str, x_label: str, path: str) -> None:
  """FD and agreement (mean ± sd over seeds, fixed guidance) against FLOPs or wall-clock, one line per arm."""
  grouped = groups(results)
  fixed = str(results["fixed_cfg_scale"])
  colors = _arm_colors(results)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, (metric, label) in zip(axes, METRICS):
    for arm in arm_order(results):
      seen = {}  # a run set counts once even if it stands for several (budget, match) points
      for (_, _, a), runs in grouped.items():
        if a == arm:
          seen[tuple(sorted(r["name"] for r in runs))] = runs
      points = sorted((mean_sd(r[x_key] for r in runs)[0], *mean_sd(scores(runs, fixed, metric)))
                      for runs in seen.values())
      xs, ys, sds = zip(*points)
      ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, color=colors[arm], label=arm)
    ax.set_xlabel(x_label)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"guidance {fixed}, mean ± sd over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_budget(results: dict, path: str) -> None:
  """FD and agreement (mean ± sd over seeds, fixed guidance) against the budget, one row per matching."""
  grouped = groups(results)
  fixed = str(results["fixed_cfg_scale"])
  colors = _arm_colors(results)
  matches = list(results["study"]["match"])
  fig, axes = plt.subplots(len(matches), 2, figsize=(11, 3.8 * len(matches)), squeeze=False)
  for row, match in zip(axes, matches):
    for ax, (metric, label) in zip(row, METRICS):
      for arm in arm_order(results):
        points = sorted((budget, *mean_sd(scores(runs, fixed, metric)))
                        for (budget, m, a), runs in grouped.items() if a == arm and m == match)
        if points:
          xs, ys, sds = zip(*points)
          ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, color=colors[arm], label=arm)
      ax.set_xscale("log")
      ax.set_xlabel(f"budget ({budget_unit(results)} of the baseline), matched at equal {match}")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3, which="both")
  axes[0][0].legend()
  fig.suptitle(f"guidance {fixed}, mean ± sd over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_losses(results: dict, path: str) -> None:
  """Training loss (solid) and held-out next-token loss (dashed, where logged) for the runs of the largest budget,
  one panel per arm, stage switches in gray. A k x k stage's training loss averages k^2 targets per distribution,
  so it sits above the token loss."""
  colors = _arm_colors(results)
  largest = max(results["study"]["budgets"])
  arms = arm_order(results)
  epochs = budget_unit(results) == "epochs"
  x_of = (lambda step, run: step * run["batch_size"] / results["train_images"]) if epochs else \
      (lambda step, run: step * run["batch_size"] / 1000)
  fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), sharey=True, squeeze=False)
  for ax, arm in zip(axes[0], arms):
    runs = [r for r in results["runs"] if r["arm"] == arm and any(b == largest for b, _ in r["points"])]
    widths = {steps: width for steps, width in zip(sorted({r["steps"] for r in runs}), (1.2, 2.2, 3.0))}
    for run in sorted(runs, key=lambda r: (r["steps"], r["seed"])):
      alpha = 0.4 + 0.4 * (run["seed"] == runs[0]["seed"])
      label = f"{run['steps']} steps ({', '.join(m for _, m in run['points'])}), seed {run['seed']}"
      steps, losses = zip(*run["loss"])
      ax.plot([x_of(s, run) for s in steps], losses, color=colors[arm], lw=widths.get(run["steps"], 1.2),
              alpha=alpha, label=label)
      if run.get("heldout_loss"):
        steps, losses = zip(*run["heldout_loss"])
        ax.plot([x_of(s, run) for s in steps], losses, color=colors[arm], ls="--", marker="o", ms=3,
                lw=widths.get(run["steps"], 1.2), alpha=alpha)
      for stage in run["stages"][1:]:
        ax.axvline(x_of(stage["start"], run), color="gray", lw=0.8, alpha=0.6)
    ax.set_title(f"{arm} (budget {largest})")
    ax.set_xlabel("epochs" if epochs else "images seen (thousands)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("training loss; held-out next-token loss dashed")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(results: dict, directory: str) -> str:
  """Writes report.md and the plots into `directory`; returns the report's path."""
  plot_budget(results, os.path.join(directory, PLOTS["budget"]))
  plot_quality(results, "flops", "training FLOPs", os.path.join(directory, PLOTS["flops"]))
  plot_quality(results, "seconds", "training wall-clock (s)", os.path.join(directory, PLOTS["seconds"]))
  plot_losses(results, os.path.join(directory, PLOTS["loss"]))
  path = os.path.join(directory, REPORT_FILE)
  fileio.write_text(path, markdown(results))
  return path
