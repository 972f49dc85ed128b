"""Sharding: train steps give the same loss and parameters on every (data, fsdp, tensor) mesh of the 8 CPU
devices as on one device, the state really is sharded, gradient accumulation equals one big batch, and the mesh
and batch checks refuse what cannot work."""

import functools
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from npp_jax import sharding
from npp_jax.config import load_file as load_config_file
from npp_jax.data import pipeline
from npp_jax.models import gpt
from npp_jax.trainers import gpt_trainer

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]
# The backend's cheapest optimisation level halves the compile time of these tests; whether partitioning changes
# the result is decided by the SPMD partitioner, which runs the same at every backend level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_config(**train_overrides):
  config = load_config_file(str(TINY))
  # A constant rate: the stagewise warmup has lr 0 at step 0, which would leave the parameters unchanged.
  # eps = 1 makes Adam's step about lr * gradient: with the default 1e-8, Adam scales every gradient entry to about
  # lr, so an entry that is zero up to rounding (they exist) moves by up to lr whatever its rounding, on any mesh.
  config.optim.update(schedule="constant", lr=0.05, eps=1.0)
  config.train.update(train_overrides)
  return config


def no_dropout(config):
  config.model.update(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
  return config


def single_device_mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def first_batch() -> dict[str, np.ndarray]:
  config = tiny_config()
  spec = pipeline.InputSpec(config.model.vocab_size, gpt.grid_side(config.model), config.model.num_classes)
  data = pipeline.TrainInput(config.data, spec, global_batch=config.train.global_batch_size, seed=config.seed)
  return next(data.iterator())


@functools.lru_cache(maxsize=None)
def initial_state() -> dict:
  """The freshly initialised train state as host numpy (made once on one device, placed on each mesh after)."""
  setup = gpt_trainer.build(tiny_config(), single_device_mesh(), 2048)
  state = gpt_trainer.fresh_state(setup)
  return jax.device_get(state)


def two_steps(config, mesh, patch_side: int):
  """(state on the mesh, loss of the second step) after two train steps from the common initial state and batch.

  Two steps, because the zero-initialised head makes the first loss log(vocab) whatever the rest computes.
  The step is compiled here (not at its first call) to pass FAST_COMPILE.
  """
  setup = gpt_trainer.build(config, mesh, config.data.num_images)
  state = jax.device_put(initial_state(), setup.state_shardings)
  batch = sharding.global_batch(first_batch(), mesh)
  step = gpt_trainer.make_train_step(setup, patch_side).lower(state, batch).compile(compiler_options=FAST_COMPILE)
  state, _ = step(state, batch)
  state, metrics = step(state, batch)
  return state, float(metrics.compute()["loss"])


@functools.lru_cache(maxsize=None)
def step_on_mesh(mesh_shape: tuple[int, ...], patch_side: int):
  mesh = single_device_mesh() if mesh_shape == (1, 1, 1) else sharding.make_mesh(mesh_shape)
  return two_steps(tiny_config(), mesh, patch_side)


def assert_same_params(a: dict, b: dict, atol: float):
  diffs = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)
  worst = max(jax.tree.leaves(diffs))
  assert worst <= atol, diffs


# -- mesh equivalence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_side", [2, 1])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_step_is_the_same_on_every_mesh(mesh_shape, patch_side):
  ref_state, ref_loss = step_on_mesh((1, 1, 1), patch_side)
  state, loss = step_on_mesh(mesh_shape, patch_side)
  # The loss is a float32 mean of B*G*G = 2048 terms, summed in another order on each mesh: equal to ~1e-5
  # relative. (The first step's loss, log(64) in every term, comes out 6e-5 from log(64) on one device.)
  assert loss == pytest.approx(ref_loss, rel=2e-5)
  assert int(state["step"]) == 2
  assert_same_params(jax.device_get(state["params"]), jax.device_get(ref_state["params"]), 1e-5)
  # The comparison is not vacuous: every matrix and embedding moved by far more than the tolerance (the norms'
  # gradients are tiny this early).
  moved = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda x, y: np.abs(np.asarray(x) - y).max(),
                                                            ref_state["params"], initial_state()["params"]))[0]
  assert min(m for path, m in moved if "norm" not in str(path[-1].key)) > 1e-4


def test_fsdp_mesh_shards_the_state():
  state, _ = step_on_mesh((1, 8, 1), 2)
  params, mu = state["params"], state["opt_state"][1][0].mu
  # tok_embeddings (vocab 64, embed 64): the model dimension is split 8 ways over 'fsdp'.
  assert params["tok_embeddings"].sharding.spec == P(None, "fsdp")
  assert {s.data.shape for s in params["tok_embeddings"].addressable_shards} == {(64, 8)}
  assert params["layers"]["wqkv"].sharding.spec == P(None, "fsdp", None, None, None)
  assert params["layers"]["w2"].sharding.spec == P(None, None, "fsdp")
  # Adam's moments are sharded like their parameters.
  assert mu["layers"]["w1"].sharding.spec == params["layers"]["w1"].sharding.spec == P(None, "fsdp", None)


