"""Evaluate samples the way LlamaGen / NPP report them: FID, sFID, IS, precision and recall, without TensorFlow.

  python -m npp_jax.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
      --inception pt_inception-2015-12-05-6726825d.pth [--out report.json] [--batch_size 200]

samples.npz holds `arr_0`, uint8 (N, H, W, 3), plus any sampling settings (cfg_scale, temperature, top_k, top_p,
seed, labels, ...), which are copied into the report. The reference's features are cached next to it. The JSON report
(default: next to the samples, `<name>.eval.json`) holds every metric, the file hashes and the settings used.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from npp_jax import cli
from npp_jax.eval import adm
from npp_jax import fileio
from npp_jax.models import inception


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # No config.
  flags.DEFINE_string("samples", None, "Samples .npz with arr_0 uint8 (N, H, W, 3).", flag_values=fv)
  flags.DEFINE_string("ref", None, "Reference batch .npz (e.g. ADM's VIRTUAL_imagenet256_labeled).", flag_values=fv)
  flags.DEFINE_string("inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.", flag_values=fv)
  flags.DEFINE_string("out", None, "JSON report path (default: <samples>.eval.json).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 200, "Images per Inception batch (all devices).", lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("preprocessing", "pytorch_fid", inception.PREPROCESSINGS,
                    "pytorch_fid (checked against pytorch-fid) or tf1 (ADM's TF graph, unverified).", flag_values=fv)
  flags.DEFINE_enum("ref_stats", "images", adm.REF_STATS, "FID reference statistics: from the reference "
                    "images, or those stored in the file (ADM).", flag_values=fv)
  flags.DEFINE_list("metrics", list(adm.METRICS), "Comma-separated subset of fid,sfid,is,pr (FID's matrix "
                    "square root costs ~10 s of CPU).", flag_values=fv)
  flags.DEFINE_integer("min_samples", adm.MIN_FID_SAMPLES, "Refuse fewer images than this (default: feature "
                       "dimension + 1).", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress bars (--noprogress: none).", flag_values=fv)


def run(fv: flags.FlagValues) -> str:
  samples = pathlib.Path(fv.samples)
  out = pathlib.Path(fv.out) if fv.out else samples.with_name(samples.stem + ".eval.json")
  report = adm.evaluate(samples, fv.ref, fv.inception, batch_size=fv.batch_size,
                               preprocessing=fv.preprocessing, ref_stats=fv.ref_stats,
                               metrics=tuple(m.strip() for m in fv.metrics if m.strip()),
                               min_samples=fv.min_samples, progress=fv.progress)
  fileio.write_text(out, json.dumps(report, indent=2) + "\n")
  return f"{adm.report_summary(report)}\nreport written to {out}"


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__, required=("samples", "ref", "inception"))


if __name__ == "__main__":
  sys.exit(main())
