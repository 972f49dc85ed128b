"""The sampler against LlamaGen's generate() fixtures, independent numpy filters, and its invariances."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from npp_jax import config as config_lib
from npp_jax.kernels import library
from npp_jax.model_files import param_mapping
from npp_jax.sampling import decoding


def _fixture_model_config():
  cfg = config_lib.model_config("B")
  cfg.update(dim=128, n_layer=2, n_head=4, vocab_size=512, num_classes=10, block_size=64, dtype="float32")
  return cfg


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  """(GPT with the fixture weights, gen_io arrays)."""
  tiny = fixtures_dir / "llamagen_tiny"
  model = param_mapping.gpt_from_torch(tiny / "gpt.pt", _fixture_model_config())
  return model, dict(np.load(tiny / "gen_io.npz"))


@pytest.fixture(scope="module")
def sampler(reference):
  return decoding.Sampler(reference[0], dtype="float32")


# -- parity with the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale, suffix", [(4.0, ""), (1.0, "_nocfg")])
def test_teacher_forced_logits_match_reference(sampler, reference, cfg_scale, suffix):
  _, gen = reference
  logits = sampler.teacher_forced_logits(gen["labels"], gen["gen_tokens" + suffix], cfg_scale=cfg_scale)
  np.testing.assert_allclose(np.asarray(logits), gen["gen_logits" + suffix], rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg_scale, suffix", [(4.0, ""), (1.0, "_nocfg")])
def test_greedy_tokens_match_reference(reference, cfg_scale, suffix):
  model, gen = reference
  tokens = decoding.generate(model, gen["labels"], jax.random.key(0), cfg_scale=cfg_scale, greedy=True,
                             temperature=0.0, dtype="float32")
  np.testing.assert_array_equal(np.asarray(tokens), gen["gen_tokens" + suffix])


def test_cfg_interval_guides_only_the_first_tokens(sampler, reference):
  """With cfg_interval=k, tokens 0..k+1 see guided logits and later ones the conditional logits."""
  model, gen = reference
  k, labels, tokens = 5, gen["labels"], gen["gen_tokens"]
  mixed = np.asarray(sampler.teacher_forced_logits(labels, tokens, cfg_scale=4.0, cfg_interval=k))
  guided = np.asarray(sampler.teacher_forced_logits(labels, tokens, cfg_scale=4.0))
  conditional = np.asarray(sampler.teacher_forced_logits(labels, tokens, cfg_scale=1.0))
  np.testing.assert_array_equal(mixed[:, :k + 2], guided[:, :k + 2])
  np.testing.assert_allclose(mixed[:, k + 2:], conditional[:, k + 2:], rtol=0, atol=1e-5)
  assert np.abs(guided[:, k + 2:] - conditional[:, k + 2:]).max() > 1.0  # guidance does change those logits

  # The sampler follows the same rule: its greedy path agrees with full guidance up to token k+1, then follows
  # its own conditional-only logits.
  out = np.asarray(decoding.generate(model, labels, jax.random.key(0), cfg_scale=4.0, cfg_interval=k, greedy=True,
                                     dtype="float32"))
  np.testing.assert_array_equal(out[:, :k + 2], tokens[:, :k + 2])
  own = np.asarray(sampler.teacher_forced_logits(labels, out, cfg_scale=4.0, cfg_interval=k))
  np.testing.assert_array_equal(out, own.argmax(-1))
  assert (out != tokens).any()


def test_bfloat16_stays_close_to_float32(reference):
  model, gen = reference
  logits = decoding.Sampler(model, dtype="bfloat16").teacher_forced_logits(gen["labels"], gen["gen_tokens"],
                                                                            cfg_scale=4.0)
  assert logits.dtype == np.float32
  err = np.abs(np.asarray(logits) - gen["gen_logits"])
  assert 0 < err.max() < 0.05 * np.abs(gen["gen_logits"]).max()  # bf16 does run (not identical), and is close


# -- randomness ---------------------------------------------------------------------------------------------------


def test_samples_do_not_depend_on_batch_size_or_devices(reference):
  """Temperature sampling with guidance, top-k and top-p: batch 8 on 8 devices = batch 8, 2, 1 on one device."""
  model, _ = reference
  labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
  settings = decoding.SamplingSettings(cfg_scale=2.0, temperature=1.3, top_k=200, top_p=0.95)
  key = jax.random.key(42)
  assert len(jax.devices()) == 8
  all_devices = decoding.Sampler(model, dtype="float32")
  one_device = decoding.Sampler(model, dtype="float32", devices=jax.devices()[:1])
  reference_run = np.asarray(all_devices(labels, key, settings))
  assert reference_run.shape == (8, 64)
  assert len(np.unique(reference_run)) > 100  # really sampled, not a collapsed greedy path
  assert len({row.tobytes() for row in reference_run[[1, 3]]}) == 2  # same label, different samples

  np.testing.assert_array_equal(np.asarray(one_device(labels, key, settings)), reference_run)
  pairs = [np.asarray(one_device(labels[i:i + 2], key, settings, sample_offset=i)) for i in range(0, 8, 2)]
  np.testing.assert_array_equal(np.concatenate(pairs), reference_run)
  for i in (0, 5):
    single = np.asarray(one_device(labels[i:i + 1], key, settings, sample_offset=i))
    np.testing.assert_array_equal(single[0], reference_run[i])
  # 3 samples on 8 devices (padded to 8, padding dropped).
  np.testing.assert_array_equal(np.asarray(all_devices(labels[2:5], key, settings, sample_offset=2)),
                                reference_run[2:5])
  assert not np.array_equal(np.asarray(one_device(labels, jax.random.key(43), settings)), reference_run)


def test_draw_follows_the_softmax_and_never_picks_removed_tokens():
  """Inverse-CDF draws: frequencies match softmax(logits) (chi-square, false alarm 1e-4); -inf tokens never come."""
  logits = np.log(np.array([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.9, 0.1]], np.float32))  # log 0 = -inf
  n = 40_000
  keys = jax.random.split(jax.random.key(7), n * 2)
  tokens = np.asarray(jax.jit(decoding.draw)(keys, jnp.asarray(np.repeat(logits, n, axis=0)))).reshape(2, n)
  for row, probs in zip(tokens, np.exp(logits)):
    counts = np.bincount(row, minlength=probs.size)
    assert counts[probs == 0].sum() == 0
    expected = n * probs[probs > 0]
    chi2 = (((counts[probs > 0] - expected) ** 2) / expected).sum()
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-4, df=(probs > 0).sum() - 1)


# -- logit filters against numpy ----------------------------------------------------------------------------------


def _numpy_filter(logits, temperature, top_k, top_p):
  """The reference's sample(): temperature, then top-k, then HF nucleus filtering (sort, shift, scatter)."""
  logits = logits / max(temperature, 1e-5)
  if top_k > 0:
    kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
    logits = np.where(logits < kth, -np.inf, logits)
  if top_p < 1.0:
    order = np.argsort(-logits, axis=-1, kind="stable")
    ordered = np.take_along_axis(logits, order, axis=-1)
    probs = np.exp(ordered - ordered[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    remove = np.cumsum(probs, axis=-1) > top_p
    remove[:, 1:] = remove[:, :-1].copy()
    remove[:, 0] = False
    remove_original = np.zeros_like(remove)
    np.put_along_axis(remove_original, order, remove, axis=-1)
    logits = np.where(remove_original, -np.inf, logits)
  return logits


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.5, 20, 0.5), (0.5, 1, 0.9), (1.0, 50, 0.3), (2.0, 0, 0.999)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
  ours = np.asarray(decoding.filter_logits(logits, temperature, top_k, top_p if top_p < 1 else None))
  expected = _numpy_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
  np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


def test_top_p_keeps_the_token_that_crosses_the_threshold():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  kept = lambda p: np.isfinite(np.asarray(decoding.filter_logits(logits, 1.0, 0, p))).sum()
  assert [kept(0.2), kept(0.6), kept(0.85), kept(0.97)] == [1, 2, 3, 4]


def test_guide_mixes_raw_logits():
  rng = np.random.default_rng(1)
  cond, uncond = rng.normal(size=(2, 3, 7)).astype(np.float32)
  rows = np.stack([cond, uncond], axis=1).reshape(6, 7)
  np.testing.assert_allclose(np.asarray(decoding.guide(rows, 2.5, True)), uncond + 2.5 * (cond - uncond), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(decoding.guide(rows, 2.5, False)), cond)


# -- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=0.0), "use greedy"),
    (dict(cfg_scale=-2.0), "cfg_scale must be"),
    (dict(cfg_scale=0.5), "treats any value <= 1 as no guidance"),
    (dict(top_k=-1), "top_k must be"),
    (dict(top_k=513), "vocabulary size 512"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(cfg_interval=-2), "cfg_interval must be"),
])
def test_invalid_settings_are_refused(reference, kwargs, message):
  model, _ = reference
  with pytest.raises(ValueError, match=message):
    decoding.generate(model, [1], jax.random.key(0), **{"cfg_scale": 1.0, **kwargs})


