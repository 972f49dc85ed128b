"""What every config field allows, checked when a command loads its config: before anything is written or compiled.

ml_collections gives each field the type of its default (a `--config.key=value` of another type is refused by the
flag parser, and a locked config takes no new field); this module adds the rest, one line per field:

  "train.keep_checkpoints": integer(1, why="0 would delete every checkpoint as it is saved"),

and the rules that join fields (a patch side divides the code grid, the batch divides over the mesh). A violation is
one `errors.InvalidInput` sentence that names the field, its value and what is allowed. Each command names its
schema (TRAINER, TOKENIZER, ...); a field that its schema does not know is refused too, so a misspelt field in a
config file is not silently ignored. Adding a field to a config is one line here beside it; the tests take their
bad values from these rules, so the new field is covered by that line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping

import ml_collections

from npp_jax import errors
from npp_jax import npp
from npp_jax.data import augment
from npp_jax.data import sources
from npp_jax.models import gpt
from npp_jax.models import vq
from npp_jax.trainers import optim
from npp_jax.trainers import vq_losses

# ----------------------------------------------------------------------------------------------------------------------
# Rules of one field.


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field allows: `accepts(value)`, `allowed` in words, and `refused`: values that break it (one out of
  range, one of a wrong type, one wrong choice, as the rule has them), for the tests and the bench."""

  allowed: str
  accepts: Callable[[Any], bool]
  refused: tuple[Any, ...] = ()
  why: str = ""  # what the refused values would do, where that is not obvious

  def explain(self, why: str) -> Rule:
    return dataclasses.replace(self, why=why)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _bounds(low, high, above, below) -> tuple[str, Callable[[Any], bool], list[Any]]:
  """Words, test and out-of-range examples for the bounds low <= v <= high, above < v < below (None: unbounded)."""
  words, tests, outside = [], [], []
  if low is not None:
    words.append(f">= {low}")
    tests.append(lambda v: v >= low)
    outside.append(low - 1)
  if above is not None:
    words.append(f"> {above}")
    tests.append(lambda v: v > above)
    outside.append(above)
  if high is not None:
    words.append(f"<= {high}")
    tests.append(lambda v: v <= high)
    outside.append(high + 1)
  if below is not None:
    words.append(f"< {below}")
    tests.append(lambda v: v < below)
    outside.append(below)
  return " and ".join(words), lambda v: all(t(v) for t in tests), outside


def integer(low: int | None = None, high: int | None = None, *, why: str = "") -> Rule:
  words, inside, outside = _bounds(low, high, None, None)
  return Rule(f"an integer {words}".strip(), lambda v: _is_int(v) and inside(v), (*outside, 1.5, "x"), why)


def number(low: float | None = None, high: float | None = None, *, above: float | None = None,
           below: float | None = None, why: str = "") -> Rule:
  words, inside, outside = _bounds(low, high, above, below)
  return Rule(f"a number {words}".strip(), lambda v: _is_number(v) and inside(v), (*outside, "x"), why)


def choice(*options: Any, why: str = "") -> Rule:
  wrong_type = 3 if all(isinstance(o, str) for o in options) else "x"
  return Rule(f"one of {', '.join(repr(o) for o in options)}", lambda v: v in options and type(v) is type(options[0]),
              ("bogus", wrong_type), why)


def boolean() -> Rule:
  return Rule("True or False", lambda v: isinstance(v, bool), ("maybe",))


def text(what: str = "a string") -> Rule:
  return Rule(what, lambda v: isinstance(v, str), (3,))


def integers(low: int, *, length: int | None = None, min_length: int = 0) -> Rule:
  """A tuple of integers >= low (of `length` entries, or at least `min_length`)."""
  size = f"{length} " if length else ("one or more " if min_length else "")
  def accepts(v):
    return (isinstance(v, (tuple, list)) and all(_is_int(x) and x >= low for x in v)
            and (len(v) == length if length else len(v) >= min_length))
  refused = ((low - 1,) * (length or 1), ("x",) * (length or 1)) + (((),) if min_length else ())
  return Rule(f"a tuple of {size}integers >= {low}", accepts, refused)


def numbers(*, above: float, min_length: int = 0) -> Rule:
  size = "one or more " if min_length else ""
  return Rule(f"a tuple of {size}numbers > {above}", lambda v: isinstance(v, (tuple, list)) and len(v) >= min_length
              and all(_is_number(x) and x > above for x in v), ((above,), ("x",)) + (((),) if min_length else ()))


