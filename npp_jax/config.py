"""The configuration every run starts from; files in configs/ override what differs.

`config.model` carries the reference's ModelArgs names, so a LlamaGen setting maps one to one. Config files are data:
they import this module (and `npp_jax.assets` for the shipped files' paths) and nothing else, and read no file when
loaded; what they need from the library is named here.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Sequence

import ml_collections

from npp_jax import assets
from npp_jax import errors
from npp_jax.data import sources
from npp_jax.models import vq

# LlamaGen's GPT sizes: (n_layer, n_head, dim). Head dim is 64 for all of them.
GPT_SIZES = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
}

IMAGENET_TRAIN_IMAGES = 1_281_167

# For config files, which import this module alone.
vq_config = vq.default_config  # the `vq` section: LlamaGen's VQ-16
data_config = sources.default_data_config  # the `data` section's source and views
grid_size = vq.grid_size  # side of a tokenizer's code grid
FASHION_MNIST_DIR = sources.FASHION_MNIST_DIR  # Debian's dataset-fashion-mnist


def fashion_tokenizer() -> ml_collections.ConfigDict:
  """The `vq` section of the shipped Fashion-MNIST tokenizer (npp_jax/assets/vq_fashion, trained with
  configs/vq_fashion.py): 32x32 images -> 8x8 codes from a 512x8 codebook. Loading it checks these fields against
  the directory's own config.json."""
  c = vq.default_config()
  c.update(dict(codebook_size=512, codebook_embed_dim=8, codebook_l2_norm=True, commit_loss_beta=0.25,
                ch=32, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=0,
                image_size=32, checkpoint=str(assets.FASHION_TOKENIZER)))
  return c


