"""Trains or fine-tunes the VQ tokenizer (the pipeline's own `VQModel`) on Fashion-MNIST or an image folder, e.g. the
one shipped in npp_jax/assets/vq_fashion.

  python -m npp_jax.train_tokenizer --config configs/vq_fashion.py --workdir DIR [--config.key=value ...]

Losses are LlamaGen's VQ losses (`tokenizer/tokenizer_image/vq_loss.py`), each term switched by the config:

  loss = mse + l1_weight * l1 + perceptual.weight * perceptual + codebook_weight * (codebook_loss + commit_loss)
         + adaptive * disc.weight * gen_loss(D(recon))         (once step + 1 >= disc.start)

with codebook_loss = |z_q - sg(z)|^2 and commit_loss = beta * |sg(z_q) - z|^2 on the L2-normalised vectors (the
model's own quantizer computes them). The perceptual network (LPIPS on VGG16 from user-given weights, or the shipped
Fashion classifier's features) and the PatchGAN discriminator D with its hinge losses are in
`npp_jax.trainers.vq_losses`. D has its own Adam (disc.lr, optim's betas, eps and clipping) and is trained on the
same batch after the generator's step, on the reconstructions of that step, as in the reference; before disc.start
neither D nor its optimizer state moves. The tokenizer's AdamW and the warmup/constant/linear-decay schedule come
from `npp_jax.trainers.optim` (the reference's Adam at a constant 1e-4: weight_decay 0, schedule 'constant').

Fine-tuning: `train.init_from` starts from a saved tokenizer directory or a LlamaGen .pt/.safetensors file (the
reference's `--finetune --vq-ckpt`, which starts at step 0 too; only the tokenizer's weights are read), and
`train.freeze` holds parts fixed: 'encoder' (with quant_conv), 'codebook', 'decoder' (with post_quant_conv). Their
gradients are zeroed before clipping and their updates after the optimizer, so they do not move at all (weight
decay included). The reference has no freeze option; it always trains the whole tokenizer.

Dead codes: a short run leaves many codes that no encoder output ever picks. Every `train.restart_every` steps,
the codes unused since the last restart are set to encoder outputs of the current batch (chosen at random), so
they take over part of a crowded code's inputs; restarts stop after `train.restart_until` of the run so the last
steps settle the codebook.

Metrics: every loss term is logged (`perceptual`, `gen_loss`, `disc_loss`, the mean logits `logits_real` and
`logits_fake`, `adaptive_weight` and `disc_active` when those terms are on); `mse` is on [-1, 1] images (the loss's
scale); `psnr` is the mean over images of the per-image PSNR of the reconstruction clipped to [-1, 1], both mapped
to [0, 1]; codebook `usage` is the fraction of codes used on a
set of images and `perplexity` the exponential of the entropy of their frequencies. Validation uses the last
`data.val_images` training images (held out of training); the final evaluation uses the test split (an image
folder, data.source='folder', has none: there both are a held-out draw of its images, see `load_data`).

Workdir (its life cycle is `workdir.Run`'s, the GPT trainer's too): config.json, checkpoints/<step>/{state,meta}
(Orbax: the tokenizer, the discriminator and both optimizers, so a rerun resumes exactly from the newest; SIGTERM
saves and leaves), metrics.jsonl, tensorboard/, reconstructions/<step>.png (8 validation images over their
reconstructions, at every evaluation), and at the end eval.json (test metrics), tokenizer/ (a `store.save_vq`
directory) and DONE (once the final step verifies).
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
from npp_jax.models import patchgan
from npp_jax.models import vq as vq_lib
from npp_jax.trainers import metrics as metrics_lib
from npp_jax.trainers import optim
from npp_jax.trainers import vq_losses
from npp_jax.trainers import workdir as workdir_lib

TOKENIZER_DIR = "tokenizer"
EVAL_FILE = "eval.json"
RECONSTRUCTIONS_DIR = "reconstructions"

def frozen_mask(params: dict, freeze: tuple[str, ...]) -> dict:
  """True on the parameters of the frozen parts (vq_lib.PARTS names), False elsewhere."""
  unknown = [name for name in freeze if name not in vq_lib.PARTS]
  if unknown:
    raise errors.InvalidInput(f"train.freeze takes {', '.join(vq_lib.PARTS)}; got {', '.join(map(repr, unknown))}")
  if set(vq_lib.PARTS) <= set(freeze):
    raise errors.InvalidInput("train.freeze holds the encoder, the codebook and the decoder: nothing would train")
  held = {module for name in freeze for module in vq_lib.PARTS[name]}
  return {module: jax.tree.map(lambda _, frozen=module in held: frozen, subtree) for module, subtree in params.items()}


def step_metrics(names: list[str]) -> type[clu_metrics.Collection]:
  """The per-step metrics: the average of each named output, and the last learning rate."""
  return clu_metrics.Collection.create(**{name: clu_metrics.Average.from_output(name) for name in names},
                                       lr=clu_metrics.LastValue.from_output("lr"))


# ----------------------------------------------------------------------------------------------------------------------
# Data.


class ImageSet:
  """One split's raw images (a uint8 array, or a sequence that decodes them) and the [-1, 1]-ready uint8 views the
  tokenizer sees (data.augmentation)."""

  def __init__(self, raw: Any, data_cfg: ml_collections.ConfigDict):
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


class _FolderImages:
  """The images of an image folder at some of its indices, decoded when asked for (ImageSet's `raw`)."""

  def __init__(self, source: sources.Source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    try:
      return self.source.load(int(self.indices[i]))
    except sources.UnreadableImageError as e:
      raise errors.InvalidInput(f"{e}; remove or replace the file") from None


def load_data(data_cfg: ml_collections.ConfigDict) -> tuple[ImageSet, ImageSet, ImageSet, str]:
  """(train, validation, test) image sets and a fingerprint of the training images and their views.

  Fashion-MNIST: the validation set is the last `data.val_images` training images, which training never sees; the
  test set is the test split. An image folder (data.source='folder', torchvision ImageFolder layout): the validation
  set is `data.val_images` images drawn by a fixed permutation (seed 0) and held out; it is also the final
  evaluation's set, since a folder has no test split.
  """
  if data_cfg.source not in ("fashion_mnist", "folder"):
    raise errors.InvalidInput(f"train_tokenizer reads data.source='fashion_mnist' or 'folder', got {data_cfg.source!r}")
  if data_cfg.source == "fashion_mnist":
    source = sources.FashionMnistSource(data_cfg.dir, "train")
    test_images, _ = sources.load_fashion_mnist(data_cfg.dir, "test")
  else:
    source = sources.make_source(data_cfg)
  n_val = int(data_cfg.val_images)
  if not 0 < n_val < len(source) // 2:
    raise errors.InvalidInput(f"data.val_images={n_val} must be positive and under half of the {len(source)} training "
                              "images")
  fingerprint = json.dumps({"images": source.fingerprint(), "val_images": n_val,
                            "augmentation": data_cfg.augmentation, "image_size": data_cfg.image_size,
                            "pad_value": data_cfg.pad_value}, sort_keys=True)
  if data_cfg.source == "fashion_mnist":
    return (ImageSet(source.images[:-n_val], data_cfg), ImageSet(source.images[-n_val:], data_cfg),
            ImageSet(test_images, data_cfg), fingerprint)
  order = np.random.default_rng(0).permutation(len(source))
  val = ImageSet(_FolderImages(source, np.sort(order[-n_val:])), data_cfg)
  return ImageSet(_FolderImages(source, np.sort(order[:-n_val])), data_cfg), val, val, fingerprint


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
  """The model's graph, the optimizers and the jitted train, restart and eval functions of one config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.vq_cfg = config.vq
    self.steps = int(config.train.steps)
    if self.steps <= 0:
      raise errors.InvalidInput(f"train.steps must be positive, got {self.steps}")
    abstract = nnx.eval_shape(lambda: vq_lib.VQModel(self.vq_cfg, rngs=nnx.Rngs(0)))
    self.graphdef = nnx.graphdef(abstract)
    self.last_layer = nnx.graphdef(abstract.decoder.conv_out)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    self.schedule = optim.learning_rate_schedule(config.optim, [(0, self.steps)], int(config.optim.warmup_steps))
    self.frozen = frozen_mask(abstract_params, tuple(config.train.freeze))
    if any(jax.tree.leaves(self.frozen["quantize"])) and config.train.restart_every:
      raise errors.InvalidInput("train.freeze holds the codebook, so dead-code restarts cannot run: set "
                                "train.restart_every=0")
    zero_frozen = optax.masked(optax.set_to_zero(), self.frozen)
    # Frozen gradients are zeroed before the clipping (they do not count in its norm) and their updates after the
    # optimizer (weight decay would move them otherwise).
    self.tx = optax.chain(zero_frozen, optim.make_optimizer(config.optim, self.schedule, abstract_params), zero_frozen)
    self.key = jax.random.key(config.seed)
    self.perceptual_weight = float(config.perceptual.weight)
    self.disc_weight = float(config.disc.weight)
    self.perceptual_graphdef = self.perceptual_state = None
    if self.perceptual_weight > 0:
      network = vq_losses.perceptual_network(config.perceptual, self.vq_cfg.image_size)
      self.perceptual_graphdef, self.perceptual_state = nnx.split(network)
    names = ["loss", "mse", "l1", "psnr", "codebook_loss", "commit_loss", "grad_norm"]
    names += ["perceptual"] if self.perceptual_weight > 0 else []
    if self.disc_weight > 0:
      disc_cfg = config.disc
      if disc_cfg.loss not in vq_losses.D_LOSSES or disc_cfg.gen_loss not in vq_losses.GEN_LOSSES:
        raise errors.InvalidInput(f"disc.loss must be one of {', '.join(vq_losses.D_LOSSES)} and disc.gen_loss one of "
                                  f"{', '.join(vq_losses.GEN_LOSSES)}; got {disc_cfg.loss!r}, {disc_cfg.gen_loss!r}")
      self.disc_graphdef = nnx.graphdef(nnx.eval_shape(self._new_discriminator))
      parts = [optax.clip_by_global_norm(config.optim.grad_clip)] if config.optim.grad_clip > 0 else []
      self.disc_tx = optax.chain(*parts, optax.adam(disc_cfg.lr, b1=config.optim.b1, b2=config.optim.b2,
                                                    eps=config.optim.eps))
      names += ["gen_loss", "disc_loss", "logits_real", "logits_fake", "disc_active", "disc_grad_norm"]
      names += ["adaptive_weight"] if disc_cfg.adaptive_weight else []
    self.metrics = step_metrics(names)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                       jax.eval_shape(self.init_state))
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
    self.restart = jax.jit(self._restart)
    self.reconstruct = jax.jit(self._reconstruct)

  def model(self, params: dict) -> vq_lib.VQModel:
    return nnx.merge(self.graphdef, params)

  def _new_discriminator(self) -> patchgan.PatchGAN:
    return patchgan.PatchGAN(3, self.config.disc.channels, self.config.disc.layers,
                             rngs=nnx.Rngs(params=jax.random.fold_in(self.key, 3)))

  def init_state(self, params: dict | None = None) -> dict:
    """The step-0 state: `params` (a tokenizer to fine-tune) or a random tokenizer; a new discriminator."""
    if params is None:
      model = vq_lib.VQModel(self.vq_cfg, rngs=nnx.Rngs(params=jax.random.fold_in(self.key, 0)))
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
             "usage": jnp.zeros((self.vq_cfg.codebook_size,), jnp.int32)}
    if self.disc_weight > 0:
      disc_params = nnx.to_pure_dict(nnx.state(self._new_discriminator(), nnx.Param))
      state.update(disc_params=disc_params, disc_opt_state=self.disc_tx.init(disc_params))
    return state

  def initial_params(self) -> dict | None:
    """The parameters of `train.init_from` (None: start from random weights)."""
    init_from = self.config.train.init_from
    if not init_from:
      return None
    vq_cfg = self.vq_cfg.copy_and_resolve_references()
    vq_cfg.checkpoint = init_from
    return nnx.to_pure_dict(nnx.state(store.load_vq(vq_cfg), nnx.Param))

  def _train_step(self, state: dict, images_uint8: jax.Array, perceptual_state: Any) -> tuple[dict, Any]:
    """One tokenizer step, then (with the discriminator on) one discriminator step on the same reconstructions.

    `usage` counts how often each code was picked since the last restart.
    """
    train_cfg, disc_cfg = self.config.train, self.config.disc
    images = prepare.to_model_input(images_uint8)
    dropout = self.vq_cfg.dropout_p > 0
    rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.fold_in(self.key, 1), state["step"])) if dropout else None
    use_disc = self.disc_weight > 0
    active = vq_losses.discriminator_active(state["step"], disc_cfg.start) if use_disc else None
    discriminator = nnx.merge(self.disc_graphdef, state["disc_params"]) if use_disc else None

    def nll_of(recon):
      """The reference's nll: reconstruction plus perceptual terms (what the adaptive weight balances against)."""
      mse = jnp.mean(jnp.square(recon - images))
      l1 = jnp.mean(jnp.abs(recon - images))
      terms = dict(mse=mse, l1=l1)
      nll = mse + train_cfg.l1_weight * l1
      if self.perceptual_weight > 0:
        terms["perceptual"] = jnp.mean(nnx.merge(self.perceptual_graphdef, perceptual_state)(recon, images))
        nll = nll + self.perceptual_weight * terms["perceptual"]
      return nll, terms

    def adversarial(last_input, last_params):
      """(gen_loss, its weight before disc.weight) once the discriminator is on; zeros before."""
      def gen_loss_of(recon):
        return vq_losses.GEN_LOSSES[disc_cfg.gen_loss](discriminator(recon))

      def on(last_input, last_params):
        apply_last = lambda kernel: nnx.merge(self.last_layer, {**last_params, "kernel": kernel})(last_input)
        gen_loss = gen_loss_of(apply_last(last_params["kernel"]))
        if not disc_cfg.adaptive_weight:
          return gen_loss, jnp.ones((), jnp.float32)
        # Gradients with respect to the decoder's last conv kernel alone, as the reference's autograd.grad(loss,
        # last_layer): each is a backward pass through its loss and that one layer only.
        kernel = jax.lax.stop_gradient(last_params["kernel"])
        frozen_input = jax.lax.stop_gradient(last_input)
        apply_frozen = lambda k: nnx.merge(self.last_layer, {**last_params, "kernel": k})(frozen_input)
        nll_grad = jax.grad(lambda k: nll_of(apply_frozen(k))[0])(kernel)
        gen_grad = jax.grad(lambda k: gen_loss_of(apply_frozen(k)))(kernel)
        return gen_loss, vq_losses.adaptive_weight(nll_grad, gen_grad)

      off = lambda *_: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      return jax.lax.cond(active, on, off, last_input, last_params)

    def loss_fn(params):
      model = self.model(params)
      last_input, aux = model.forward_to_last_layer(images, deterministic=not dropout, rngs=rngs)
      last_params = params["decoder"]["conv_out"]
      recon = nnx.merge(self.last_layer, last_params)(last_input)
      nll, terms = nll_of(recon)
      loss = nll + train_cfg.codebook_weight * (aux["codebook_loss"] + aux["commit_loss"])
      if use_disc:
        gen_loss, weight = adversarial(last_input, last_params)
        loss = loss + weight * self.disc_weight * gen_loss
        terms.update(gen_loss=gen_loss)
        if disc_cfg.adaptive_weight:
          terms.update(adaptive_weight=weight)
      return loss, dict(terms, psnr=jnp.mean(per_image_psnr(recon, images)), codebook_loss=aux["codebook_loss"],
                        commit_loss=aux["commit_loss"], codes=aux["codes"], recon=recon)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    usage = state["usage"].at[aux.pop("codes").reshape(-1)].add(1)
    recon = jax.lax.stop_gradient(aux.pop("recon"))
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "usage": usage}
    if use_disc:
      new_state.update(self._discriminator_step(state, images, recon, active))
      aux.update(new_state.pop("disc_metrics"), disc_active=active.astype(jnp.float32))
    return new_state, self.metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), lr=self.schedule(state["step"]), **aux)

  def _discriminator_step(self, state: dict, images: jax.Array, recon: jax.Array, active: jax.Array) -> dict:
    """disc.weight * d_loss on real images and this step's reconstructions; no change at all before disc.start."""
    disc_cfg = self.config.disc

    def d_loss_fn(disc_params):
      discriminator = nnx.merge(self.disc_graphdef, disc_params)
      logits_real, logits_fake = discriminator(images), discriminator(recon)  # separate batch statistics
      d_loss = self.disc_weight * vq_losses.D_LOSSES[disc_cfg.loss](logits_real, logits_fake)
      return d_loss, dict(logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))

    def on(disc_params, disc_opt_state):
      (d_loss, logits), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
      updates, disc_opt_state = self.disc_tx.update(grads, disc_opt_state, disc_params)
      metrics = dict(logits, disc_loss=d_loss, disc_grad_norm=optax.tree.norm(grads))
      return optax.apply_updates(disc_params, updates), disc_opt_state, metrics

    def off(disc_params, disc_opt_state):
      zero = jnp.zeros((), jnp.float32)
      return disc_params, disc_opt_state, dict(logits_real=zero, logits_fake=zero, disc_loss=zero,
                                               disc_grad_norm=zero)

    disc_params, disc_opt_state, metrics = jax.lax.cond(active, on, off, state["disc_params"],
                                                        state["disc_opt_state"])
    return {"disc_params": disc_params, "disc_opt_state": disc_opt_state, "disc_metrics": metrics}

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
    # A workdir resumes only a run of the same tokenizer, losses and data (where the weights are read from may
    # differ: the state carries them).
    run_dir.open(config, keep=train_cfg.keep_checkpoints, sections=("vq", "data", "perceptual", "disc"),
                 ignore=("checkpoint",))
    state, start = run_dir.restore_or_init(trainer.abstract_state, fingerprint,
                                           lambda: jax.jit(trainer.init_state)(trainer.initial_params()))
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
    state, step_metrics = trainer.train_step(state, views, trainer.perceptual_state)
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
      grid = _image_grid(batch[:8], recon[:8])
      run_dir.writer.image(done, "val/reconstructions", grid)
      if jax.process_index() == 0:
        (epath.Path(run_dir.path) / RECONSTRUCTIONS_DIR).mkdir(exist_ok=True)
        images_lib.save_png(epath.Path(run_dir.path) / RECONSTRUCTIONS_DIR / f"{done:07d}.png", grid)
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