def strings(*options: str, min_length: int = 1) -> Rule:
  return Rule(f"a tuple of one or more of {', '.join(map(repr, options))}", lambda v: isinstance(v, (tuple, list))
              and len(v) >= min_length and all(x in options for x in v), ((), ("bogus",)))


def _is_mesh_shape(v: Any) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(s) and (s >= 1 or s == -1) for s in v)
          and list(v).count(-1) <= 1)


MESH_SHAPE = Rule("3 integer sizes (data, fsdp, tensor), each >= 1, one of them may be -1 for the remaining devices",
                  _is_mesh_shape, ((0, 1, 1), (-1, -1, 1), (1, 1), ("abc",)))


def _is_stages(v: Any) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) >= 1 and all(
      isinstance(s, (tuple, list)) and len(s) == 2 and _is_int(s[0]) and s[0] >= 1 and _is_number(s[1]) and s[1] > 0
      for s in v))


STAGES = Rule("one or more (patch side >= 1, fraction of the steps > 0) pairs, e.g. ((2, 0.5), (1, 0.5))", _is_stages,
              ((), ((0, 1.0),), ((2, -0.5), (1, 1.5)), ("x",)))
# A section a command reads as a whole and checks itself (a study's arms: partial trainer configs).
MAPPING = Rule("a mapping of field names to values", lambda v: isinstance(v, (Mapping, ml_collections.ConfigDict)))

PROBABILITY = number(0.0, below=1.0)
FRACTION = number(0.0, 1.0)
POSITIVE = number(above=0.0)
PATH = text("a path ('' for none)")
COUNT = integer(1)

# ----------------------------------------------------------------------------------------------------------------------
# The sections. A path names a field; a section shared by several configs is written once and placed under a name.

MODEL = {
    "dim": COUNT,
    "n_layer": COUNT,
    "n_head": COUNT,
    "vocab_size": integer(2),
    "num_classes": COUNT,
    "cls_token_num": choice(1, why="class-conditional models use one class token"),
    "block_size": COUNT,
    "multiple_of": COUNT,
    "norm_eps": POSITIVE,
    "rope_base": POSITIVE,
    "initializer_range": POSITIVE,
    "token_dropout_p": PROBABILITY,
    "resid_dropout_p": PROBABILITY,
    "ffn_dropout_p": PROBABILITY,
    "class_dropout_prob": FRACTION,
    "dtype": choice("float32", "bfloat16"),
    "attention_impl": choice("auto", "recompute", "keep", "xla", "cudnn"),
    "remat": choice("none", "full", "dots"),
    "scan_layers": boolean(),
}

VQ = {
    "codebook_size": integer(2),
    "codebook_embed_dim": COUNT,
    "codebook_l2_norm": boolean(),
    "commit_loss_beta": number(0.0),
    "encoder_ch_mult": integers(1, min_length=1),
    "decoder_ch_mult": integers(1, min_length=1),
    "z_channels": COUNT,
    "ch": COUNT,
    "num_res_blocks": integer(0),
    "dropout_p": PROBABILITY,
    "image_size": COUNT,
    "checkpoint": PATH,
}

OPTIM = {
    "lr": POSITIVE,
    "b1": PROBABILITY,
    "b2": PROBABILITY,
    "eps": POSITIVE,
    "weight_decay": number(0.0),
    "decay": choice("ndim>=2", "no_norm", "all", "none"),
    "grad_clip": number(0.0).explain("0 turns clipping off"),
    "schedule": choice(*optim.SCHEDULES),
    "warmup_epochs": number(0.0),
    "warmup_steps": integer(-1).explain("-1 takes optim.warmup_epochs"),
    "decay_fraction": FRACTION,
    "end_lr": number(0.0),
    "stage_lr_scales": numbers(above=0.0),
    "ema_decay": PROBABILITY,
    "mu_dtype": choice("float32", "bfloat16"),
}

DATA_SOURCE = {  # what `python -m npp_jax.prepare` and the tokenizer trainer read (sources.default_data_config)
    "source": choice(*sources.SOURCES),
    "dir": PATH,
    "split": choice("train", "val", "test"),
    "class_order": PATH,
    "allow_empty_classes": boolean(),
    "augmentation": choice(*augment.AUGMENTATIONS),
    "image_size": integer(0).explain("0 takes vq.image_size"),
    "crop_range": number(1.0),
    "extra_crop_range": number(0.0),
    "pad_value": integer(0, 255),
    "shard_size": COUNT,
    "encode_batch_size": COUNT,
    "num_threads": integer(0).explain("0 uses every CPU"),
}

