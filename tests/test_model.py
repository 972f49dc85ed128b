"""The GPT: parameter counts, the 2D RoPE table and rotation, parity with LlamaGen's PyTorch GPT (fixtures)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from npp_jax import config as config_lib
from npp_jax import npp
from npp_jax.model_files import param_mapping
from npp_jax.model_files import torch_io
from npp_jax.models import gpt
from npp_jax.models import rope

# LlamaGen's Table 1 / the reference's exact c2i counts (1001-row class table, untied 16384-way head).
REFERENCE_PARAMETERS = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672}

# gpt_io.npz names NPP outputs by tokens per patch (k^2); the model takes the patch side k.
FIXTURE_SUFFIX = {1: "", 2: "_p4", 4: "_p16", 8: "_p64"}
LOSS_KEY = {1: "loss_p1", 2: "loss_p4", 4: "loss_p16", 8: "loss_p64"}


def fixture_model_config(scan_layers: bool = True):
  cfg = config_lib.model_config("B")
  cfg.update(dim=128, n_layer=2, n_head=4, vocab_size=512, num_classes=10, block_size=64, dtype="float32",
             scan_layers=scan_layers)
  return cfg


def params_from_reference(sd: dict[str, np.ndarray], cfg) -> dict:
  """The NNX parameter dict of a reference state dict, by the layout mapping of the spec (independent of convert)."""
  n, d, h = cfg.n_layer, cfg.dim, cfg.n_head
  hd = d // h
  st = lambda key: np.stack([sd[f"layers.{i}.{key}"] for i in range(n)])
  return {
      "tok_embeddings": sd["tok_embeddings.weight"],
      "cls_embedding": sd["cls_embedding.embedding_table.weight"],
      "norm": sd["norm.weight"],
      "output": sd["output.weight"].T,
      "layers": {
          "attention_norm": st("attention_norm.weight"),
          "ffn_norm": st("ffn_norm.weight"),
          "wqkv": st("attention.wqkv.weight").reshape(n, 3, h, hd, d).transpose(0, 4, 1, 2, 3),
          "wo": st("attention.wo.weight").reshape(n, d, h, hd).transpose(0, 2, 3, 1),
          "w1": st("feed_forward.w1.weight").transpose(0, 2, 1),
          "w3": st("feed_forward.w3.weight").transpose(0, 2, 1),
          "w2": st("feed_forward.w2.weight").transpose(0, 2, 1),
      },
  }


def model_with_params(cfg, params: dict) -> gpt.GPT:
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def fresh_model(cfg, seed: int = 0) -> gpt.GPT:
  """A newly initialised GPT, initialised under jit (eager initialisation dispatches op by op, slowly)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(gpt.GPT(cfg, rngs=nnx.Rngs(seed)), nnx.Param)))()
  return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnames=("patch_side", "deterministic"))
def forward(model, tokens, labels, dropout_rng=None, *, patch_side=1, deterministic=True):
  """The training-path forward, compiled (one compilation per model structure and patch side)."""
  return model(tokens, labels, patch_side=patch_side, deterministic=deterministic, dropout_rng=dropout_rng)


@jax.jit
def decode_full_sequence(model, tokens, labels):
  """Eval-mode logits after [class token, every token]: one decode call over the whole sequence from position 0."""
  x = jnp.concatenate([model.class_embedding(labels), model.token_embedding(tokens)], axis=1)
  logits, _ = model.decode(x, model.init_cache(tokens.shape[0]), jnp.int32(0))
  return logits


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  """(state dict of gpt.pt, arrays of gpt_io.npz)."""
  tiny = fixtures_dir / "llamagen_tiny"
  return torch_io.load_state_dict(tiny / "gpt.pt"), dict(np.load(tiny / "gpt_io.npz"))


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def fixture_model(request, reference):
  cfg = fixture_model_config(scan_layers=request.param)
  return model_with_params(cfg, params_from_reference(reference[0], cfg))


# -- parameter counts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(REFERENCE_PARAMETERS))
def test_parameter_count_matches_llamagen(size):
  assert gpt.num_parameters(config_lib.model_config(size)) == REFERENCE_PARAMETERS[size]


def test_parameter_count_equals_the_built_model():
  cfg = config_lib.model_config("B")
  abstract = nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(math.prod(leaf.shape) for leaf in leaves) == REFERENCE_PARAMETERS["B"]
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # parameters stay float32 whatever the compute dtype


def test_fixture_model_count(reference):
  sd, _ = reference
  assert gpt.num_parameters(fixture_model_config()) == sum(v.size for v in sd.values()) == 657_408


