"""The device mesh, the logical-axis rules, and the shardings of parameters and batches.

Parameters carry logical axis names (`embed`, `mlp`, ...; see models/gpt.py). One table maps them to the mesh axes
`data`, `fsdp` and `tensor`. A dimension the mesh axes do not divide stays replicated, so every mesh works for every
model (at some cost in memory), instead of failing deep inside XLA; `unsharded_dimensions` lists those dimensions,
which the trainer and the dry run print, and `mesh.require_sharded` turns into an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npp_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
ONE_AXIS = "batch"  # the one axis of `one_axis_mesh`: a batch split over devices that each hold the whole model
BATCH_AXES = ("data", "fsdp")  # the batch is split over every replica group and every FSDP shard

# Logical axis -> mesh axes. FSDP shards the model dimension of every matrix; tensor parallelism splits heads,
# the FFN width and the vocabulary.
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "classes": None,
    "layers": None,
    "head_dim": None,
    "qkv": None,
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 by the devices left over; checks the product equals the device count."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise errors.InvalidInput(f"mesh.shape needs {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise errors.InvalidInput(f"mesh.shape takes positive sizes and at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise errors.InvalidInput(f"mesh.shape {shape} does not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise errors.InvalidInput(f"mesh.shape {shape} needs {math.prod(shape)} devices, but there are {num_devices}")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (jax >= 0.10 defaults to Explicit, which logical rules reject)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def one_axis_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh (Auto axis ONE_AXIS) over `devices`, default this process's: for replicating a model over them and
  splitting a batch across them (sampling, encoding, feature extraction, restoring a model to sample with)."""
  devices = list(devices if devices is not None else jax.local_devices())
  return Mesh(np.asarray(devices), (ONE_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def pad_shard_unpad(fn: Callable[..., Any], mesh: Mesh | None = None, *, size: int | None = None
                    ) -> Callable[..., Any]:
  """Wraps `fn(*batches, **kwargs)`, whose positional arguments share a leading batch axis of n rows, so that
  they arrive padded with zero rows to `size` (default: the next multiple of the mesh's device count) and, with a
  mesh, split over its ONE_AXIS; every output is cut back to its first n rows.

  The padding gives one compiled shape for batches of any length (and any device count); the zero rows are whole
  examples of their own (class 0, sample 0, a black image), computed and dropped. The result is not waited for.
  """
  def wrapped(*batches: Any, **kwargs: Any) -> Any:
    batches = [np.asarray(b) for b in batches]
    n, divisor = batches[0].shape[0], mesh.size if mesh is not None else 1
    target = size if size is not None else -(-max(n, 1) // divisor) * divisor
    if n > target or target % divisor:
      raise ValueError(f"a batch of {n} rows does not pad to {target} rows over {divisor} devices")
    if target != n:
      batches = [np.concatenate([b, np.zeros((target - n, *b.shape[1:]), b.dtype)]) for b in batches]
    if mesh is not None:
      batches = jax.device_put(batches, NamedSharding(mesh, P(ONE_AXIS)))
    out = fn(*batches, **kwargs)
    return out if target == n else jax.tree.map(lambda x: x[:n], out)

  return wrapped


def _dimension_axes(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh
                    ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
  """Per dimension: (the mesh axes that split it, the mesh axes its rule names that do not divide it)."""
  out, used = [], set()
  for name, size in zip(axes, shape):
    mesh_axes = LOGICAL_RULES.get(name) if name else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    wanted = tuple(a for a in (mesh_axes or ()) if a not in used and mesh.shape[a] > 1)
    kept = wanted if wanted and size % math.prod(mesh.shape[a] for a in wanted) == 0 else ()
    used.update(kept)
    out.append((kept, () if kept else wanted))
  return out


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec of an array with logical `axes`; mesh axes that do not divide a dimension are dropped
  (`unsharded_dimensions` lists where)."""
  return P(*[kept[0] if len(kept) == 1 else (kept or None) for kept, _ in _dimension_axes(axes, shape, mesh)])


@dataclasses.dataclass(frozen=True)
class Unsharded:
  """A parameter dimension its rule assigns to mesh axes that do not divide it, so it is kept whole on each device."""

  path: str
  dim: int
  logical: str
  size: int
  mesh_axes: tuple[str, ...]
  mesh_size: int  # the devices along mesh_axes

  def sentence(self) -> str:
    return (f"parameter {self.path} dimension {self.dim} ({self.logical}, size {self.size}) is not split over mesh "
            f"axis {'x'.join(self.mesh_axes)} ({self.mesh_size} devices, which do not divide it)")


def unsharded_dimensions(axes: dict, params: dict, mesh: Mesh) -> list[Unsharded]:
  """Every parameter dimension that `spec_for` leaves whole although its rule names a mesh axis of size > 1.

  axes: `logical_axes(model)`; params: the matching tree of arrays or ShapeDtypeStructs.
  """
  found = []
  flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
  for path, param in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = flat_axes[path]
    for dim, (_, dropped) in enumerate(_dimension_axes(names, param.shape, mesh)):
      if dropped:
        found.append(Unsharded(jax.tree_util.keystr(path, simple=True, separator="/"), dim, names[dim],
                               param.shape[dim], dropped, math.prod(mesh.shape[a] for a in dropped)))
  return found


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
  """While tracing a step under this, `constrain` pins activations to their logical axes on `mesh`."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding of its logical `axes` inside `activation_sharding`, else `x` itself.

  Without the pin the partitioner is free to keep an FSDP-sharded weight in place and all-reduce the activations
  instead (what XLA picks for narrow layers); with it every layer's input stays split over the batch, so FSDP
  gathers weights, as its cost model assumes. Outside a training step (sampling, one device) nothing is pinned.
  """
  mesh = _ACTIVATION_MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh)))


def logical_axes(model: nnx.Module) -> dict:
  """Nested dict (the shape of `nnx.to_pure_dict(nnx.state(model))`) of each parameter's logical axis names."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  axes = {}
  for path, variable in flat:
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(variable.get_metadata().get("logical_axes") or (None,) * variable.get_value().ndim)
  return axes


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict:
  """NamedShardings for the parameters of a (possibly abstract) model, as a pure nested dict."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.tree.map(lambda axes, p: NamedSharding(mesh, spec_for(axes, p.shape, mesh)),
                      logical_axes(model), params, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (the devices the batch is split over)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's rows (each process holds its own contiguous slice)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