def model_config(size: str = "B", *, image_size: int = 256, downsample: int = 16) -> ml_collections.ConfigDict:
  """The GPT config of a LlamaGen size for a VQ-16 tokenizer at `image_size` pixels."""
  if size not in GPT_SIZES:
    raise errors.InvalidInput(f"unknown GPT size {size!r}; choose one of {sorted(GPT_SIZES)}")
  n_layer, n_head, dim = GPT_SIZES[size]
  m = ml_collections.ConfigDict()
  m.dim = dim
  m.n_layer = n_layer
  m.n_head = n_head
  m.vocab_size = 16384
  m.num_classes = 1000
  m.cls_token_num = 1
  m.block_size = (image_size // downsample) ** 2
  m.multiple_of = 256
  m.norm_eps = 1e-5
  m.rope_base = 10000
  m.initializer_range = 0.02
  m.token_dropout_p = 0.1
  m.resid_dropout_p = 0.1
  m.ffn_dropout_p = 0.1
  m.class_dropout_prob = 0.1
  # Execution choices (not part of the reference's ModelArgs; they do not change the parameters).
  m.dtype = "bfloat16"  # compute dtype; parameters stay float32
  # auto: on a CPU our attention, 'recompute' (keeping a log-sum-exp for the backward pass) from 256 positions on
  # and 'keep' (keeping the probabilities) below; jax's pick elsewhere; 'xla' everywhere, 'cudnn' on GPUs
  m.attention_impl = "auto"
  m.remat = "none"  # none | full | dots
  m.scan_layers = True
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("B")

  # Coarse-to-fine schedule: (patch side, fraction of the steps). The reference default is 2x2 then 1x1.
  c.npp = ml_collections.ConfigDict()
  c.npp.stages = ((2, 0.5), (1, 0.5))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.decay = "ndim>=2"  # ndim>=2 (reference DDP: matrices and embeddings) | no_norm (reference FSDP) | all | none
  c.optim.grad_clip = 1.0
  # 'constant' (the LlamaGen baseline) or 'stagewise': per stage, linear warmup from 0, constant, then linear
  # decay to end_lr over the last decay_fraction of the stage (the NPP reference's --scheduler).
  c.optim.schedule = "stagewise"
  c.optim.warmup_epochs = 1.0  # per stage (the reference's default; its paper says 5)
  c.optim.warmup_steps = -1  # >= 0 overrides warmup_epochs
  c.optim.decay_fraction = 0.2
  c.optim.end_lr = 1e-5
  c.optim.stage_lr_scales = ()  # one multiplier of lr per NPP stage, e.g. (2.0, 1.0); empty: lr in every stage
  c.optim.ema_decay = 0.0  # 0 disables EMA; e.g. 0.9999
  c.optim.mu_dtype = "float32"

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 256
  c.train.epochs = 300
  c.train.num_images = IMAGENET_TRAIN_IMAGES  # images per epoch (steps = epochs * num_images // batch)
  c.train.total_steps = 0  # > 0 overrides the epoch arithmetic
  c.train.grad_accum_steps = 1
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one entry may be -1 for "the remaining devices"
  c.mesh.topology = ""  # e.g. v5p-64 with --dry_run: compile for a TPU slice (needs libtpu)
  # A parameter dimension the mesh cannot split is kept whole on every device and listed at start; True: an error.
  c.mesh.require_sharded = False

  # The training input, plus (source, dir, augmentation, ...) what `python -m npp_jax.prepare` reads. With
  # kind=codes and no codes_dir, the trainer prepares WORKDIR/codes from the source itself (small datasets).
  c.data = sources.default_data_config()
  c.data.source = ""
  c.data.kind = "codes"  # codes (pre-extracted with npp_jax.prepare) | synthetic
  c.data.codes_dir = ""
  c.data.tokenizer_checksum = ""  # if set, codes made by another tokenizer are refused
  c.data.num_images = 4096  # synthetic data only
  c.data.read_threads = 4
  c.data.worker_count = 0
  c.data.prefetch = 2
  c.data.subset_per_class = 0  # > 0: train on this many images of each class (a seeded, class-balanced subset)
  c.data.subset_seed = 0
  # Held-out codes for eval.heldout_every: prepared codes of images the model never trains on, or (small datasets,
  # prepared like WORKDIR/codes) the source's split to prepare into WORKDIR/codes_<split>, e.g. 'test'.
  c.data.heldout_codes_dir = ""
  c.data.heldout_split = ""
  c.data.heldout_images = 2000  # a class-balanced selection of the held-out codes; 0: all

  # The tokenizer that decodes samples (and, for auto-prepared codes, encodes the data); empty checkpoint: none.
  c.vq = vq.default_config()

  # Training-time samples and metrics (needs vq.checkpoint): a grid with one row per class, and a metric.
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # steps between samples + metric; 0: only at the end
  c.eval.heldout_every = 0  # steps between held-out loss evaluations (needs held-out codes, see data); 0: never
  c.eval.grid_columns = 8
  c.eval.num_samples = 1000  # for the metric
  c.eval.batch_size = 250
  c.eval.classifier = ""  # 'fashion': the shipped Fashion-MNIST classifier's FD and label agreement
  c.eval.inception = ""  # pytorch-fid Inception weights, for FID on the samples against eval.reference
  c.eval.reference = ""  # an ADM-style reference batch .npz

  c.sample = ml_collections.ConfigDict()
  c.sample.cfg_scale = 2.0
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0

  c.init_from = ""  # a converted or trained checkpoint directory to start from (fine-tuning)
  return c


def imagenet_gpt(size: str, *, lr: float, cfg_scale: float) -> ml_collections.ConfigDict:
  """The paper's ImageNet-256 recipe for a LlamaGen size (configs/gpt_*.py): VQ-16 codes on a 16x16 grid."""
  c = base_config()
  c.model = model_config(size, image_size=256)
  c.model.remat = "full"  # fits every slice in the README's table; "none" is faster where memory allows
  c.optim.lr = lr
  c.sample.cfg_scale = cfg_scale
  return c


def differences(stored: dict[str, Any], current: dict[str, Any], sections: Sequence[str], *,
                ignore: Sequence[str] = ()) -> list[str]:
  """What differs in `sections` between a stored run's config and the current one (both as JSON dicts), as
  "section.field" ("section" for a plain value); fields named in `ignore` may differ.

  A field the stored run does not have was added to the code after it, with a default that keeps the old behaviour,
  so it does not count: a new trainer option neither stops a resume nor invalidates a finished run.
  """
  changed = []
  for section in sections:
    old, new = stored.get(section), current.get(section)
    if not (isinstance(old, dict) and isinstance(new, dict)):
      changed += [] if old == new else [section]
      continue
    changed += [f"{section}.{k}" for k in old if k not in ignore and old[k] != new.get(k)]
  return changed


def load_file(path: str) -> ml_collections.ConfigDict:
  """Imports a config file and returns its get_config()."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_npp_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise errors.InvalidInput(f"config file {path} defines no get_config()")
    return module.get_config()
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # whatever the file's own code raises
    raise errors.InvalidInput(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from None


def check_config_argument(argv: list[str]) -> None:
  """Loads the file of a `--config FILE` argument once, so that its errors are one ValueError (absl's config_flags
  would let a SyntaxError or the file's own exceptions through as a traceback)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      load_file(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(argv):
      load_file(argv[i + 1])