def test_three_axis_mesh_shards_heads_and_ffn_over_tensor():
  state, _ = step_on_mesh((2, 2, 2), 2)
  params = state["params"]
  assert params["layers"]["wqkv"].sharding.spec == P(None, "fsdp", None, "tensor", None)
  # (layers 2, embed 64 / fsdp 2, qkv 3, heads 4 / tensor 2, head_dim 16)
  assert {s.data.shape for s in params["layers"]["wqkv"].addressable_shards} == {(2, 32, 3, 2, 16)}
  assert params["layers"]["w1"].sharding.spec == P(None, "fsdp", "tensor")
  assert params["output"].sharding.spec == P("fsdp", "tensor")
  assert params["norm"].sharding.spec == P("fsdp")
  assert state["step"].sharding.spec == P()


def test_gradient_accumulation_equals_one_big_batch():
  mesh = sharding.make_mesh((2, 2, 2))
  one, loss_one = two_steps(no_dropout(tiny_config(grad_accum_steps=1)), mesh, 2)
  two, loss_two = two_steps(no_dropout(tiny_config(grad_accum_steps=2)), mesh, 2)
  assert loss_two == pytest.approx(loss_one, rel=2e-5)
  assert_same_params(jax.device_get(two["params"]), jax.device_get(one["params"]), 1e-5)


# -- rules and checks -----------------------------------------------------------------------------------------


def test_spec_for_drops_mesh_axes_that_do_not_divide():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.spec_for(("vocab", "embed"), (64, 64), mesh) == P("tensor", "fsdp")
  assert sharding.spec_for(("vocab", "embed"), (63, 64), mesh) == P(None, "fsdp")
  assert sharding.spec_for(("classes", "embed"), (11, 6), mesh) == P(None, "fsdp")
  assert sharding.spec_for(("classes", "embed"), (11, 5), mesh) == P(None, None)
  assert sharding.spec_for(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
  assert sharding.spec_for(("batch", None), (6, 3), mesh) == P(None, None)
  # Axes of size 1 are never named.
  assert sharding.spec_for(("vocab", "embed"), (64, 64), sharding.make_mesh((8, 1, 1))) == P(None, None)


def test_dimensions_the_mesh_cannot_split_are_listed_and_refused_on_request():
  mesh = sharding.make_mesh((1, 4, 2))
  assert gpt_trainer.build(tiny_config(), mesh, 2048).unsharded == []
  config = tiny_config()
  config.model.vocab_size = 63  # the tensor axis (2) cannot split the vocabulary
  setup = gpt_trainer.build(config, mesh, 2048)
  assert [(u.path, u.dim, u.logical, u.mesh_axes) for u in setup.unsharded] == [
      ("output", 1, "vocab", ("tensor",)), ("tok_embeddings", 0, "vocab", ("tensor",))]
  # Whole along the vocabulary, still split 4 ways along embed; Adam keeps two float32 moments beside it.
  per_device = gpt_trainer.state_bytes_per_device(setup)
  assert per_device["tok_embeddings"] == per_device["output"] == 3 * 63 * (64 // 4) * 4
  assert per_device["layers/w1"] == 3 * 2 * 64 * 256 * 4 // 8  # a fully split parameter, for contrast
  lines = gpt_trainer.replication_lines(setup)
  assert len(lines) == 3 and lines[-1].startswith("2 parameters not fully sharded, 0.023 MiB per device")
  config.mesh.require_sharded = True
  with pytest.raises(ValueError, match=r"^parameter output dimension 1 \(vocab, size 63\) is not split over mesh "
                                       r"axis tensor \(2 devices, which do not divide it\), and mesh.require_sharded"):
    gpt_trainer.build(config, mesh, 2048)


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  for bad, message in [((3, -1, 1), "does not divide"), ((2, 2, 1), "needs 4 devices"), ((-1, -1, 1), "at most one"),
                       ((8, 1), "needs 3 sizes"), ((0, 8, 1), "positive")]:
    with pytest.raises(ValueError, match=message):
      sharding.resolve_mesh_shape(bad, 8)


@pytest.mark.parametrize("batch, accum, message", [
    (12, 1, "micro-batch of 12 does not split over the 8 devices"),
    (32, 3, "not a multiple of train.grad_accum_steps=3"),
    (32, 8, "micro-batch of 4 does not split over the 8 devices"),
])
def test_batches_that_do_not_split_are_refused(batch, accum, message):
  config = tiny_config(global_batch_size=batch, grad_accum_steps=accum)
  with pytest.raises(ValueError, match=message):
    gpt_trainer.build(config, sharding.make_mesh((8, 1, 1)), 2048)


def test_pad_shard_unpad_pads_splits_and_cuts_back():
  mesh = sharding.one_axis_mesh(jax.devices())
  seen = []

  def rows(x, y, *, scale):
    seen.append((x.shape, x.sharding.spec, y.dtype))
    return {"sum": (x + y) * scale, "x": x}

  out = sharding.pad_shard_unpad(rows, mesh)(np.arange(5), np.ones(5, np.int32), scale=2)
  assert seen == [((8,), P(sharding.ONE_AXIS), np.int32)]  # padded to the 8 devices, split over them
  np.testing.assert_array_equal(out["sum"], 2 * (np.arange(5) + 1))
  assert out["x"].shape == (5,)
  fixed = sharding.pad_shard_unpad(lambda x: x * 1, size=4)  # no mesh: one shape for every batch
  np.testing.assert_array_equal(fixed(np.arange(3)), np.arange(3))
  with pytest.raises(ValueError, match="does not pad to 4 rows"):
    fixed(np.arange(5))

