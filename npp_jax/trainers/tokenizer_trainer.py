"""Trains the VQ tokenizer (the pipeline's own `VQModel`) on Fashion-MNIST, e.g. the one shipped in
npp_jax/assets/vq_fashion.

  python -m npp_jax.train_tokenizer --config configs/vq_fashion.py --workdir DIR [--config.key=value ...]

Losses are LlamaGen's VQ losses without its perceptual (LPIPS) and adversarial (PatchGAN) terms, which need a
pretrained VGG and a discriminator and would cost several times this CPU run:

  loss = mse + l1_weight * l1 + codebook_weight * (codebook_loss + commit_loss)

with codebook_loss = |z_q - sg(z)|^2 and commit_loss = beta * |sg(z_q) - z|^2 on the L2-normalised vectors (the
model's own quantizer computes them). AdamW and the warmup/constant/linear-decay schedule come from
`npp_jax.trainers.optim`, the same as the GPT's.

Dead codes: a short run leaves many codes that no encoder output ever picks. Every `train.restart_every` steps,
the codes unused since the last restart are set to encoder outputs of the current batch (chosen at random), so
they take over part of a crowded code's inputs; restarts stop after `train.restart_until` of the run so the last
steps settle the codebook.

Metrics: `mse` is on [-1, 1] images (the loss's scale); `psnr` is the mean over images of the per-image PSNR of
the reconstruction clipped to [-1, 1], both mapped to [0, 1]; codebook `usage` is the fraction of codes used on a
set of images and `perplexity` the exponential of the entropy of their frequencies. Validation uses the last
`data.val_images` training images (held out of training); the final evaluation uses the test split.

Workdir (its life cycle is `workdir.Run`'s, the GPT trainer's too): config.json, checkpoints/<step>/{state,meta}
(Orbax; a rerun resumes from the newest; SIGTERM saves and leaves), metrics.jsonl, tensorboard/, and at the end
eval.json (test metrics), tokenizer/ (a `store.save_vq` directory) and DONE (once the final step verifies).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from etils import epath
from flax import nnx

from npp_jax import errors
from npp_jax import images as images_lib
from npp_jax.data import augment
from npp_jax.data import prepare
from npp_jax.data import sources
from npp_jax.model_files import store
from npp_jax.models import vq as vq_lib
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import optim
from npp_jax.trainers import workdir as workdir_lib

TOKENIZER_DIR = "tokenizer"
EVAL_FILE = "eval.json"

StepMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    mse=clu_metrics.Average.from_output("mse"),
    l1=clu_metrics.Average.from_output("l1"),
    psnr=clu_metrics.Average.from_output("psnr"),
    codebook_loss=clu_metrics.Average.from_output("codebook_loss"),
    commit_loss=clu_metrics.Average.from_output("commit_loss"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    lr=clu_metrics.LastValue.from_output("lr"))


# ----------------------------------------------------------------------------------------------------------------------
# Data.


class ImageSet:
  """One split's raw uint8 images and the [-1, 1]-ready uint8 views the tokenizer sees (data.augmentation)."""

  def __init__(self, raw: np.ndarray, data_cfg: ml_collections.ConfigDict):
    augment.check_augmentation(data_cfg.augmentation)
    self.raw = raw
    self.augmentation = data_cfg.augmentation
    self.image_size = data_cfg.image_size
    self.pad_value = data_cfg.pad_value

  def __len__(self) -> int:
    return len(self.raw)

  def views(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (B, S, S, 3): one view per image, chosen by `rng` when the augmentation has several (else the first)."""
    out = []
    for i in indices:
      views = augment.make_views(self.raw[i], self.augmentation, self.image_size, pad_value=self.pad_value)
      out.append(views[rng.integers(len(views)) if rng is not None else 0])
    return np.stack(out)


def load_data(data_cfg: ml_collections.ConfigDict) -> tuple[ImageSet, ImageSet, ImageSet, str]:
  """(train, validation, test) image sets and a fingerprint of the training images and their views.

  The validation set is the last `data.val_images` training images, which training never sees.
  """
  if data_cfg.source != "fashion_mnist":
    raise errors.InvalidInput(f"train_tokenizer reads data.source='fashion_mnist' only, got {data_cfg.source!r}")
  train = sources.FashionMnistSource(data_cfg.dir, "train")
  test_images, _ = sources.load_fashion_mnist(data_cfg.dir, "test")
  n_val = int(data_cfg.val_images)
  if not 0 < n_val < len(train) // 2:
    raise errors.InvalidInput(f"data.val_images={n_val} must be positive and under half of the {len(train)} training "
                              "images")
  fingerprint = json.dumps({"images": train.fingerprint(), "val_images": n_val,
                            "augmentation": data_cfg.augmentation, "image_size": data_cfg.image_size,
                            "pad_value": data_cfg.pad_value}, sort_keys=True)
  return (ImageSet(train.images[:-n_val], data_cfg), ImageSet(train.images[-n_val:], data_cfg),
          ImageSet(test_images, data_cfg), fingerprint)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(num)


def batch_indices(step: int, num: int, batch: int, seed: int) -> np.ndarray:
  """The training images of `step`: epochs of a seeded permutation, the last partial batch dropped.

  A pure function of the step, so a resumed run sees exactly the batches of an uninterrupted one.
  """
  per_epoch = num // batch
  if per_epoch == 0:
    raise errors.InvalidInput(f"train.batch_size={batch} is larger than the {num} training images")
  epoch, i = divmod(step, per_epoch)
  return _epoch_order(seed, epoch, num)[i * batch:(i + 1) * batch]


def padded_views(image_set: ImageSet, start: int, batch_size: int) -> np.ndarray:
  """First views of images [start, start + batch_size), zero-padded to batch_size (one shape, one compilation)."""
  views = image_set.views(np.arange(start, min(start + batch_size, len(image_set))))
  return np.concatenate([views, np.zeros((batch_size - len(views), *views.shape[1:]), views.dtype)])


# ----------------------------------------------------------------------------------------------------------------------
# Metrics.


def per_image_psnr(recon: jax.Array, images: jax.Array) -> jax.Array:
  """PSNR (dB) of each reconstruction clipped to [-1, 1], both mapped to [0, 1]: (B,)."""
  err = jnp.square((jnp.clip(recon, -1.0, 1.0) - images) / 2.0)
  mse01 = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return -10.0 * jnp.log10(jnp.maximum(mse01, 1e-10))


def code_statistics(counts: np.ndarray) -> dict[str, float]:
  """Codebook usage (fraction of codes that occur) and perplexity (exp of the entropy) from code counts."""
  counts = np.asarray(counts, np.float64)
  p = counts[counts > 0] / counts.sum()
  return {"usage": float(np.mean(counts > 0)), "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


# ----------------------------------------------------------------------------------------------------------------------
# State and the jitted functions.


class Trainer:
  """The model's graph, the optimizer and the jitted train, restart and eval functions of one config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.vq_cfg = config.vq
    self.steps = int(config.train.steps)
    if self.steps <= 0:
      raise errors.InvalidInput(f"train.steps must be positive, got {self.steps}")
    abstract = nnx.eval_shape(lambda: vq_lib.VQModel(self.vq_cfg, rngs=nnx.Rngs(0)))
    self.graphdef = nnx.graphdef(abstract)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    self.schedule = optim.learning_rate_schedule(config.optim, [(0, self.steps)], int(config.optim.warmup_steps))
    self.tx = optim.make_optimizer(config.optim, self.schedule, abstract_params)
    self.key = jax.random.key(config.seed)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                       jax.eval_shape(self.init_state))
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
    self.restart = jax.jit(self._restart)
    self.reconstruct = jax.jit(self._reconstruct)

  def model(self, params: dict) -> vq_lib.VQModel:
    return nnx.merge(self.graphdef, params)

  def init_state(self) -> dict:
    model = vq_lib.VQModel(self.vq_cfg, rngs=nnx.Rngs(params=jax.random.fold_in(self.key, 0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
            "usage": jnp.zeros((self.vq_cfg.codebook_size,), jnp.int32)}

  def _train_step(self, state: dict, images_uint8: jax.Array) -> tuple[dict, StepMetrics]:
    """One AdamW step; `usage` counts how often each code was picked since the last restart."""
    train_cfg = self.config.train
    images = prepare.to_model_input(images_uint8)
    dropout = self.vq_cfg.dropout_p > 0
    rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.fold_in(self.key, 1), state["step"])) if dropout else None

    def loss_fn(params):
      recon, aux = self.model(params)(images, deterministic=not dropout, rngs=rngs)
      mse = jnp.mean(jnp.square(recon - images))
      l1 = jnp.mean(jnp.abs(recon - images))
      loss = (mse + train_cfg.l1_weight * l1
              + train_cfg.codebook_weight * (aux["codebook_loss"] + aux["commit_loss"]))
      return loss, dict(mse=mse, l1=l1, psnr=jnp.mean(per_image_psnr(recon, images)),
                        codebook_loss=aux["codebook_loss"], commit_loss=aux["commit_loss"], codes=aux["codes"])

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    usage = state["usage"].at[aux.pop("codes").reshape(-1)].add(1)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "usage": usage}
    return new_state, StepMetrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), lr=self.schedule(state["step"]), **aux)

  def _restart(self, state: dict, images_uint8: jax.Array, key: jax.Array) -> tuple[dict, jax.Array]:
    """Sets every code unused since the last restart to a random encoder output of the batch; resets `usage`.

    The outputs are taken as the quantizer compares them (L2-normalised when codebook_l2_norm), so the new code
    is the exact nearest entry of the latent it was copied from.
    """
    model = self.model(state["params"])
    latents, _, _ = model.quantize.nearest(model.encode_latent(prepare.to_model_input(images_uint8)))
    latents = latents.reshape(-1, latents.shape[-1])
    size = state["usage"].shape[0]
    pick = jax.random.choice(key, latents.shape[0], (size,), replace=latents.shape[0] < size)
    dead = state["usage"] == 0
    params = jax.tree.map(lambda x: x, state["params"])  # A new dict tree; the leaves are not copied.
    params["quantize"]["codebook"] = jnp.where(dead[:, None], latents[pick], params["quantize"]["codebook"])
    return {**state, "params": params, "usage": jnp.zeros_like(state["usage"])}, jnp.sum(dead)

  def _reconstruct(self, params: dict, images_uint8: jax.Array) -> tuple[jax.Array, ...]:
    """(reconstructions (B, H, W, 3), codes (B, h*w), per-image MSE on [-1, 1], per-image PSNR), no dropout."""
    images = prepare.to_model_input(images_uint8)
    recon, aux = self.model(params)(images, deterministic=True)
    return (recon, aux["codes"], jnp.mean(jnp.square(recon - images), axis=(1, 2, 3)),
            per_image_psnr(recon, images))

  def evaluate(self, params: dict, image_set: ImageSet, batch_size: int) -> dict[str, float]:
    """MSE, PSNR, codebook usage and perplexity over a whole image set (first view of each image)."""
    n = len(image_set)
    mse, psnr, counts = [], [], np.zeros(self.vq_cfg.codebook_size, np.int64)
    for start in range(0, n, batch_size):
      k = min(batch_size, n - start)
      _, codes, err, image_psnr = self.reconstruct(params, padded_views(image_set, start, batch_size))
      mse.append(np.asarray(err[:k]))
      psnr.append(np.asarray(image_psnr[:k]))
      counts += np.bincount(np.asarray(codes[:k]).reshape(-1), minlength=counts.size)
    return {"mse": float(np.mean(np.concatenate(mse))), "psnr": float(np.mean(np.concatenate(psnr))),
            **code_statistics(counts), "images": n}


