"""The reference side of bench/vs_reference.py: one measurement of the original PyTorch code, run by a torch
interpreter over a checkout of the reference repositories (never part of this project).

  TORCH_PYTHON bench/vs_reference_torch.py --npp_repo NPP_CHECKOUT [--llamagen_repo LLAMAGEN_CHECKOUT] \
      --spec '{"kind": "train", "precision": "bfloat16", "model": {"dim": 256, ...}, "batch": 64, ...}'

The model is NPP's `autoregressive/models/gpt.py` (`Transformer(ModelArgs(...))`, train mode, dropout as in
ModelArgs), trained with AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on >= 2-D parameters) and gradient
clipping at 1.0 as NPP's train_c2i.py does; sampling is LlamaGen's `autoregressive/models/generate.py:generate`.
Precision "bfloat16" is what the reference's users run: training under `torch.autocast("cpu", torch.bfloat16)`
around the forward and loss (train_c2i.py's `--mixed-precision bf16`), sampling with the model cast to bfloat16
(sample_c2i.py's default `--precision bf16`). Kind "gemm" measures torch's matrix-product rate (GFLOP/s) instead.
Prints one JSON line: {"seconds": per batch or per step, "peak_rss_mib": ...} (gemm: {"gflops": {...}}).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import resource
import sys
import time

import torch

def load_reference(npp_repo: str, llamagen_repo: str | None):
  """(NPP's gpt module, LlamaGen's generate function)."""
  sys.path.insert(0, npp_repo)
  from autoregressive.models import gpt  # pylint: disable=import-outside-toplevel
  original = gpt.target_patchify

  def target_patchify(tensor, p, patch_size):
    # F.unfold has no int64 kernel on CPU: ids < 2**53 survive float64 exactly.
    return original(tensor.double(), p, patch_size).long()

  gpt.target_patchify = target_patchify
  path = f"{llamagen_repo or npp_repo}/autoregressive/models/generate.py"
  spec = importlib.util.spec_from_file_location("reference_generate", path)
  generate = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(generate)
  return gpt, generate.generate


def make_model(gpt, shapes: dict):
  torch.manual_seed(0)
  model = gpt.Transformer(gpt.ModelArgs(**shapes))
  torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-initialised head would make sampling degenerate
  return model


def optimizer_for(model):
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=1e-4, betas=(0.9, 0.95))


def autocast(precision: str):
  if precision == "float32":
    return contextlib.nullcontext()
  return torch.autocast("cpu", dtype=getattr(torch, precision))


def gemm_rates(shapes: list[list[int]], calls: int = 50) -> dict[str, dict[str, float]]:
  """GFLOP/s of (rows x inner) @ (inner x cols) in float32 and bfloat16, after a warm-up."""
  rates = {}
  for dtype in ("float32", "bfloat16"):
    for m, k, n in shapes:
      a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
      for _ in range(5):
        a @ b
      start = time.perf_counter()
      for _ in range(calls):
        a @ b
      rates.setdefault(dtype, {})[f"{m}x{k}x{n}"] = 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9
  return rates


def train_steps(gpt, model, batch: int, patch_sides: list[int], compiled: bool, precision: str = "float32"):
  """A callable running one step per entry of patch_sides, and the batch it trains on."""
  cfg = model.config
  grid = int(cfg.block_size ** 0.5)
  model.train()
  forward = torch.compile(model) if compiled else model
  opt = optimizer_for(model)
  g = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g)
  labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
  head_dim = cfg.dim // cfg.n_head
  freqs = {k: gpt.precompute_freqs_cis_2d(grid // k, head_dim, cfg.rope_base, cfg.cls_token_num)
           for k in set(patch_sides)}

  def run():
    for k in patch_sides:
      with autocast(precision):
        _, loss = forward(cond_idx=labels, idx=tokens, targets=tokens, p=k, patch_size=k * k, freqs_cis=freqs[k])
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

  return run


def measure(spec: dict, gpt, generate) -> float:
  model = make_model(gpt, spec["model"])
  precision = spec.get("precision", "float32")
  if spec["kind"] == "sample":
    model.eval()
    model.to(getattr(torch, precision))
    labels = torch.arange(spec["batch"]) % model.config.num_classes

    def run():
      with torch.inference_mode():
        generate(model, labels, model.config.block_size, cfg_scale=spec["cfg_scale"], temperature=1.0, top_k=0,
                 top_p=1.0, sample_logits=True)

    run()  # warm-up
    start = time.perf_counter()
    for _ in range(spec["repeats"]):
      run()
    return (time.perf_counter() - start) / spec["repeats"]
  if spec["kind"] == "train":
    step = train_steps(gpt, model, spec["batch"], [spec["patch_side"]], spec.get("compiled", False), precision)
    for _ in range(spec["warmup"]):
      step()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
      step()
    return (time.perf_counter() - start) / spec["steps"]
  if spec["kind"] == "schedule":  # wall-clock of a whole schedule, every patch side warmed up first
    sides = [k for k, n in spec["schedule"] for _ in range(n)]
    train_steps(gpt, model, spec["batch"], sorted(set(sides)), False, precision)()
    run = train_steps(gpt, model, spec["batch"], sides, False, precision)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
  raise ValueError(f"unknown measurement kind {spec['kind']!r}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--npp_repo", required=True)
  parser.add_argument("--llamagen_repo", default=None)
  parser.add_argument("--spec", required=True, help="the measurement, as JSON")
  args = parser.parse_args()
  spec = json.loads(args.spec)
  if spec["kind"] == "gemm":
    print(json.dumps({"gflops": gemm_rates(spec["shapes"])}))
    return
  gpt, generate = load_reference(args.npp_repo, args.llamagen_repo)
  seconds = measure(spec, gpt, generate)
  print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
  main()
