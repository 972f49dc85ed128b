# ruff: noqa: E501
"""The collective census: the parser on hand-written HLO, and the traffic of the compiled train step pinned for the
layouts users run (data, FSDP, data x FSDP, FSDP x tensor) on the 8 CPU devices, with gradient accumulation that
moves no batch rows, and a sampler whose decode loop holds no collective.

XLA:CPU reduces FSDP gradients with all-reduces where a TPU reduce-scatters; the census pinned here is the CPU's.
"""

import functools
import math
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from npp_jax import sharding
from npp_jax.config import load_file as load_config_file
from npp_jax.models import gpt
from npp_jax.sampling import decoding
from npp_jax.trainers import hlo_census
from npp_jax.trainers import gpt_trainer

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # LLVM's level: the partitioner and HLO passes run the same


# -- the parser ---------------------------------------------------------------------------------------------------

# HLO instructions are one line each, as XLA prints them; ruff's line length does not apply inside this text.
HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %p = (s32[], f32[16,4]) parameter(0)
  %x = f32[16,4]{1,0} get-tuple-element(%p), index=1
  %ar = f32[16,4]{1,0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[16,4]) tuple(%i, %ar)
}

%outer_body (p: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %p = (s32[], f32[16,4]) parameter(0)
  %ag = bf16[8,32]{1,0} all-gather(%y), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  ROOT %w = (s32[], f32[16,4]) while(%p), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}

%unknown_body (p: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %a2a = (s32[2,2]{1,0}, s32[2,2]{1,0}) all-to-all(%u, %v), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}
}