# -- RoPE -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, head_dim", [(4, 32), (8, 16), (2, 64)])
def test_rope_table_matches_the_formula(grid, head_dim):
  cos, sin = rope.rope_table(grid, head_dim)
  half, freqs = head_dim // 2, head_dim // 4
  assert cos.shape == sin.shape == (1 + grid * grid, half)
  # The class token's row is all zeros, cos included: its q and k vanish in every layer.
  assert not cos[0].any() and not sin[0].any()
  w = [10000.0 ** (-2 * i / half) for i in range(freqs)]
  for r in range(grid):
    for c in range(grid):
      angles = np.array([r * wi for wi in w] + [c * wi for wi in w])
      np.testing.assert_allclose(cos[1 + r * grid + c], np.cos(angles), rtol=0, atol=1e-6)
      np.testing.assert_allclose(sin[1 + r * grid + c], np.sin(angles), rtol=0, atol=1e-6)


def test_rope_table_refuses_head_dim_not_divisible_by_4():
  with pytest.raises(ValueError, match="head_dim"):
    rope.rope_table(4, 30)


def test_apply_rope_rotates_interleaved_pairs():
  rng = np.random.default_rng(0)
  b, t, n, d = 2, 5, 3, 8
  x = rng.normal(size=(b, t, n, d)).astype(np.float32)
  angles = rng.uniform(-np.pi, np.pi, size=(1, t, d // 2)).astype(np.float32)
  out = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles)))
  # Pair j = (x[2j], x[2j+1]) is the complex number x[2j] + i x[2j+1], multiplied by exp(i angle_j).
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles[:, :, None, :])
  expected = np.stack([z.real, z.imag], axis=-1).reshape(b, t, n, d)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_class_token_row_zeroes_queries_and_keys():
  cos, sin = rope.rope_table(4, 16)
  x = jnp.ones((1, 2, 2, 16))
  out = np.asarray(rope.apply_rope(x, jnp.asarray(cos[None, :2]), jnp.asarray(sin[None, :2])))
  assert not out[:, 0].any()  # class token (row 0): zero
  np.testing.assert_allclose(out[:, 1], 1.0, atol=1e-6)  # first image token (row 1 = cell (0, 0)): angle 0


# -- parity with LlamaGen / NPP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_side", [1, 2, 4, 8])
def test_logits_and_losses_match_the_reference(fixture_model, reference, patch_side):
  _, io = reference
  logits = forward(fixture_model, jnp.asarray(io["tokens"]), jnp.asarray(io["labels"]), patch_side=patch_side)
  expected = io["logits" + FIXTURE_SUFFIX[patch_side]]
  assert logits.dtype == jnp.float32 and logits.shape == expected.shape
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)
  loss = npp.patch_loss(logits, jnp.asarray(io["tokens"]), patch_side)
  np.testing.assert_allclose(float(loss), float(io[LOSS_KEY[patch_side]]), rtol=0, atol=1e-5)


def test_decode_over_the_full_sequence_matches_eval_mode(fixture_model, reference):
  _, io = reference
  logits = decode_full_sequence(fixture_model, jnp.asarray(io["tokens"]), jnp.asarray(io["labels"]))
  assert logits.shape == (3, 65, 512)
  np.testing.assert_allclose(np.asarray(logits[:, -1]), io["logits_eval_last"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[:, :-1]), io["logits"], rtol=0, atol=1e-5)


def test_identity_class_rope_would_change_the_function(reference, monkeypatch):
  """The fixtures depend on the all-zero class row: an identity rotation there gives other logits."""
  sd, io = reference
  cfg = fixture_model_config()
  model = model_with_params(cfg, params_from_reference(sd, cfg))
  original = rope.rope_table

  def identity_class_row(*args, **kwargs):
    cos, sin = original(*args, **kwargs)
    cos = cos.copy()
    cos[0] = 1.0
    return cos, sin

  monkeypatch.setattr(rope, "rope_table", identity_class_row)
  # A new jit (not `forward`), so the model is traced again with the patched table.
  logits = jax.jit(lambda m, tokens, labels: m(tokens, labels))(model, jnp.asarray(io["tokens"]),
                                                                jnp.asarray(io["labels"]))
  assert np.abs(np.asarray(logits) - io["logits"]).max() > 1e-3


def test_converter_matches_the_spec_mapping(reference, fixtures_dir):
  """param_mapping.gpt_from_torch fills the same parameters as the layout mapping above."""
  cfg = fixture_model_config()
  model = param_mapping.gpt_from_torch(fixtures_dir / "llamagen_tiny" / "gpt.pt", cfg)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  expected = params_from_reference(reference[0], cfg)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, expected)


