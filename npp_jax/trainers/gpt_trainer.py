"""The training loop: mesh, data, sharded state (fresh or restored), one compiled step per NPP stage, and the
periodic actions (metrics, checkpoints, samples).

The step is a pure function `(state, batch) -> (state, metrics)` under jax.jit with explicit shardings and a
donated state; the model is split once (graphdef + pure parameter dict) and merged inside the step.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metrics as clu_metrics
from etils import epath
from flax import nnx

from npp_jax import errors
from npp_jax import npp
from npp_jax import sharding
from npp_jax.checkpoints import checkpoint
from npp_jax.data import pipeline
from npp_jax.data import prepare
from npp_jax.model_files import store
from npp_jax.models import gpt
from npp_jax.models import vq
from npp_jax.trainers import heldout as heldout_lib
from npp_jax.trainers import host_memory
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import monitor
from npp_jax.trainers import optim
from npp_jax.trainers import workdir as workdir_lib

StepMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    lr=clu_metrics.LastValue.from_output("lr"))


@dataclasses.dataclass
class Setup:
  """Everything the loop needs that does not change during a run."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: Any
  stages: list[npp.Stage]
  total_steps: int
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: dict  # ShapeDtypeStructs with shardings
  state_shardings: dict
  init_params: Callable[[], dict]  # fresh parameters (see `fresh_state`)
  state_from_params: Callable[[dict], dict]  # a training state around parameters (step 0, fresh optimizer state)
  unsharded: list[sharding.Unsharded] = dataclasses.field(default_factory=list)  # dimensions the mesh cannot split


def total_steps(config: ml_collections.ConfigDict, num_images: int) -> int:
  if config.train.total_steps > 0:
    return int(config.train.total_steps)
  return int(config.train.epochs * pipeline.steps_per_epoch(num_images, config.train.global_batch_size))