%counted_cond (p: (s32[], f32[16,4])) -> pred[] {
  %p = (s32[], f32[16,4]) parameter(0)
  %n = s32[] constant(7)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%counted_body (p: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %p = (s32[], f32[16,4]) parameter(0)
  %two = s32[] constant(2)
  %i = s32[] get-tuple-element(%p), index=0
  %i.copy = s32[] copy(%i)
  %x = f32[16,4]{1,0} get-tuple-element(%p), index=1
  %rs = f32[4,4]{1,0} reduce-scatter(%x), channel_id=7, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %next = s32[] add(%i.copy, %two)
  ROOT %t = (s32[], f32[16,4]) tuple(%next, %x)
}

ENTRY %main (x: f32[16,4]) -> f32[16,4] {
  %x = f32[16,4]{1,0} parameter(0)
  %two = s32[] constant(2)
  %start = s32[] copy(%two)
  %init = (s32[], f32[16,4]) tuple(%start, /*index=1*/%x)
  %w3 = (s32[], f32[16,4]) while(%init), condition=%counted_cond, body=%counted_body
  %w = (s32[], f32[16,4]) while(%t), condition=%cond, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
  %w2 = (s32[], f32[16,4]) while(%t), condition=%cond, body=%unknown_body
  %cp = f32[4,4]{1,0} collective-permute(%x), channel_id=4, source_target_pairs={{0,4},{4,0},{1,5},{5,1}}
  %cp2 = f32[4,4]{1,0} collective-permute(%x), channel_id=5, source_target_pairs={{0,0},{1,1}}
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start(%x), channel_id=6, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  ROOT %r = f32[16,4]{1,0} copy(%x)
}
"""


def test_census_reads_every_spelling_of_device_groups_and_multiplies_loop_trips():
  found = hlo_census.census(HLO, sharding.make_mesh((2, 4, 1)))
  by_kind = {c.kind: c for c in found}
  assert len(found) == 6  # the self-permute moves nothing; the -done half of an async pair is not counted
  # [2,4]<=[4,2]T(1,0): groups {0,2,4,6}, {1,3,5,7}, which no mesh axis makes; 2 x 3 trips of the nested loops.
  ar = by_kind["all-reduce"]
  assert (ar.axes, ar.group_size, ar.bytes, ar.calls, ar.in_loop) == (None, 4, 16 * 4 * 4, 6, True)
  # {{0,1,2,3},{4,5,6,7}}: the fsdp axis; bf16 is 2 bytes; runs once per outer trip.
  ag = [c for c in found if c.kind == "all-gather" and c.in_loop][0]
  assert (ag.axes, ag.bytes, ag.calls) == (("fsdp",), 8 * 32 * 2, 2)
  # The mesh spelling with a transposed device list: axis_1 of [[0,4],[1,5],[2,6],[3,7]] is the data axis; the
  # loop around it has no known trip count, so neither has the collective.
  a2a = by_kind["all-to-all"]
  assert (a2a.axes, a2a.group_size, a2a.bytes, a2a.calls, a2a.bytes_per_step) == (("data",), 2, 32, None, None)
  cp = by_kind["collective-permute"]
  assert (cp.axes, cp.bytes, cp.calls, cp.in_loop) == (("data",), 64, 1, False)
  # all-gather-start returns (operand, result): the result is what arrives.
  start = [c for c in found if c.kind == "all-gather" and not c.in_loop][0]
  assert (start.axes, start.bytes, start.calls) == (("fsdp",), 8 * 4 * 4, 1)
  assert start.wire_bytes_per_step == pytest.approx(3 / 4 * 128)
  assert ar.wire_bytes_per_step == pytest.approx(2 * 3 / 4 * 256 * 6)
  # A loop without XLA's annotation (as TPU prints them, its body unrolled twice): i = 2, 4, 6 while i < 7.
  rs = by_kind["reduce-scatter"]
  assert (rs.axes, rs.bytes, rs.calls, rs.in_loop) == (("fsdp",), 64, 3, True)
  assert rs.wire_bytes_per_step == pytest.approx(3 * 64 * 3)


def test_unknown_device_group_spellings_are_refused():
  sub_axis = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0':(1)2}"
  hlo = HLO.replace("replica_groups={{0,1,2,3},{4,5,6,7}}", sub_axis)
  with pytest.raises(ValueError, match="unrecognised replica groups"):
    hlo_census.census(hlo, sharding.make_mesh((2, 4, 1)))


# -- the train step ---------------------------------------------------------------------------------------------


def tiny_config(accum: int = 1):
  config = load_config_file(str(TINY))
  config.train.grad_accum_steps = accum
  return config


@functools.lru_cache(maxsize=None)
def step_census(mesh_shape: tuple[int, ...], accum: int = 1, fold_norms: bool = True) -> tuple[list, dict]:
  """(census of the compiled stage-2 train step, the parameter shapes) for the tiny config on a mesh, with the RMSNorm
  weights folded into the kernels they feed (what the model does for batches of many rows) or not."""
  config = tiny_config(accum)
  mesh = sharding.make_mesh(mesh_shape)
  setup = gpt_trainer.build(config, mesh, config.data.num_images)
  step = gpt_trainer.make_train_step(setup, 2)
  with mock.patch.object(gpt, "_fold_pays", lambda rows, columns: fold_norms):
    compiled = step.lower(setup.abstract_state, gpt_trainer.abstract_batch(setup)).compile(
        compiler_options=FAST_COMPILE)
  return hlo_census.census(compiled.as_text(), mesh), setup.abstract_state["params"]


def nbytes(tree) -> int:
  return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def layer_matrices(params) -> int:
  """Bytes of the stacked layers' weight matrices (the norms are vectors folded into them)."""
  return sum(nbytes(a) for a in params["layers"].values() if a.ndim >= 3)


def norms(params) -> int:
  return nbytes([a for k, a in params["layers"].items() if a.ndim < 3]) + nbytes(params["norm"])


def in_loop_bytes(census, kind, axes) -> int:
  return sum(c.bytes_per_step for c in census if c.kind == kind and c.axes == axes and c.in_loop)


def assert_only(census, allowed: set) -> None:
  """Every collective is one of the `allowed` (kind, axes); a new one fails with its HLO line."""
  strays = [f"{c.describe()}: {c.line[:300]}" for c in census if (c.kind, c.axes) not in allowed]
  assert not strays, "\n".join(strays)
  assert {(c.kind, c.axes) for c in census} == allowed


def test_data_parallel_step_all_reduces_the_gradients_once_and_nothing_else():
  census, params = step_census((8, 1, 1))
  assert_only(census, {("all-reduce", ("data",))})
  # Every gradient once, plus the float32 loss; the norms' gradients are derived after the reduction from the
  # reduced gradients of the kernels they are folded into, so they never travel.
  assert hlo_census.summary(census)[("all-reduce", ("data",))][1] == nbytes(params) - norms(params) + 4


def test_unfolded_norms_reduce_their_own_gradients():
  census, params = step_census((8, 1, 1), fold_norms=False)
  assert_only(census, {("all-reduce", ("data",))})
  assert hlo_census.summary(census)[("all-reduce", ("data",))][1] == nbytes(params) + 4


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_moves_no_batch_rows_on_a_data_mesh(accum):
  census, params = step_census((8, 1, 1), accum)
  assert_only(census, {("all-reduce", ("data",))})
  # Each micro-batch's gradients are reduced inside the accumulation loop (the partitioner cannot carry
  # unreduced sums through it): accum times the gradients of one step.
  assert hlo_census.summary(census)[("all-reduce", ("data",))][1] == accum * (nbytes(params) - norms(params) + 4)


def test_accumulation_moves_no_more_batch_on_an_fsdp_mesh():
  one, _ = step_census((1, 8, 1))
  two, _ = step_census((1, 8, 1), 2)
  assert not [c.line for c in two if c.kind == "collective-permute"]
  # The embedding lookup's all-to-alls scale with the rows each micro-batch holds, so a step moves what it moved
  # without accumulation; reshuffling the batch into micro-batches would add its whole size.
  a2a = lambda census: hlo_census.summary(census)[("all-to-all", ("fsdp",))][1]
  assert a2a(two) == a2a(one)


def test_fsdp_step_gathers_each_layer_forward_and_backward_and_reduces_its_gradient_once():
  census, params = step_census((1, 8, 1))
  assert_only(census, {("all-gather", ("fsdp",)), ("all-reduce", ("fsdp",)), ("all-to-all", ("fsdp",))})
  assert in_loop_bytes(census, "all-gather", ("fsdp",)) == 2 * layer_matrices(params)
  assert in_loop_bytes(census, "all-reduce", ("fsdp",)) == layer_matrices(params)
  assert_outside_loops_small(census, params, (1, 8, 1))


def test_data_by_fsdp_step_reduces_the_shards_over_data():
  census, params = step_census((2, 4, 1))
  assert_only(census, {("all-gather", ("fsdp",)), ("all-reduce", ("fsdp",)), ("all-reduce", ("data",)),
                       ("all-reduce", ("data", "fsdp")), ("all-to-all", ("fsdp",))})
  assert in_loop_bytes(census, "all-gather", ("fsdp",)) == 2 * layer_matrices(params)
  assert in_loop_bytes(census, "all-reduce", ("fsdp",)) == layer_matrices(params)
  # After the FSDP reduction each device holds a quarter of each gradient, summed over the replicas.
  assert in_loop_bytes(census, "all-reduce", ("data",)) == layer_matrices(params) // 4
  assert_outside_loops_small(census, params, (2, 4, 1))


def test_fsdp_by_tensor_step_runs_the_mlp_tensor_parallel_and_gathers_wqkv_whole():
  census, params = step_census((1, 4, 2))
  assert_only(census, {("all-gather", ("fsdp",)), ("all-gather", ("tensor",)), ("all-gather", None),
                       ("all-reduce", ("fsdp",)), ("all-reduce", ("tensor",)), ("all-to-all", ("fsdp",)),
                       ("collective-permute", ("fsdp", "tensor"))})
  config, layers = tiny_config(), params["layers"]
  n_layer, dim = config.model.n_layer, config.model.dim
  rows, seq = config.train.global_batch_size // 4, (gpt.grid_side(config.model) // 2) ** 2
  residual = rows * seq * dim * 4  # one device's rows of the residual stream
  # The MLP matrices and wo arrive split over tensor; wqkv (heads inside the fused q, k, v axis) is gathered
  # whole, over tensor as well, and attention runs on every head on both tensor devices: its activations'
  # gradient (3 * dim wide) is gathered over tensor in the backward pass. A cost this census makes visible.
  split = nbytes([layers[k] for k in ("w1", "w2", "w3", "wo")]) // 2
  assert in_loop_bytes(census, "all-gather", ("fsdp",)) == 2 * (split + nbytes(layers["wqkv"]))
  assert in_loop_bytes(census, "all-reduce", ("fsdp",)) == split + nbytes(layers["wqkv"])
  assert in_loop_bytes(census, "all-gather", ("tensor",)) == nbytes(layers["wqkv"]) // 4 + n_layer * 3 * residual
  # Megatron's pattern for the row-parallel products (wo, w2): each layer all-reduces the residual stream once
  # forward and once backward for each; plus three norm-sized vectors per layer.
  assert in_loop_bytes(census, "all-reduce", ("tensor",)) == n_layer * (4 * residual + 3 * dim // 4 * 4)
  assert_outside_loops_small(census, params, (1, 4, 2))


def assert_outside_loops_small(census, params, mesh_shape) -> None:
  """Outside the layer loop only the embeddings, the head, the labels and the embedded batch travel, each once:
  nothing larger than the largest of those tables or than the patch embeddings of one replica's rows (which the
  partitioner computes on the table's fsdp shards and then redistributes over the batch)."""
  config = tiny_config()
  rows, patches = config.train.global_batch_size // mesh_shape[0], (gpt.grid_side(config.model) // 2) ** 2
  largest = max([nbytes(params[k]) for k in ("tok_embeddings", "cls_embedding", "output")]
                + [rows * patches * config.model.dim * 4])
  outside = [c for c in census if not c.in_loop]
  assert all(c.bytes <= largest + 4 and c.calls == 1 for c in outside), [c.describe() for c in outside]


# -- the sampler ------------------------------------------------------------------------------------------------


def test_sampler_decode_loop_holds_no_collective():
  config = tiny_config()
  config.model.update(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
  model = gpt.GPT(config.model, rngs=nnx.Rngs(0))
  sampler = decoding.Sampler(model, dtype="float32", devices=jax.devices())
  labels = jax.device_put(np.arange(8, dtype=np.int32) % 10, NamedSharding(sampler.mesh, P(sharding.ONE_AXIS)))
  static = decoding._Static(cfg=sampler.cfg, guided=True, top_k=0, use_top_p=False, greedy=False,
                            mesh=sampler.mesh)
  hlo = decoding._generate.lower(sampler._params, labels, labels.astype(jnp.uint32), jax.random.key(0),
                                 jnp.float32(2.0), jnp.int32(-1), jnp.float32(1.0), jnp.float32(1.0),
                                 static=static).compile(compiler_options=FAST_COMPILE).as_text()
  assert "while(" in hlo  # the decode loop is there
  in_loop = [f"{c.describe()}: {c.line[:300]}" for c in hlo_census.census(hlo, sampler.mesh) if c.in_loop]
  assert not in_loop, "\n".join(in_loop)
