"""VQ tokenizer parity with LlamaGen's PyTorch VQModel (fixture llamagen_tiny), jitted/sharded use, quantizer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from npp_jax.model_files import param_mapping
from npp_jax.models import vq


def tiny_config() -> ml_collections.ConfigDict:
  """The fixture's VQ: ch 32, ch_mult (1, 2), z 32, codebook 64x8, 32x32 images -> 16x16 codes."""
  cfg = vq.default_config()
  cfg.update(dict(ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32, codebook_size=64,
                  image_size=32))
  return cfg


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  return dict(np.load(fixtures_dir / "llamagen_tiny" / "vq_io.npz"))


@pytest.fixture(scope="module")
def model(fixtures_dir):
  return param_mapping.vq_from_torch(fixtures_dir / "llamagen_tiny" / "vq.pt", tiny_config())


def _normalise(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_encode_matches_reference(model, ref):
  np.testing.assert_allclose(model.encode_latent(ref["images"]), ref["pre_quant_latent"], atol=1e-5, rtol=0)
  codes = model.encode(ref["images"])
  assert codes.dtype == jnp.int32 and codes.shape == (2, 256)
  np.testing.assert_array_equal(codes, ref["codes"])


def test_decode_matches_reference(model, ref):
  np.testing.assert_allclose(model.decode(jnp.asarray(ref["codes"])), ref["decoded"], atol=1e-4, rtol=0)


def test_training_forward(model, ref):
  recon, aux = model(ref["images"])
  np.testing.assert_array_equal(aux["codes"], ref["codes"])
  quant, _, _ = model.quantize(model.encode_latent(ref["images"]))
  np.testing.assert_allclose(quant, ref["quant_latent"], atol=1e-5, rtol=0)
  # Losses on the normalised vectors, from the reference arrays alone.
  z = _normalise(ref["pre_quant_latent"].astype(np.float64))
  gap = np.mean((ref["quant_latent"] - z) ** 2)
  np.testing.assert_allclose(aux["codebook_loss"], gap, rtol=1e-5)
  np.testing.assert_allclose(aux["commit_loss"], 0.25 * gap, rtol=1e-5)
  # The straight-through value is the codebook vector, so the reconstruction is decode(codes).
  np.testing.assert_allclose(recon, ref["decoded"], atol=1e-4, rtol=0)


def test_quantizer_gradients():
  """Straight-through to z; the codebook loss trains only the codebook, the commitment loss only z."""
  quantizer = vq.VectorQuantizer(16, 4, l2_norm=True, beta=0.25, rngs=nnx.Rngs(1))
  z = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  weights = jax.random.normal(jax.random.key(1), z.shape)

  def loss(q, z, name):
    quant, _, losses = q(z)
    return jnp.sum(quant * weights) if name == "st" else losses[name]

  def grads(name):
    return nnx.grad(loss, argnums=(0, 1))(quantizer, z, name)

  _, dz = grads("st")
  # Straight through the lookup, the gradient is that of the l2-normalisation n = z/|z|: (w - (w.n) n) / |z|.
  norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
  n = z / norm
  np.testing.assert_allclose(dz, (weights - jnp.sum(weights * n, -1, keepdims=True) * n) / norm, atol=1e-5)
  dq, dz = grads("codebook_loss")
  assert float(jnp.abs(dq.codebook[...]).max()) > 0 and float(jnp.abs(dz).max()) == 0
  dq, dz = grads("commit_loss")
  assert float(jnp.abs(dq.codebook[...]).max()) == 0 and float(jnp.abs(dz).max()) > 0


def test_jitted_sharded_encode_decode(model, ref):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images = jax.device_put(np.tile(ref["images"], (4, 1, 1, 1)), sharding)
  codes = vq.make_encode_fn(model)(images)
  np.testing.assert_array_equal(codes, np.tile(ref["codes"], (4, 1)))
  decoded = vq.make_decode_fn(model)(jax.device_put(np.asarray(codes), sharding))
  np.testing.assert_allclose(decoded, np.tile(ref["decoded"], (4, 1, 1, 1)), atol=1e-4, rtol=0)


def test_decode_needs_a_square_grid(model):
  with pytest.raises(ValueError, match="square"):
    model.decode(jnp.zeros((1, 12), jnp.int32))


def test_out_of_range_codes_decode_to_nan(model, ref):
  codes = np.array(ref["codes"])
  codes[0, 5], codes[1, 7] = 64, -1  # codebook_size is 64
  images = np.asarray(model.decode(jnp.asarray(codes)))
  assert np.isnan(images[0]).any() and np.isnan(images[1]).any()
  codes[1, 7] = 3
  images = np.asarray(model.decode(jnp.asarray(codes)))
  assert np.isnan(images[0]).any() and np.isfinite(images[1]).all()


def test_dropout_only_in_training_mode():
  block = vq.ResnetBlock(32, 32, dropout=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 32))
  eval_a = block(x, deterministic=True, rngs=None)
  eval_b = block(x, deterministic=True, rngs=nnx.Rngs(dropout=1))
  train = block(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert float(jnp.abs(train - eval_a).max()) > 1e-3


def test_config_and_grid():
  cfg = vq.default_config()
  assert vq.grid_size(cfg) == 16
  assert vq.grid_size(tiny_config()) == 16
  cfg.image_size = 384
  assert vq.grid_size(cfg) == 24
  cfg.image_size = 250
  with pytest.raises(ValueError, match="multiple"):
    vq.grid_size(cfg)


def test_vq16_parameter_count():
  # LlamaGen's VQ_16 has 71,883,403 parameters (codebook_used is a buffer, not a parameter).
  abstract = nnx.eval_shape(lambda: vq.VQModel(vq.default_config(), rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert count == 71_883_403


def test_params_checksum(model, fixtures_dir):
  again = param_mapping.vq_from_torch(fixtures_dir / "llamagen_tiny" / "vq.pt", tiny_config())
  assert vq.params_checksum(again) == vq.params_checksum(model)
  kernel = again.decoder.conv_out.kernel
  kernel[...] = kernel[...].at[0, 0, 0, 0].add(1e-6)
  assert vq.params_checksum(again) != vq.params_checksum(model)
  assert len(vq.params_checksum(model)) == 64