def warmup_steps(config: ml_collections.ConfigDict, num_images: int) -> int:
  if config.optim.warmup_steps >= 0:
    return int(config.optim.warmup_steps)
  return int(round(config.optim.warmup_epochs * pipeline.steps_per_epoch(num_images, config.train.global_batch_size)))


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_images: int) -> Setup:
  """Abstract model and state with their shardings, the optimizer and the stage schedule; allocates nothing."""
  model_cfg = config.model
  grid = gpt.grid_side(model_cfg)
  steps = total_steps(config, num_images)
  stages = npp.make_stages(config.npp.stages, steps, grid)
  _check_batch(config, mesh)
  seed_key = jax.random.key(config.seed)

  abstract_model = nnx.eval_shape(lambda: gpt.GPT(model_cfg, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract_model)
  param_shardings = sharding.param_shardings(abstract_model, mesh)
  abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  unsharded = sharding.unsharded_dimensions(sharding.logical_axes(abstract_model), abstract_params, mesh)
  if unsharded and config.mesh.require_sharded:
    raise errors.InvalidInput(f"{unsharded[0].sentence()}, and mesh.require_sharded is set; change the mesh "
                              f"shape or the model size")
  schedule = optim.learning_rate_schedule(config.optim, [(s.start, s.end) for s in stages],
                                          warmup_steps(config, num_images))
  tx = optim.make_optimizer(config.optim, schedule, abstract_params)

  def init_params() -> dict:
    model = gpt.GPT(model_cfg, rngs=nnx.Rngs(params=jax.random.fold_in(seed_key, 0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def state_from_params(params: dict) -> dict:
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if config.optim.ema_decay > 0:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state

  shapes = jax.eval_shape(lambda: state_from_params(init_params()))
  repl = sharding.replicated(mesh)
  state_shardings = {
      "step": repl,
      "params": param_shardings,
      "opt_state": optax.tree_map_params(tx, lambda _, s: s, shapes["opt_state"], param_shardings,
                                         transform_non_params=lambda _: repl),
  }
  if "ema" in shapes:
    state_shardings["ema"] = param_shardings
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                shapes, state_shardings)
  return Setup(config, mesh, graphdef, stages, steps, tx, schedule, abstract_state, state_shardings, init_params,
               state_from_params, unsharded)


def fresh_state(setup: Setup) -> dict:
  """A fresh training state, created already sharded (no parameter is ever whole on one device).

  The parameters first, then the state around them, in two programs: in one, XLA held every parameter's random bits
  beside the whole state (687 MiB above the state at GPT-B width, more than a train step's temporaries); in two,
  the peak is the state itself.
  """
  params = jax.jit(setup.init_params, out_shardings=setup.state_shardings["params"])()
  state = jax.jit(setup.state_from_params, out_shardings=setup.state_shardings, donate_argnums=0)(params)
  jax.block_until_ready(state)
  host_memory.release_freed()
  return state


def compile_train_step(setup: Setup, patch_side: int) -> Callable[[dict, dict], tuple[dict, StepMetrics]]:
  """`make_train_step` compiled before its first call, and the memory the compiler freed returned to the system
  before the step allocates its temporaries (`host_memory`)."""
  compiled = make_train_step(setup, patch_side).lower(setup.abstract_state, abstract_batch(setup)).compile()
  host_memory.release_freed()
  return compiled


def state_bytes_per_device(setup: Setup) -> dict[str, int]:
  """Parameter path -> bytes per device of the parameter and all the state shaped after it (the optimizer's
  moments, the EMA)."""
  state, params = setup.abstract_state, setup.abstract_state["params"]
  paths = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p, simple=True, separator="/"), params)
  shard_bytes = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
  # The optimizer's leaves shaped like parameters, each beside its parameter's path (its counters map to None).
  opt = lambda fn: jax.tree.leaves(optax.tree_map_params(setup.tx, fn, state["opt_state"], paths,
                                                         transform_non_params=lambda _: None))
  pairs = list(zip(opt(lambda _, path: path), opt(lambda leaf, _: shard_bytes(leaf))))
  for tree in [params] + ([state["ema"]] if "ema" in state else []):
    pairs += zip(jax.tree.leaves(paths), map(shard_bytes, jax.tree.leaves(tree)))
  totals: dict[str, int] = collections.defaultdict(int)
  for path, nbytes in pairs:
    totals[path] += nbytes
  return dict(totals)


def replication_lines(setup: Setup) -> list[str]:
  """One line per parameter dimension the mesh cannot split, with what keeping it whole costs each device."""
  if not setup.unsharded:
    return []
  per_device = state_bytes_per_device(setup)
  lines = [f"{u.sentence()}: {per_device[u.path] / 2**20:.3f} MiB per device with its optimizer state"
           for u in setup.unsharded]
  total = sum(per_device[p] for p in {u.path for u in setup.unsharded})
  return lines + [f"{len({u.path for u in setup.unsharded})} parameters not fully sharded, {total / 2**20:.3f} MiB "
                  f"per device with their optimizer state (mesh.require_sharded=True makes this an error)"]


def _check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  batch, accum = config.train.global_batch_size, config.train.grad_accum_steps
  if accum < 1 or batch % accum:
    raise errors.InvalidInput(f"train.global_batch_size={batch} is not a multiple of train.grad_accum_steps={accum}")
  divisor = sharding.batch_divisor(mesh)
  if (batch // accum) % divisor:
    raise errors.InvalidInput(f"the micro-batch of {batch // accum} does not split over the {divisor} devices of the "
                              f"mesh's data and fsdp axes")
  if batch % jax.process_count():
    raise errors.InvalidInput(f"train.global_batch_size={batch} does not split over {jax.process_count()} processes")


def make_train_step(setup: Setup, patch_side: int) -> Callable[[dict, dict], tuple[dict, StepMetrics]]:
  """The jitted step of a stage; one compilation per patch side."""
  config, graphdef, tx = setup.config, setup.graphdef, setup.tx
  accum = config.train.grad_accum_steps
  root_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  batch_sharding = sharding.batch_sharding(setup.mesh)
  dropout = any(config.model[k] > 0 for k in ("token_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                                                "class_dropout_prob"))

  def loss_fn(params, tokens, labels, key):
    model = nnx.merge(graphdef, params)
    with sharding.activation_sharding(setup.mesh):
      logits = model(tokens, labels, patch_side=patch_side, deterministic=not dropout, dropout_rng=key)
    return npp.patch_loss(logits, tokens, patch_side)

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state: dict, batch: dict) -> tuple[dict, StepMetrics]:
    step_key = jax.random.fold_in(root_key, state["step"])
    params = state["params"]
    if accum == 1:
      loss, grads = grad_fn(params, batch["tokens"], batch["labels"], step_key)
    else:
      # Real accumulation: the global batch is split into `accum` micro-batches whose mean gradient is applied once.
      micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
          micro_batches(x, accum), jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(
              None, sharding.BATCH_AXES))), batch)

      def body(carry, inputs):
        i, tokens, labels = inputs
        loss, grads = grad_fn(params, tokens, labels, jax.random.fold_in(step_key, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro["tokens"], micro["labels"]))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    if "ema" in state:
      new_state["ema"] = optim.ema_update(state["ema"], new_params, config.optim.ema_decay)
    step_metrics = StepMetrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), lr=setup.schedule(state["step"]))
    return new_state, step_metrics

  return jax.jit(step, in_shardings=(setup.state_shardings, {"tokens": batch_sharding, "labels": batch_sharding}),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)), donate_argnums=(0,))


