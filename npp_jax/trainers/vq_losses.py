"""The tokenizer's perceptual and adversarial loss terms: LlamaGen's `tokenizer/tokenizer_image/vq_loss.py` in JAX.

Adversarial (PatchGAN, `npp_jax.models.patchgan`), as the reference:

  discriminator  disc_weight * d_loss(D(x), D(sg(x_hat)))   hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake))
                                                              vanilla: 0.5 (mean softplus(-real) + mean softplus(fake))
  generator      adaptive * disc_weight * g_loss(D(x_hat))    hinge: -mean(fake); non_saturating: mean softplus(-fake)

both switched on at the reference's `global_step = step + 1 >= disc_start` (`discriminator_active`). The adaptive
weight (taming's, off in the reference's trainer) is |grad_last nll| / (|grad_last g_loss| + 1e-4), clipped to
[0, 1e4], with gradients taken with respect to the decoder's last conv kernel only (`adaptive_weight`).

The reference's 'non-saturating' losses pass their arguments to `binary_cross_entropy_with_logits` swapped (the
logits as targets), which makes its generator loss softplus(1) - mean(fake), a shifted hinge loss, and its
discriminator loss degenerate; here 'non_saturating' is the loss that name means, and the discriminator offers
hinge and vanilla (the same as a correct non-saturating discriminator loss).

Perceptual (`perceptual_network`): 'lpips_vgg', LPIPS on VGG16 from user-given weights (`npp_jax.models.lpips`), the
reference's; or 'fashion_classifier', the same construction in the feature space of the classifier shipped for the
Fashion-MNIST metric (`ClassifierDistance`): every conv's ReLU output and the feature vector, each normalised over
its channels (with a floor, see there), squared differences summed over channels (no learned heads: LPIPS's
'lin=False' variant), averaged over positions and summed over the taps. It is the default for Fashion-MNIST
because it ships with the repository and sees 32x32 garments at the scale it was trained on, where no VGG weights can
be downloaded. (A tokenizer tuned with it is then judged partly by the same network: see the measurement's caveat in
npp_jax/assets/vq_fashion/README.md.)
"""

from __future__ import annotations

import ml_collections
import jax
import jax.numpy as jnp
from flax import nnx

from npp_jax import assets
from npp_jax import errors
from npp_jax.model_files import param_mapping
from npp_jax.model_files import store
from npp_jax.models import classifier as classifier_lib

PERCEPTUAL_NETWORKS = ("fashion_classifier", "lpips_vgg")
_ADAPTIVE_EPS = 1e-4
_ADAPTIVE_MAX = 1e4


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def hinge_gen_loss(logits_fake: jax.Array) -> jax.Array:
  return -jnp.mean(logits_fake)


def non_saturating_gen_loss(logits_fake: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.softplus(-logits_fake))  # binary cross-entropy of the fakes against the label 'real'


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
GEN_LOSSES = {"hinge": hinge_gen_loss, "non_saturating": non_saturating_gen_loss}


def discriminator_active(step: jax.Array, start: int) -> jax.Array:
  """Whether the adversarial terms count at 0-based `step`: the reference's adopt_weight at global_step = step + 1."""
  return step + 1 >= start


def adaptive_weight(nll_grad: jax.Array, gen_grad: jax.Array) -> jax.Array:
  """taming's calculate_adaptive_weight from the two gradients on the last layer; no gradient flows through it."""
  weight = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(gen_grad) + _ADAPTIVE_EPS)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, _ADAPTIVE_MAX))


class ClassifierDistance(nnx.Module):
  """An LPIPS-style distance (no learned heads) in a classifier's activations; (B,) per image pair."""

  def __init__(self, classifier: classifier_lib.FashionClassifier):
    self.classifier = classifier

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """x the reconstructions, y the originals."""
    total = 0.0
    for tap in self.classifier.activations(jnp.concatenate([x, y])):
      tap = tap if tap.ndim == 4 else tap[:, None, None, :]  # the feature vector is one position
      fx, fy = jnp.split(tap, 2)
      # LPIPS divides by the channel norm + 1e-10, which suits VGG, whose activations never vanish; this ReLU net
      # maps the black background to all-zero vectors, where that would turn a reconstruction's faint noise into
      # unit vectors (a distance of 1 per position). The floor is a tenth of the originals' mean norm instead.
      floor = 0.1 * jax.lax.stop_gradient(jnp.mean(jnp.linalg.norm(fy, axis=-1)))
      unit = lambda f: f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + floor)
      total = total + jnp.mean(jnp.sum(jnp.square(unit(fx) - unit(fy)), axis=-1), axis=(1, 2))
    return total


def perceptual_network(cfg: ml_collections.ConfigDict, image_size: int) -> nnx.Module:
  """The `perceptual` section's network: a module (x, y) -> (B,) distances, its weights read from files."""
  if cfg.network == "lpips_vgg":
    if not (cfg.vgg_weights and cfg.lpips_weights):
      raise errors.InvalidInput("perceptual.network='lpips_vgg' needs perceptual.vgg_weights (torchvision's vgg16 "
                                "state dict) and perceptual.lpips_weights (LPIPS's vgg.pth); nothing is downloaded")
    return param_mapping.lpips_from_torch(cfg.vgg_weights, cfg.lpips_weights)
  if cfg.network == "fashion_classifier":
    model, meta = store.load_classifier(cfg.classifier or assets.FASHION_CLASSIFIER)
    if meta["arch"]["image_size"] != image_size:
      raise errors.InvalidInput(f"perceptual.network='fashion_classifier' sees {meta['arch']['image_size']}px images, "
                                f"the tokenizer {image_size}px; use perceptual.network='lpips_vgg'")
    return ClassifierDistance(model)
  raise errors.InvalidInput(f"perceptual.network must be one of {', '.join(PERCEPTUAL_NETWORKS)}, got {cfg.network!r}")
