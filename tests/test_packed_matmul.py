"""The packed bfloat16 kernel: its layout against the definition, its products against float64 sums, its use by the
sampler; and that it builds and runs wherever the CPU has AVX-512 BF16."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import system_packages
from npp_jax import errors
from npp_jax.kernels import library
from npp_jax.kernels import packed_matmul
from npp_jax.models import gpt

_HAS_BF16_UNITS = library.CPU_FLAGS <= library.cpu_flags()
needs_bf16_units = pytest.mark.skipif(not _HAS_BF16_UNITS, reason="the kernel needs AVX-512 BF16; this CPU lacks it")


def _bf16(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def test_packed_layout_follows_its_definition():
  """Block b, pair p holds [w[2p, 16b], w[2p+1, 16b], w[2p, 16b+1], ...]; columns past N are zeros."""
  rng = np.random.default_rng(0)
  w = _bf16(rng, 6, 40)
  packed = np.asarray(packed_matmul.pack(w).packed)
  assert packed.shape == (4, 3, 32)  # 40 columns padded to 64: 4 blocks of 16
  want = np.zeros((4, 3, 32), np.float32)
  for b in range(4):
    for p in range(3):
      for j in range(16):
        for e in range(2):
          column = 16 * b + j
          want[b, p, 2 * j + e] = float(w[2 * p + e, column]) if column < 40 else 0.0
  np.testing.assert_array_equal(packed.astype(np.float32), want)


def test_packed_kernel_reshapes_only_within_its_matrix():
  wo = packed_matmul.pack(jnp.zeros((4, 8, 32), jnp.bfloat16), rows=2)  # (heads, head_dim, dim): K = 32
  assert wo.reshape(-1, 32).shape == (32, 32)
  assert wo.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="cannot be read as"):
    wo.reshape(4, -1)  # would make K = 4
  with pytest.raises(ValueError, match="even number of rows"):
    packed_matmul.pack(jnp.zeros((3, 16), jnp.bfloat16))


@needs_bf16_units
def test_the_kernel_is_available_where_the_cpu_has_bf16_units():
  """No silent fallback on the machines it is for: with the CPU support, only a missing compiler may stop it."""
  system_packages.require("g++", shutil.which("g++") is not None)
  assert library.unavailable_reason("cpu") is None


@needs_bf16_units
@pytest.mark.parametrize("m, k, n", [(32, 768, 2304), (1, 2, 16), (7, 64, 50), (13, 192, 576), (25, 6, 33)])
def test_products_match_float64_sums_and_do_not_depend_on_the_other_rows(m, k, n):
  rng = np.random.default_rng(m * 1000 + n)
  x, w = _bf16(rng, m, k), _bf16(rng, k, n)
  got = np.asarray(jax.jit(packed_matmul.matmul)(x, packed_matmul.pack(w)))
  assert got.dtype == np.float32 and got.shape == (m, n)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  bound = 4 * k * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64))  # float32 summation of exact products
  assert (np.abs(got - x64 @ w64) <= bound).all()
  xla = jnp.dot(x, w, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(got, xla, rtol=0, atol=float(bound.max()))
  for row in {0, m - 1}:
    np.testing.assert_array_equal(np.asarray(packed_matmul.matmul(x[row:row + 1], packed_matmul.pack(w)))[0],
                                  got[row])


@needs_bf16_units
def test_vmap_multiplies_each_element():
  rng = np.random.default_rng(3)
  x, w = _bf16(rng, 3, 5, 8), _bf16(rng, 8, 20)
  packed = packed_matmul.pack(w)
  got = jax.vmap(packed_matmul.matmul, (0, None))(x, packed)
  np.testing.assert_array_equal(got, np.stack([np.asarray(packed_matmul.matmul(x[i], packed)) for i in range(3)]))


def test_wrong_operands_are_refused():
  packed = packed_matmul.pack(jnp.zeros((4, 16), jnp.bfloat16))
  with pytest.raises(ValueError, match="multiplies bfloat16"):
    packed_matmul.matmul(jnp.zeros((2, 4), jnp.float32), packed)
  with pytest.raises(ValueError, match="multiplies bfloat16"):
    packed_matmul.matmul(jnp.zeros((2, 6), jnp.bfloat16), packed)


def test_opting_out_makes_it_unavailable(monkeypatch):
  monkeypatch.setenv(library.OPT_OUT, "0")
  assert library.unavailable_reason("cpu") == f"{library.OPT_OUT}=0"
  assert library.unavailable_reason("gpu") is not None


# -- in the model and the sampler -----------------------------------------------------------------------------------


def _tiny_model():
  from flax import nnx

  from npp_jax import config as config_lib
  cfg = config_lib.model_config("B")
  cfg.update(dim=64, n_layer=2, n_head=4, vocab_size=96, num_classes=5, block_size=16, dtype="bfloat16")
  model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
  model.output[...] = np.random.default_rng(0).normal(0, 0.5, model.output.shape).astype(np.float32)
  return model


@needs_bf16_units
def test_decode_with_packed_kernels_matches_decode_with_xla_products():
  model = _tiny_model()
  params = model.decode_params("bfloat16")
  packed = jax.jit(gpt.pack_decode_params)(params)
  assert isinstance(packed["layers"][0]["wo"], packed_matmul.PackedKernel)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 64)), jnp.bfloat16)
  run = lambda p: gpt.decode(p, model.cfg, x, gpt.init_cache(model.cfg, 3, 17, jnp.bfloat16, 1), jnp.int32(0))
  (want, want_cache), (got, got_cache) = jax.jit(run)(params), jax.jit(run)(packed)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got_cache.k[1][0], np.float32), np.asarray(want_cache.k[1][0], np.float32),
                             rtol=2e-2, atol=2e-2)


@needs_bf16_units
def test_the_sampler_packs_in_bfloat16_on_one_device_and_samples_the_same_distribution():
  from npp_jax.sampling import decoding
  model = _tiny_model()
  one = jax.devices()[:1]
  auto, xla = decoding.Sampler(model, devices=one), decoding.Sampler(model, devices=one, packed=False)
  assert auto.packed and not xla.packed
  assert isinstance(auto.params["output"], packed_matmul.PackedKernel)
  assert not decoding.Sampler(model, dtype="float32", devices=one).packed
  assert not decoding.Sampler(model, devices=jax.devices()[:2]).packed
  labels, tokens = np.arange(4) % 5, np.random.default_rng(2).integers(0, 96, (4, 16))
  logits = [np.asarray(s.teacher_forced_logits(labels, tokens, cfg_scale=2.0)) for s in (auto, xla)]
  scale = float(np.abs(logits[1]).max())
  assert scale > 1  # logits that a rounding difference could change, not all near zero
  np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=0.03 * scale)
  settings = decoding.SamplingSettings(cfg_scale=2.0, greedy=True)
  agree = np.mean(np.asarray(auto(labels, jax.random.key(0), settings)) ==
                  np.asarray(xla(labels, jax.random.key(0), settings)))
  assert agree > 0.9


def test_requiring_the_packed_kernel_where_it_cannot_run_is_refused():
  from npp_jax.sampling import decoding
  with pytest.raises(errors.InvalidInput, match="computes in bfloat16, not float32"):
    decoding.Sampler(_tiny_model(), dtype="float32", devices=jax.devices()[:1], packed=True)
  with pytest.raises(errors.InvalidInput, match="one device, not 2"):
    decoding.Sampler(_tiny_model(), devices=jax.devices()[:2], packed=True)