TRAINER_DATA = {
    **DATA_SOURCE,
    "source": choice("", *sources.SOURCES, why="'' trains on data.codes_dir or synthetic codes"),
    "kind": choice("codes", "synthetic"),
    "codes_dir": PATH,
    "tokenizer_checksum": text(),
    "num_images": COUNT,
    "read_threads": COUNT,
    "worker_count": integer(0),
    "prefetch": integer(0),
    "subset_per_class": integer(0).explain("0 trains on every image"),
    "subset_seed": integer(0),
    "heldout_codes_dir": PATH,
    "heldout_split": choice("", "train", "val", "test", why="'' prepares no held-out codes"),
    "heldout_images": integer(0).explain("0 scores every held-out image"),
}

TRAIN = {
    "global_batch_size": COUNT,
    "epochs": COUNT,
    "num_images": COUNT,
    "total_steps": integer(0).explain("0 counts the steps from train.epochs"),
    "grad_accum_steps": COUNT,
    "log_every": COUNT,
    "checkpoint_every": COUNT,
    "keep_checkpoints": integer(1, why="0 would delete every checkpoint as it is saved"),
}

EVAL = {
    "every": integer(0).explain("0 evaluates at the end only"),
    "heldout_every": integer(0).explain("0 never scores held-out codes"),
    "grid_columns": COUNT,
    "num_samples": COUNT,
    "batch_size": COUNT,
    "classifier": choice("", "fashion"),
    "inception": PATH,
    "reference": PATH,
}

SAMPLE = {
    "cfg_scale": number(1.0).explain("1 is no guidance"),
    "temperature": POSITIVE,
    "top_k": integer(0).explain("0 keeps every token"),
    "top_p": number(above=0.0, high=1.0),
}