@pytest.mark.parametrize("labels", [[10], [-1], [0, 11]])
def test_labels_outside_the_classes_are_refused(reference, labels):
  with pytest.raises(ValueError, match=r"not a class id in \[0, 10\)"):
    decoding.generate(reference[0], labels, jax.random.key(0), cfg_scale=2.0)


def test_unknown_dtype_is_refused(reference):
  with pytest.raises(ValueError, match="dtype must be one of"):
    decoding.Sampler(reference[0], dtype="float16")


# -- the compiled decode loop -------------------------------------------------------------------------------------


def _while_bodies(hlo: str) -> dict[str, list[str]]:
  """The instructions of every while-loop body of an optimised HLO module, by computation name."""
  names = set(re.findall(r"body=%([\w.\-]+)", hlo))
  bodies, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1) if header.group(1) in names else None
      if current:
        bodies[current] = []
    elif current and re.match(r"\s+(ROOT )?%", line):
      bodies[current].append(line.strip())
  return bodies


@pytest.mark.parametrize("dtype, packed", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_decode_loop_writes_the_cache_in_place_and_never_copies_weights(reference, dtype, packed):
  """In the compiled sampler, a loop step touches a cache chunk only by reading it or by an in-place
  dynamic-update-slice of its one new slot; no chunk and no weight matrix (as XLA or the packed kernel holds it) is
  copied per step."""
  model, _ = reference
  if packed and library.unavailable_reason("cpu"):
    pytest.skip(f"the packed kernel cannot run here: {library.unavailable_reason('cpu')}")
  sampler = decoding.Sampler(model, dtype=dtype, devices=jax.devices()[:1], packed=packed)
  cfg = sampler.cfg
  labels = np.arange(3, dtype=np.int32)
  static = decoding._Static(cfg=cfg, guided=True, top_k=0, use_top_p=False, greedy=False, mesh=sampler.mesh)
  hlo = decoding._generate.lower(sampler._params, labels, labels.astype(np.uint32), jax.random.key(0),
                                 jnp.float32(2.0), jnp.int32(-1), jnp.float32(1.0), jnp.float32(1.0),
                                 static=static).compile().as_text()
  head_dim = cfg.dim // cfg.n_head
  kind = {"float32": "f32", "bfloat16": "bf16"}[dtype]
  chunk = f"{kind}[6,{cfg.n_head},{cfg.block_size // 4},{head_dim}]"  # 3 samples x (cond, null), 4 chunks
  matrices = [(cfg.dim, 3 * cfg.dim), (cfg.dim, cfg.dim), (cfg.dim, cfg.vocab_size)]
  if packed:  # as the kernel holds them: (column blocks, K / 2, 32)
    weights = {f"bf16[{-(-n // 32) * 2},{k // 2},32]" for k, n in matrices}
  else:
    weights = {f"{kind}[{k},{n}]" for k, n in matrices}
  assert all(w in hlo for w in weights)  # the shapes the check looks for are the program's
  assert loops_touching(hlo, chunk, weights, writes=("dynamic-update-slice",)) == 4  # one scan per chunk


def loops_touching(hlo: str, cache: str, weights: set[str], writes: tuple[str, ...]) -> int:
  """Asserts that every while-loop body touches arrays of shape `cache` only by reading them or by an instruction
  named after one of `writes` (in-place updates), and never copies a `weights`-shaped array; returns how many
  bodies hold a `cache`-shaped array."""
  bodies = _while_bodies(hlo)
  assert bodies, "no while-loop body found in the HLO text"
  for body in bodies.values():
    for line in body:
      array = re.match(r"(?:ROOT )?%\S+ = (\w+\[[\d,]*\])(?:\{[\d,]*\})? ([\w-]+)\(", line)
      if array is None:  # a tuple-shaped instruction, or a line this check cannot read: then it must fail
        assert re.match(r"(?:ROOT )?%\S+ = \(.*\) [\w-]+\(", line), f"an HLO line the check cannot parse: {line[:200]}"
        continue
      shape, op = array.groups()
      if shape == cache:
        assert op in ("get-tuple-element", "bitcast") or any(w in line.split("=")[0] for w in writes), line[:200]
      assert not (shape in weights and op not in ("get-tuple-element", "bitcast", "parameter")), line[:200]
  return sum(any(f"= {cache}" in line for line in body) for body in bodies.values())