# -- initialisation and modes -----------------------------------------------------------------------------------


def test_zero_initialised_head_gives_uniform_logits():
  cfg = fixture_model_config()
  model = fresh_model(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size)), jnp.int32)
  logits = forward(model, tokens, jnp.array([1, cfg.num_classes]), patch_side=2)
  assert logits.shape == (2, 16, cfg.vocab_size) and not np.asarray(logits).any()
  np.testing.assert_allclose(float(npp.patch_loss(logits, tokens, 2)), math.log(cfg.vocab_size), rtol=1e-6)
  # Everything else is drawn from N(0, 0.02); norms start at one.
  assert abs(float(jnp.std(model.tok_embeddings[...])) - 0.02) < 2e-3
  assert np.all(np.asarray(model.layers.attention_norm[...]) == 1.0)
  assert model.cls_embedding[...].shape == (cfg.num_classes + 1, cfg.dim)  # + the null class


def test_training_mode_dropout_is_keyed(fixture_model, reference):
  _, io = reference
  tokens, labels = jnp.asarray(io["tokens"]), jnp.asarray(io["labels"])
  run = lambda key: np.asarray(forward(fixture_model, tokens, labels, key, patch_side=2, deterministic=False))
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  assert np.abs(a - io["logits_p4"]).max() > 1e-3
  with pytest.raises(ValueError, match="dropout_rng"):
    fixture_model(tokens, labels, deterministic=False)


def test_invalid_model_configs_are_refused():
  cfg = fixture_model_config()
  cfg.block_size = 60
  with pytest.raises(ValueError, match="square"):
    gpt.grid_side(cfg)
  cfg = fixture_model_config()
  cfg.n_head = 3
  with pytest.raises(ValueError, match="divisible"):
    gpt.GPT(cfg, rngs=nnx.Rngs(0))


# -- bfloat16 compute ---------------------------------------------------------------------------------------------


def _bf16(a):
  return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_products_and_their_gradients_are_float32_products_of_rounded_operands():
  """A bf16 product (and each of its two backward products) equals the float32 product of its operands rounded to
  bfloat16, accumulated in float32; x's gradient comes back in bfloat16, the float32 weight's in float32."""
  rng = np.random.default_rng(0)
  x, w, g = rng.normal(size=(96, 48)), rng.normal(size=(48, 2, 40)), rng.normal(size=(96, 2, 40))
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  y, vjp = jax.vjp(gpt._dense, x_bf16, jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(g, jnp.float32))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  xr, wr, gr = _bf16(x), _bf16(w).reshape(48, 80), _bf16(g).reshape(96, 80)
  np.testing.assert_allclose(np.asarray(y).reshape(96, 80), xr @ wr, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw).reshape(48, 80), xr.T @ gr, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx, np.float32), _bf16(gr @ wr.T), rtol=1e-2, atol=1e-2)


def test_dense_casts_inside_the_product_so_the_cotangent_arrives_in_the_output_dtype():
  """`_dense(..., out_dtype=bfloat16)` is the float32 product rounded to bfloat16, and its backward pass takes the
  bfloat16 cotangent as it comes: the gradients are those of the float32 product for that cotangent."""
  rng = np.random.default_rng(2)
  x, w, g = rng.normal(size=(64, 32)), rng.normal(size=(32, 48)), rng.normal(size=(64, 48))
  x_bf16, w32, g_bf16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.bfloat16)
  y, vjp = jax.vjp(lambda a, b: gpt._dense(a, b, jnp.bfloat16), x_bf16, w32)
  assert y.dtype == jnp.bfloat16
  want, want_vjp = jax.vjp(gpt._dense, x_bf16, w32)
  np.testing.assert_array_equal(np.asarray(y, np.float32), _bf16(np.asarray(want)))
  for got, expected in zip(vjp(g_bf16), want_vjp(g_bf16.astype(jnp.float32))):
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_and_its_gradient_match_autodiff_of_silu_times_gate(dtype):
  """`gpt._swiglu` (one fused pass forward, the sigmoid recomputed backward) against autodiff of
  `jax.nn.silu(a) * b` computed in float32, for inputs across silu's curved range."""
  rng = np.random.default_rng(3)
  a, b, g = (jnp.asarray(rng.normal(scale=3.0, size=(16, 40)), dtype) for _ in range(3))
  reference_fn = lambda a, b: (jax.nn.silu(a.astype(jnp.float32)) * b.astype(jnp.float32)).astype(a.dtype)
  assert gpt._swiglu(a, b).dtype == jnp.dtype(dtype)
  # bfloat16: both round the same float32 values once; the gradients' float32 formulas differ in the last bits.
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
  _assert_same_function_and_vjp(gpt._swiglu, reference_fn, (a, b), g, "ab", tol)


