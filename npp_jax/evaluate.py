"""Evaluate samples the way LlamaGen / NPP report them: FID, sFID, IS, precision and recall, without TensorFlow.

  python -m npp_jax.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
      --inception pt_inception-2015-12-05-6726825d.pth [--out report.json] [--batch-size 200]

samples.npz holds `arr_0`, uint8 (N, H, W, 3), plus any sampling settings (cfg_scale, temperature, top_k, top_p,
seed, labels, ...), which are copied into the report. The reference's features are cached next to it. The JSON report
(default: next to the samples, `<name>.eval.json`) holds every metric, the file hashes and the settings used.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

from npp_jax import evaluation
from npp_jax.models import inception


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m npp_jax.evaluate", description=__doc__.split("\n")[0])
  parser.add_argument("--samples", required=True, help="samples .npz with arr_0 uint8 (N, H, W, 3)")
  parser.add_argument("--ref", required=True, help="reference batch .npz (e.g. ADM's VIRTUAL_imagenet256_labeled)")
  parser.add_argument("--inception", required=True, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--out", default=None, help="JSON report path (default: <samples>.eval.json)")
  parser.add_argument("--batch-size", type=int, default=200, help="images per Inception batch (all devices)")
  parser.add_argument("--preprocessing", choices=inception.PREPROCESSINGS, default="pytorch_fid",
                      help="pytorch_fid (checked against pytorch-fid) or tf1 (ADM's TF graph, unverified)")
  parser.add_argument("--ref-stats", choices=evaluation.REF_STATS, default="images",
                      help="FID reference statistics: from the reference images, or those stored in the file (ADM)")
  parser.add_argument("--metrics", default=",".join(evaluation.METRICS),
                      help="comma-separated subset of fid,sfid,is,pr (FID's matrix square root costs ~10 s of CPU)")
  parser.add_argument("--min-samples", type=int, default=evaluation.MIN_FID_SAMPLES,
                      help="refuse fewer images than this (default: feature dimension + 1)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser.parse_args(argv)


def _write_json(path: pathlib.Path, report: dict) -> None:
  """Writes the report atomically, so that a failure never leaves half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  with os.fdopen(fd, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  samples = pathlib.Path(args.samples)
  out = pathlib.Path(args.out) if args.out else samples.with_name(samples.stem + ".eval.json")
  try:
    report = evaluation.evaluate(samples, args.ref, args.inception, batch_size=args.batch_size,
                                 preprocessing=args.preprocessing, ref_stats=args.ref_stats,
                                 metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
                                 min_samples=args.min_samples, progress=not args.no_progress)
    _write_json(out, report)
  except (FileNotFoundError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(evaluation.report_summary(report))
  print(f"report written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