def micro_batches(x: jax.Array, accum: int) -> jax.Array:
  """(B, ...) -> (accum, B / accum, ...), micro-batch m holding rows m, m + accum, m + 2 accum, ...

  The batch is split over devices in contiguous rows, so every device's share of every micro-batch is rows it
  already holds (as MaxText forms them). Cutting the batch into contiguous blocks instead would put micro-batch 0
  on the first devices and move the whole batch between devices on every step.
  """
  return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def abstract_batch(setup: Setup) -> dict:
  """The global batch's shapes; the same for every stage (the model groups the full grid into patches)."""
  batch = setup.config.train.global_batch_size
  sh = sharding.batch_sharding(setup.mesh)
  return {"tokens": jax.ShapeDtypeStruct((batch, setup.config.model.block_size), jnp.int32, sharding=sh),
          "labels": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sh)}


def log(message: str) -> None:
  """Progress for the user, from process 0 only (absl logging: stderr from `python -m npp_jax.main`)."""
  if jax.process_index() == 0:
    logging.info("%s", message)


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the final state."""
  mesh = mesh or sharding.make_mesh(config.mesh.shape)
  _check_before_writing(config, mesh)
  with workdir_lib.Run(workdir, log) as run_dir:
    return _run(config, run_dir, mesh)


# Config fields that name a file or directory the run reads (when set).
INPUT_PATHS = ("init_from", "vq.checkpoint", "data.codes_dir", "eval.inception", "eval.reference")


def _check_before_writing(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """What can refuse the run beyond the config's schema, checked before the workdir is touched: the paths it reads,
  the batch over the mesh's devices, and init_from's parameter shapes (from its metadata)."""
  for field in INPUT_PATHS:
    section, _, name = field.rpartition(".")
    path = (config[section] if section else config).get(name, "")
    if path and not epath.Path(path).exists():
      raise FileNotFoundError(f"{field}={path!r} does not exist")
  _check_batch(config, mesh)
  if config.init_from:
    abstract_model = nnx.eval_shape(lambda: gpt.GPT(config.model, rngs=nnx.Rngs(0)))
    checkpoint.check_params_fit(config.init_from, nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)),
                                config.model)


def _run(config: ml_collections.ConfigDict, run_dir: workdir_lib.Run, mesh: jax.sharding.Mesh | None) -> dict:
  mesh = mesh or sharding.make_mesh(config.mesh.shape)
  tokenizer = _load_tokenizer(config)
  codes_dir = _codes_dir(config, run_dir.path)
  checksum = config.data.tokenizer_checksum or (tokenizer[1] if tokenizer else "")
  spec = pipeline.InputSpec(config.model.vocab_size, gpt.grid_side(config.model), config.model.num_classes,
                            checksum)
  data = pipeline.TrainInput(config.data, spec, global_batch=config.train.global_batch_size, seed=config.seed,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             codes_dir=codes_dir)
  setup = build(config, mesh, data.num_images)
  log(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} devices ({jax.process_count()} processes), "
      f"{jax.devices()[0].device_kind}")
  log(f"parameters: {gpt.num_parameters(config.model):,}")
  for line in replication_lines(setup):
    log(line)
  log(f"data: {data.num_images:,} images, {setup.total_steps:,} steps of {config.train.global_batch_size}")
  log("stages: " + ", ".join(f"{s.patch_side}x{s.patch_side} patches for steps [{s.start}, {s.end})"
                             for s in setup.stages))
  log(f"input tokens relative to next-token prediction: {npp.tokens_per_step_fraction(setup.stages):.3f}")

  heldout = _heldout_loss(setup, run_dir.path, spec)
  run_dir.open(config, keep=config.train.keep_checkpoints)
  state, start = run_dir.restore_or_init(setup.abstract_state, data.fingerprint, lambda: _initial_state(setup))
  watcher = None
  if tokenizer:
    watcher = monitor.Monitor(config, run_dir.path, run_dir.writer, setup.graphdef, tokenizer[0])
  state, finished = _loop(setup, state, start, data, run_dir, watcher, heldout)
  if finished:
    run_dir.finish(setup.total_steps, restored_final=start == setup.total_steps)
  return state


def _load_tokenizer(config: ml_collections.ConfigDict):
  """(VQ model, its checksum), or None when the config names no tokenizer."""
  if "vq" not in config or not config.vq.checkpoint:
    return None
  model = store.load_vq(config.vq)
  if config.vq.codebook_size != config.model.vocab_size:
    raise errors.InvalidInput(f"the tokenizer has {config.vq.codebook_size} codes but model.vocab_size="
                              f"{config.model.vocab_size}")
  return model, vq.params_checksum(model)


def _codes_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The codes to train on; small datasets (data.source set, no codes_dir) are prepared into WORKDIR/codes."""
  if config.data.kind != "codes" or config.data.codes_dir or not config.data.source:
    return None
  return prepare.prepare_once(config, str(epath.Path(workdir) / "codes"), log)