def test_bfloat16_model_tracks_the_float32_reference(reference):
  """The fixture model computing in bfloat16 (float32 parameters, logits and losses) stays within pinned distances of
  the reference's float32 outputs, on the training path and the decode path."""
  _, io = reference
  cfg = fixture_model_config()
  cfg.dtype = "bfloat16"
  model = model_with_params(cfg, params_from_reference(reference[0], cfg))
  tokens, labels = jnp.asarray(io["tokens"]), jnp.asarray(io["labels"])
  for patch_side in (1, 2):
    logits = forward(model, tokens, labels, patch_side=patch_side)
    assert logits.dtype == jnp.float32
    # Measured: 0.007 on logits of magnitude up to 1.06, 1.3e-4 on the loss.
    np.testing.assert_allclose(np.asarray(logits), io["logits" + FIXTURE_SUFFIX[patch_side]], rtol=0, atol=0.02)
    loss = npp.patch_loss(logits, tokens, patch_side)
    np.testing.assert_allclose(float(loss), float(io[LOSS_KEY[patch_side]]), rtol=0, atol=1e-3)
  decoded = decode_full_sequence(model, tokens, labels)
  np.testing.assert_allclose(np.asarray(decoded[:, :-1]), io["logits"], rtol=0, atol=0.02)