# ----------------------------------------------------------------------------------------------------------------------
# The run.


def _log(message: str) -> None:
  logging.info("%s", message)


def _image_grid(originals: np.ndarray, recon: jax.Array) -> np.ndarray:
  """uint8 grid: originals on the top row, reconstructions below."""
  return images_lib.make_grid(np.concatenate([originals, images_lib.to_uint8(recon)]), rows=2, pad=2)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains (or resumes) in `workdir`, evaluates on the test split and writes workdir/tokenizer.

  Returns the test metrics with the tokenizer's checksum, or None when a SIGTERM stopped the run (it saved; a rerun
  resumes).
  """
  train_cfg = config.train
  vq_lib.grid_size(config.vq)  # Fails early on an image size the encoder cannot divide.
  if config.data.image_size != config.vq.image_size:
    raise errors.InvalidInput(f"data.image_size={config.data.image_size} differs from vq.image_size="
                              f"{config.vq.image_size}")
  with workdir_lib.Run(workdir, _log) as run_dir:
    train_set, val_set, test_set, fingerprint = load_data(config.data)
    trainer = Trainer(config)
    # A workdir resumes only a run of the same tokenizer on the same data (where the weights are read from may
    # differ).
    run_dir.open(config, keep=train_cfg.keep_checkpoints, sections=("vq", "data"), ignore=("checkpoint",))
    state, start = run_dir.restore_or_init(trainer.abstract_state, fingerprint, jax.jit(trainer.init_state))
    state = _train(trainer, run_dir, state, start, train_set, val_set, fingerprint)
    if state is None:
      return None
    result = _finish(trainer, state["params"], run_dir.writer, test_set, epath.Path(run_dir.path))
    run_dir.finish(trainer.steps, restored_final=start == trainer.steps)
  return result


def _train(trainer: Trainer, run_dir: workdir_lib.Run, state: dict, start: int, train_set: ImageSet,
           val_set: ImageSet, fingerprint: str) -> dict | None:
  """Trains from `start`; returns the final state, or None after a SIGTERM (saved)."""
  config, train_cfg = trainer.config, trainer.config.train
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  _log(f"tokenizer: {num_params:,} parameters, {config.vq.image_size}px -> {vq_lib.grid_size(config.vq)}^2 codes "
       f"of {config.vq.codebook_size}; data: {len(train_set):,} training, {len(val_set):,} validation images; "
       f"{trainer.steps:,} steps of {train_cfg.batch_size}")
  restart_until = int(train_cfg.restart_until * trainer.steps)
  accumulated, started, last_log, last_log_step = None, time.time(), time.time(), start
  for step in range(start, trainer.steps):
    views = train_set.views(batch_indices(step, len(train_set), train_cfg.batch_size, config.seed),
                            np.random.default_rng((config.seed, 1, step)))
    state, step_metrics = trainer.train_step(state, views)
    accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
    done = step + 1
    values = {}
    if train_cfg.restart_every and done % train_cfg.restart_every == 0 and done <= restart_until:
      state, dead = trainer.restart(state, views, jax.random.fold_in(jax.random.fold_in(trainer.key, 2), done))
      values["restarted_codes"] = int(dead)
    if done % train_cfg.log_every == 0 or done == trainer.steps:
      values.update({k: float(v) for k, v in accumulated.compute().items()})
      accumulated = None
      run_dir.check_finite(values, done)
      now = time.time()
      values["images_per_s"] = (done - last_log_step) * train_cfg.batch_size / max(now - last_log, 1e-9)
      last_log, last_log_step = now, done
      _log(metrics_lib.progress_line(done, trainer.steps, values, started, start))
    if done % train_cfg.eval_every == 0 or done == trainer.steps:
      val = trainer.evaluate(state["params"], val_set, train_cfg.eval_batch_size)
      values.update({f"val/{k}": v for k, v in val.items() if k != "images"})
      _log(f"[{done}/{trainer.steps}] validation: " + " ".join(f"{k}={v:.4g}" for k, v in val.items()))
      batch = padded_views(val_set, 0, train_cfg.eval_batch_size)  # The eval shape: no new compilation.
      recon = trainer.reconstruct(state["params"], batch)[0]
      run_dir.writer.image(done, "val/reconstructions", _image_grid(batch[:8], recon[:8]))
    if values:
      run_dir.writer.scalars(done, values)
    stop = run_dir.stop_requested(done, train_cfg.log_every)
    if done % train_cfg.checkpoint_every == 0 or done == trainer.steps or stop:
      run_dir.save(done, state, {"step": done, "data": fingerprint})
    if stop:
      run_dir.leave(done)
      return None
  return state


def _finish(trainer: Trainer, params: dict, writer: metrics_lib.Writer, test_set: ImageSet,
            workdir: epath.Path) -> dict[str, Any]:
  """Test-split evaluation (eval.json) and the final tokenizer (workdir/tokenizer, written once)."""
  started = time.time()
  test = trainer.evaluate(params, test_set, trainer.config.train.eval_batch_size)
  _log(f"test ({test['images']:,} images, {time.time() - started:.0f} s): "
       + " ".join(f"{k}={v:.4g}" for k, v in test.items() if k != "images"))
  writer.scalars(trainer.steps, {f"test/{k}": v for k, v in test.items()})
  model = trainer.model(params)
  out = workdir / TOKENIZER_DIR
  if (out / "config.json").exists():
    _, checksum = store.read_saved_vq(out)
    if checksum != vq_lib.params_checksum(model):
      raise errors.InvalidInput(f"{out} holds another tokenizer than this run's final step; move it away and rerun")
    _log(f"{out} already written (params checksum {checksum})")
  else:
    vq_cfg = trainer.config.vq.copy_and_resolve_references()
    vq_cfg.checkpoint = ""  # The directory itself is the checkpoint; read_saved_vq fills it in.
    checksum = store.save_vq(model, vq_cfg, out)
    _log(f"wrote {out} (params checksum {checksum})")
  result = {**test, "checksum": checksum, "steps": trainer.steps}
  (workdir / EVAL_FILE).write_text(json.dumps(result, indent=1) + "\n")
  return result