def _heldout_loss(setup: Setup, workdir: str, spec: pipeline.InputSpec) -> heldout_lib.HeldoutLoss | None:
  """The held-out loss of eval.heldout_every, on data.heldout_codes_dir or on WORKDIR/codes_<data.heldout_split>
  (prepared once, like WORKDIR/codes); None when it is off."""
  config = setup.config
  if not config.eval.heldout_every:
    return None
  directory = prepare.heldout_codes_once(config, workdir, log)
  codes = pipeline.heldout_codes(directory, spec, int(config.data.heldout_images))
  loss = heldout_lib.HeldoutLoss(codes, setup.graphdef, setup.mesh, int(config.train.global_batch_size),
                                 setup.state_shardings["params"])
  log(f"held-out loss every {config.eval.heldout_every} steps on {loss.num_images:,} images of {directory}")
  return loss


def _initial_state(setup: Setup) -> dict:
  """A fresh state, created already sharded (no parameter is ever whole on one device), or init_from's weights."""
  config = setup.config
  state = fresh_state(setup)
  if config.init_from:
    params = checkpoint.restore_params(config.init_from, setup.abstract_state["params"], model_config=config.model)
    state["params"] = params
    if "ema" in state:
      state["ema"] = jax.tree.map(jnp.copy, params)
    log(f"initialised the parameters from {config.init_from}")
  return state