def within(section: str, fields: Mapping[str, Rule]) -> dict[str, Rule]:
  return {f"{section}.{name}": rule for name, rule in fields.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Rules that join fields: (the fields, a check that returns the sentence of a violation or None).


@dataclasses.dataclass(frozen=True)
class Joint:
  fields: tuple[str, ...]
  check: Callable[[ml_collections.ConfigDict], str | None]


def _library_check(fields: str, check: Callable[[ml_collections.ConfigDict], Any]) -> Joint:
  """A joint rule that a library function already states: its InvalidInput, prefixed with the fields' values."""
  names = tuple(fields.split())

  def run(c):
    try:
      check(c)
    except errors.InvalidInput as e:
      if all(f"{n}=" in str(e) for n in names):  # the library's sentence already names them
        return str(e)
      values = ", ".join(f"{n}={value_at(c, n)!r}" for n in names)
      return f"{values}: {e}"
    return None
  return Joint(names, run)


def _stages_fit(c) -> None:
  grid = gpt.grid_side(c.model)
  npp.make_stages(c.npp.stages, c.train.total_steps or 10**9, grid)


def _batch_fits(c) -> str | None:
  batch, accum = c.train.global_batch_size, c.train.grad_accum_steps
  if batch % accum:
    return (f"train.global_batch_size={batch} is not a multiple of train.grad_accum_steps={accum}; each "
            "accumulation step takes an equal micro-batch")
  data, fsdp, _ = c.mesh.shape
  if -1 not in (data, fsdp) and (batch // accum) % (data * fsdp):
    micro = f" (micro-batch {batch // accum})" if accum > 1 else ""
    return (f"train.global_batch_size={batch}{micro} does not split over the {data * fsdp} devices of "
            f"mesh.shape={tuple(c.mesh.shape)}'s data and fsdp axes; use a multiple of {data * fsdp * accum}")
  return None


def heldout_data_missing(c) -> str | None:
  """Why the held-out loss cannot run (eval.heldout_every without held-out codes), or None."""
  if c.eval.heldout_every and not (c.data.heldout_codes_dir or (c.data.heldout_split and c.data.source)):
    return (f"eval.heldout_every={c.eval.heldout_every} needs held-out codes: set data.heldout_codes_dir, or "
            "data.source and data.heldout_split")
  return None


def _heads_fit(c) -> str | None:
  if c.model.dim % c.model.n_head:
    return f"model.dim={c.model.dim} is not divisible by model.n_head={c.model.n_head}"
  return None


def _stage_scales_fit(c) -> str | None:
  scales, stages = tuple(c.optim.stage_lr_scales), tuple(c.npp.stages)
  if scales and len(scales) != len(stages):
    return (f"optim.stage_lr_scales={scales} needs one entry per stage of npp.stages ({len(stages)}), or none at "
            "all")
  return None


def _tokenizer_fits(c) -> str | None:
  if not c.vq.checkpoint:
    return None
  if c.vq.codebook_size != c.model.vocab_size:
    return (f"model.vocab_size={c.model.vocab_size} differs from vq.codebook_size={c.vq.codebook_size}; the GPT "
            "predicts the tokenizer's codes")
  side = vq.grid_size(c.vq)
  if c.model.block_size != side * side:
    return (f"model.block_size={c.model.block_size} differs from the {side}x{side}={side * side} codes the tokenizer "
            f"makes of vq.image_size={c.vq.image_size}")
  return None


def _vq_grid(c) -> None:
  vq.grid_size(c.vq)


def _tokenizer_data_fits(c) -> str | None:
  if c.data.image_size != c.vq.image_size:
    return (f"data.image_size={c.data.image_size} differs from vq.image_size={c.vq.image_size}; the tokenizer trains "
            "at its own input size")
  return None


# ----------------------------------------------------------------------------------------------------------------------
# The schemas of the commands.


@dataclasses.dataclass(frozen=True)
class Schema:
  """The fields a command's config may have (its rules by path) and the rules that join them."""

  name: str
  fields: Mapping[str, Rule]
  joints: tuple[Joint, ...] = ()
  sections: tuple[str, ...] | None = None  # the top-level sections the command reads; None: all of them

  def rule(self, path: str) -> Rule | None:
    return self.fields.get(path)


TRAINER = Schema("trainer", {
    "seed": integer(0),
    "init_from": PATH,
    **within("model", MODEL),
    "npp.stages": STAGES,
    **within("optim", OPTIM),
    **within("train", TRAIN),
    "mesh.shape": MESH_SHAPE,
    "mesh.topology": text("a TPU topology such as 'v5p-64', or ''"),
    "mesh.require_sharded": boolean(),
    **within("data", TRAINER_DATA),
    **within("vq", VQ),
    **within("eval", EVAL),
    **within("sample", SAMPLE),
}, (
    _library_check("model.block_size", lambda c: gpt.grid_side(c.model)),
    _library_check("npp.stages model.block_size", _stages_fit),
    Joint(("model.dim", "model.n_head"), _heads_fit),
    Joint(("train.global_batch_size", "train.grad_accum_steps", "mesh.shape"), _batch_fits),
    Joint(("optim.stage_lr_scales", "npp.stages"), _stage_scales_fit),
    _library_check("vq.image_size vq.encoder_ch_mult", _vq_grid),
    Joint(("vq.checkpoint", "model.vocab_size", "model.block_size"), _tokenizer_fits),
    Joint(("eval.heldout_every", "data.heldout_codes_dir", "data.heldout_split", "data.source"), heldout_data_missing),
))

TOKENIZER = Schema("tokenizer trainer", {
    "seed": integer(0),
    **within("vq", VQ),
    **within("data", DATA_SOURCE),
    "data.val_images": COUNT,
    **within("optim", {k: OPTIM[k] for k in ("lr", "end_lr", "schedule", "warmup_steps", "decay_fraction", "b1", "b2",
                                              "eps", "weight_decay", "decay", "grad_clip", "mu_dtype")}),
    "optim.warmup_steps": integer(0),
    **within("train", {
        "batch_size": COUNT,
        "steps": COUNT,
        "l1_weight": number(0.0),
        "codebook_weight": number(0.0),
        "restart_every": integer(0).explain("0 never restarts unused codes"),
        "restart_until": FRACTION,
        "log_every": COUNT,
        "eval_every": COUNT,
        "eval_batch_size": COUNT,
        "checkpoint_every": COUNT,
        "keep_checkpoints": TRAIN["keep_checkpoints"],
        "init_from": PATH,
        "freeze": Rule(f"a tuple of parts to hold fixed: any of {', '.join(map(repr, vq.PARTS))}, () for none",
                       lambda v: isinstance(v, (tuple, list)) and all(x in vq.PARTS for x in v), (("bogus",), "x")),
    }),
    "perceptual.weight": number(0.0).explain("0 turns the perceptual term off"),
    "perceptual.network": choice(*vq_losses.PERCEPTUAL_NETWORKS),
    "perceptual.classifier": PATH,
    "perceptual.vgg_weights": PATH,
    "perceptual.lpips_weights": PATH,
    "disc.weight": number(0.0).explain("0 turns the discriminator off"),
    "disc.start": integer(0),
    "disc.loss": choice(*vq_losses.D_LOSSES),
    "disc.gen_loss": choice(*vq_losses.GEN_LOSSES),
    "disc.adaptive_weight": boolean(),
    "disc.channels": COUNT,
    "disc.layers": COUNT,
    "disc.lr": POSITIVE,
}, (
    _library_check("vq.image_size vq.encoder_ch_mult", _vq_grid),
    Joint(("data.image_size", "vq.image_size"), _tokenizer_data_fits),
))

CLASSIFIER = Schema("classifier trainer", {
    "data_dir": PATH,
    "steps": COUNT,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "weight_decay": number(0.0),
    "warmup": integer(0),
    "seed": integer(0),
})

# `prepare` reads the data and vq sections of any config (a trainer's, a tokenizer's or its own).
PREPARE = Schema("prepare", {**within("data", TRAINER_DATA), "data.val_images": COUNT, **within("vq", VQ)}, (
    _library_check("vq.image_size vq.encoder_ch_mult", _vq_grid),
), sections=("data", "vq"))

STUDY = Schema("study", {
    **TRAINER.fields,
    "study.arms": MAPPING,
    "study.baseline": text("the name of one of study.arms"),
    "study.seeds": integers(0, min_length=1),
    "study.also_against": Rule("a tuple of names of study.arms", lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(x, str) for x in v), (("x", 1),)),
    "study.budget_unit": choice("steps", "epochs"),
    "study.budgets": numbers(above=0.0, min_length=1),
    "study.heldout_points": integer(0).explain("0 never scores held-out codes"),
    "study.match": strings("images", "flops"),
    "study.num_samples": COUNT,
    "study.eval_seed": integer(0),
    "study.bootstrap": COUNT,
    "study.cfg_sweep": numbers(above=0.0),
    "study.quick": boolean(),
    "study.quick_overrides": MAPPING,
}, TRAINER.joints)

# What `sample` and `convert` read of a trainer's (or a tokenizer's) config: the model, the tokenizer, the sampling.
MODEL_ONLY = Schema("model", {**within("model", MODEL), **within("sample", SAMPLE), **within("vq", VQ)}, (
    _library_check("model.block_size", lambda c: gpt.grid_side(c.model)),
    Joint(("model.dim", "model.n_head"), _heads_fit),
    _library_check("vq.image_size vq.encoder_ch_mult", _vq_grid),
), sections=("model", "sample", "vq"))

# ----------------------------------------------------------------------------------------------------------------------
# Checking.


def value_at(config: Any, path: str) -> Any:
  """The value of a dotted path ('train.log_every'); KeyError or AttributeError where there is none."""
  for name in path.split("."):
    config = config[name]
  return config


def leaves(config: Any, schema: Schema, prefix: str = "") -> list[tuple[str, Any]]:
  """(path, value) of every field, down to a field the schema has a rule for (a MAPPING rule takes a whole section)."""
  found = []
  for name, value in config.items():
    path = f"{prefix}{name}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)) and schema.rule(path) is None:
      found += leaves(value, schema, path + ".")
    else:
      found.append((path, value))
  return found


def unknown_field(path: str, schema: Schema) -> str | None:
  """The sentence for a path that names no field of the schema (nor lies in a MAPPING section), else None."""
  parts = path.split(".")
  if any(schema.rule(".".join(parts[:i])) for i in range(1, len(parts) + 1)):
    return None
  if schema.sections is not None and parts[0] not in schema.sections:
    return None  # a section this command does not read
  close = difflib.get_close_matches(path, schema.fields, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  return f"{path} is not a field of the {schema.name} config{hint}"


def refusal(path: str, value: Any, rule: Rule) -> str:
  """The sentence for a value a rule refuses."""
  why = f" ({rule.why})" if rule.why else ""
  return f"{path}={value!r} is not allowed: it must be {rule.allowed}{why}"


def check(config: ml_collections.ConfigDict, schema: Schema) -> None:
  """Raises InvalidInput (one sentence) on the first field the schema does not know or whose value it refuses, then on
  the first joint rule broken; only the schema's sections are read."""
  sections = schema.sections
  for path, value in leaves(config, schema):
    if sections is not None and path.split(".")[0] not in sections:
      continue
    rule = schema.rule(path)
    if rule is None:
      raise errors.InvalidInput(unknown_field(path, schema))
    if not rule.accepts(value):
      raise errors.InvalidInput(refusal(path, value, rule))
  for joint in schema.joints:
    if sections is not None and any(f.split(".")[0] not in sections for f in joint.fields):
      continue
    if all(has_field(config, f) for f in joint.fields):
      message = joint.check(config)
      if message:
        raise errors.InvalidInput(message)


def has_field(config: Any, path: str) -> bool:
  try:
    value_at(config, path)
  except (KeyError, AttributeError):
    return False
  return True