def test_bfloat16_training_step_runs_every_dense_product_on_bfloat16_operands(reference):
  """In the compiled loss gradient at bfloat16, every product without batch axes (the projections, the FFN, the
  head, forward and backward) takes bfloat16 operands: on XLA:CPU a float32 operand means float32 speed."""
  _, io = reference
  cfg = fixture_model_config(scan_layers=False)
  cfg.dtype = "bfloat16"
  model = model_with_params(cfg, params_from_reference(reference[0], cfg))
  graphdef, params = nnx.split(model)
  tokens, labels = jnp.asarray(io["tokens"]), jnp.asarray(io["labels"])
  loss = lambda p: npp.patch_loss(nnx.merge(graphdef, p)(tokens, labels), tokens, 1)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  dense = []
  for line in hlo.splitlines():
    if " dot(" not in line:
      continue
    operands = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
    assert operands, f"unparsed dot: {line.strip()[:200]}"
    if "batch_dims" not in line:
      dense.append((line.strip()[:160], [types[name] for name in operands.groups()]))
  # 4 projections forward and 8 backward per layer (wqkv, wo, w1/w3 fused or not, w2) and 3 for the head, at least.
  assert len(dense) >= 3 * cfg.n_layer * 2 + 3, len(dense)
  assert all(kinds == ["bf16", "bf16"] for _, kinds in dense), [d for d in dense if d[1] != ["bf16", "bf16"]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unrolled_gradients_equal_autodiff_through_the_scan_path(reference, dtype):
  """The unrolled path computes each layer's kernel inside its products (`gpt._stacked_matmul`, a custom VJP that
  recomputes it for the backward pass); its gradients, RMSNorm weights included, equal plain autodiff through the
  scan path's slices and folded norms."""
  _, io = reference
  tokens, labels = jnp.asarray(io["tokens"]), jnp.asarray(io["labels"])
  grads = {}
  for scan_layers in (True, False):
    cfg = fixture_model_config(scan_layers=scan_layers)
    cfg.dtype = dtype
    params = params_from_reference(reference[0], cfg)
    rng = np.random.default_rng(1)  # norm weights away from 1, so that folding them matters
    for name in ("attention_norm", "ffn_norm"):
      params["layers"][name] = rng.uniform(0.5, 1.5, params["layers"][name].shape).astype(np.float32)
    graphdef, state = nnx.split(model_with_params(cfg, params))
    loss = lambda p, graphdef=graphdef: npp.patch_loss(nnx.merge(graphdef, p)(tokens, labels), tokens, 1)
    grads[scan_layers] = nnx.to_pure_dict(jax.jit(jax.grad(loss))(state))
  # In bfloat16 the two paths round activations' gradients in different orders: a bfloat16 ulp apart, while a
  # wrong fold would be off by the norm weights (0.5-1.5).
  rtol, atol = (1e-4, 1e-5) if dtype == "float32" else (2e-2, 1e-2)
  flat_scan, flat_unrolled = (jax.tree_util.tree_leaves_with_path(grads[s]) for s in (True, False))
  for (path, want), (_, got) in zip(flat_scan, flat_unrolled):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol,
                               atol=atol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_norms_applied_to_the_activations_equal_norms_folded_into_the_kernels(reference, scan_layers, monkeypatch):
  """Where folding does not pay (`gpt._fold_pays`: fewer rows than the kernels' columns) the RMSNorm weights scale
  the normalised activations instead: the same logits and gradients, the norms' own included."""
  _, io = reference
  tokens, labels = jnp.asarray(io["tokens"]), jnp.asarray(io["labels"])
  cfg = fixture_model_config(scan_layers=scan_layers)
  params = params_from_reference(reference[0], cfg)
  rng = np.random.default_rng(2)  # norm weights away from 1, and a head that is not zero
  for name in ("attention_norm", "ffn_norm"):
    params["layers"][name] = rng.uniform(0.5, 1.5, params["layers"][name].shape).astype(np.float32)
  params["norm"] = rng.uniform(0.5, 1.5, params["norm"].shape).astype(np.float32)
  params["output"] = rng.normal(0, 0.02, params["output"].shape).astype(np.float32)
  graphdef, state = nnx.split(model_with_params(cfg, params))
  loss = lambda p: npp.patch_loss(nnx.merge(graphdef, p)(tokens, labels), tokens, 1)
  results = {}
  for fold in (True, False):
    monkeypatch.setattr(gpt, "_fold_pays", lambda rows, columns, fold=fold: fold)
    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    results[fold] = float(value), nnx.to_pure_dict(grads)
  assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
  flat_folded, flat_applied = (jax.tree_util.tree_leaves_with_path(results[f][1]) for f in (True, False))
  for (path, want), (_, got) in zip(flat_folded, flat_applied):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unrolled_backward_keeps_no_copy_of_the_layer_kernels(dtype):
  """With the activations tiny, the compiled gradient's temporaries stay well under one copy of the layers' kernels:
  the backward pass recomputes each layer's kernel from the stack instead of keeping the forward pass's slices and
  casts (which took 1.1x-1.5x the kernels' size here; 0.66x-0.73x without them)."""
  cfg = config_lib.model_config("B")
  cfg.update(dim=256, n_layer=4, n_head=4, vocab_size=64, num_classes=10, block_size=16, dtype=dtype,
             scan_layers=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
  tokens, labels = jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32)
  loss = lambda p: npp.patch_loss(nnx.merge(graphdef, p)(tokens, labels), tokens, 1)
  temp = jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes
  kernels = sum(v.size * 4 for k, v in nnx.to_pure_dict(state)["layers"].items() if k.startswith("w"))
  assert temp < 0.85 * kernels, (temp, kernels)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_our_attention_matches_jax_attention_and_its_gradient(dtype, recompute):
  """`gpt._causal_attention`, keeping a log-sum-exp and recomputing the probabilities for the backward pass or keeping
  the probabilities, against `jax.nn.dot_product_attention(is_causal=True)`'s XLA path: outputs and all three input
  gradients."""
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.normal(size=(2, 24, 4, 16)), dtype) for _ in range(4))
  theirs = lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, implementation="xla")
  ours = lambda *a: gpt._causal_attention(*a, recompute)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
  _assert_same_function_and_vjp(ours, theirs, (q, k, v), g, "qkv", tol)


def _assert_same_function_and_vjp(ours_fn, theirs_fn, inputs, g, names, tol):
  """ours_fn and theirs_fn agree on `inputs` and their input gradients for the cotangent g agree, dtypes included."""
  ours, ours_vjp = jax.vjp(ours_fn, *inputs)
  theirs, theirs_vjp = jax.vjp(theirs_fn, *inputs)
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), **tol)
  for name, got, want in zip(names, ours_vjp(g), theirs_vjp(g)):
    assert got.dtype == want.dtype, name
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name, **tol)


def test_auto_attention_recomputes_from_long_sequences_on_a_cpu(monkeypatch):
  """'auto' on a CPU: our attention recomputing the probabilities from RECOMPUTE_ATTENTION_FROM positions on,
  keeping them below."""
  calls = []
  monkeypatch.setattr(gpt, "_causal_attention", lambda q, k, v, recompute: calls.append((q.shape[1], recompute)) or q)
  for t in (gpt.RECOMPUTE_ATTENTION_FROM - 1, gpt.RECOMPUTE_ATTENTION_FROM):
    q = jnp.zeros((1, t, 1, 8), jnp.float32)
    gpt._training_attention(q, q, q, "auto")
  assert calls == [(gpt.RECOMPUTE_ATTENTION_FROM - 1, False), (gpt.RECOMPUTE_ATTENTION_FROM, True)]