def _loop(setup: Setup, state: dict, start: int, data: pipeline.TrainInput, run_dir: workdir_lib.Run,
          watcher, heldout: heldout_lib.HeldoutLoss | None) -> tuple[dict, bool]:
  """Trains from `start`; returns (state, whether the last step was reached)."""
  config = setup.config
  steps_fns: dict[int, Callable] = {}
  batches = data.iterator(start_batch=start)
  accumulated: StepMetrics | None = None
  stage = None
  started, last_log, last_log_step = time.time(), time.time(), start
  meta = lambda s, st: {"step": s, "stage": st.index, "patch_side": st.patch_side, "data": data.fingerprint,
                        "has_ema": "ema" in state}
  step = start
  for step in range(start, setup.total_steps):
    current = npp.stage_at(setup.stages, step)
    if current != stage:
      stage = current
      log(f"step {step}: stage {stage.index} starts, {stage.patch_side}x{stage.patch_side} patches, "
          f"sequence length {npp.coarse_grid(gpt.grid_side(config.model), stage.patch_side) ** 2}")
      if stage.patch_side not in steps_fns:
        steps_fns[stage.patch_side] = compile_train_step(setup, stage.patch_side)
    batch = sharding.global_batch(next(batches), setup.mesh)
    state, step_metrics = steps_fns[stage.patch_side](state, batch)
    accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
    done = step + 1
    last = done == setup.total_steps
    if done % config.train.log_every == 0 or last:
      values = {k: float(v) for k, v in accumulated.compute().items()}
      accumulated = None
      run_dir.check_finite(values, done)
      now = time.time()
      values.update(_throughput(config, stage, done - last_log_step, now - last_log))
      values.update(stage=stage.index, patch_side=stage.patch_side)
      run_dir.writer.scalars(done, values)
      log(metrics_lib.progress_line(done, setup.total_steps, values, started, start))
      if last_log_step == start and done - start < config.train.log_every and not last:
        log(f"step {done}: the loss and grad_norm above average the {done - start} steps since the resume at "
            f"step {start}, not {config.train.log_every}")
      last_log, last_log_step = now, done
    stop = run_dir.stop_requested(done, config.train.log_every)
    if done % config.train.checkpoint_every == 0 or last or stop:
      run_dir.check_finite({k: float(v) for k, v in step_metrics.compute().items()}, done)
      run_dir.save(done, state, meta(done, stage))
    if heldout and (done % config.eval.heldout_every == 0 or last):
      value = heldout(state.get("ema", state["params"]))
      run_dir.writer.scalars(done, {"heldout_loss": value})
      log(f"step {done}: heldout_loss={value:.4f}")
    if watcher and ((config.eval.every and done % config.eval.every == 0) or last):
      values = watcher(done, state.get("ema", state["params"]))
      if values:
        log(f"step {done}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))
    if stop:
      run_dir.leave(done)
      return state, False
  return state, step + 1 >= setup.total_steps


def _throughput(config: ml_collections.ConfigDict, stage: npp.Stage, steps: int, seconds: float) -> dict:
  seconds = max(seconds, 1e-9)
  seq_len = npp.coarse_grid(gpt.grid_side(config.model), stage.patch_side) ** 2
  batch = config.train.global_batch_size
  flops = metrics_lib.train_flops_per_sequence(config.model, seq_len) * batch * steps / seconds
  values = {"steps_per_s": steps / seconds, "tokens_per_s": steps * batch * seq_len / seconds,
            "images_per_s": steps * batch / seconds, "tflops_per_s_per_device": flops / jax.device_count() / 1e12}
  peak = metrics_lib.peak_flops(jax.devices()[0])
  if peak:
    values["mfu"] = flops / jax.device_count() / peak
  return values
