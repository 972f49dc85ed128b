"""The collective census of a compiled program: every collective in its optimised HLO, the mesh axes it runs over,
and the bytes it moves per call of the program.

What the partitioner inserted is what a pod pays for: a layout that moves the batch, or gathers a parameter it
should have kept sharded, shows up here before anyone rents a slice. The census reads the text XLA prints
(`compiled.as_text()`), which is the same on every backend up to how collectives are lowered (XLA:CPU reduces
FSDP gradients with all-reduces where a TPU reduce-scatters; TPU and GPU run collectives asynchronously, as
`*-start`/`*-done` pairs or `async-start` wrappers, which are counted once).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re
from typing import Iterable

import jax
import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|true_computation|false_computation)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the compiled program."""

  kind: str  # one of KINDS
  axes: tuple[str, ...] | None  # the mesh axes it runs over; None when its device groups match no set of axes
  group_size: int  # devices in each group (for a permute: the devices that send)
  bytes: int  # bytes of its result per device, per call
  calls: int | None  # times it runs per call of the program (loop trip counts); None if a loop count is unknown
  in_loop: bool  # inside a while loop (a scan over layers or micro-batches, a decode loop)
  line: str  # the HLO instruction, for messages

  @property
  def bytes_per_step(self) -> int | None:
    return None if self.calls is None else self.bytes * self.calls

  @property
  def wire_bytes_per_step(self) -> float | None:
    """Bytes each device sends per call of the program with the usual ring/bidirectional algorithms: an all-reduce
    sends its array twice less a share, an all-gather or all-to-all (n-1)/n of its result, a reduce-scatter n-1
    times its (scattered) result, a permute its array once."""
    if self.calls is None:
      return None
    n = self.group_size
    share = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
             "reduce-scatter": n - 1, "collective-permute": 1.0}[self.kind]
    return share * self.bytes * self.calls

  def describe(self) -> str:
    axes = ",".join(self.axes) if self.axes is not None else "devices outside the mesh's axes"
    count = "?" if self.calls is None else self.calls
    return f"{self.kind} over {axes}: {count} x {self.bytes:,} bytes" + (" (in a loop)" if self.in_loop else "")


def census(hlo_text: str, mesh: jax.sharding.Mesh) -> list[Collective]:
  """Every collective of an optimised HLO module compiled for `mesh` (partition i = mesh.devices.flat[i])."""
  computations, entry = _parse(hlo_text)
  found: list[Collective] = []

  def visit(name: str, calls: int | None, in_loop: bool) -> None:
    for instruction in computations[name].values():
      name_, shape, opcode, rest = instruction
      kind = opcode.removesuffix("-start")
      if kind in KINDS and not opcode.endswith("-done"):
        line = f"%{name_} = {shape} {opcode}({rest.split(', metadata=')[0]}"
        collective = _collective(kind, opcode != kind, shape, rest, mesh, calls, in_loop, line)
        if collective is not None:
          found.append(collective)
      for role, callee in _callees(rest):
        if role == "body":
          trip = _trip_count(rest, computations[name], computations)
          visit(callee, None if calls is None or trip is None else calls * trip, True)
        elif role != "to_apply":  # reductions' combiners hold no collectives
          visit(callee, calls, in_loop)

  visit(entry, 1, False)
  return found


def summary(collectives: Iterable[Collective]) -> dict[tuple[str, tuple[str, ...] | None], tuple[int, int]]:
  """(kind, axes) -> (calls per step, bytes per step), for pinning a layout's traffic in a test."""
  totals: dict = collections.defaultdict(lambda: [0, 0])
  for c in collectives:
    entry = totals[(c.kind, c.axes)]
    entry[0] += c.calls or 0
    entry[1] += c.bytes_per_step or 0
  return {k: tuple(v) for k, v in sorted(totals.items(), key=str)}


def format_census(collectives: list[Collective]) -> list[str]:
  """One line per (kind, axes): calls and MiB per step, the wire bytes a device sends, and whether in a loop."""
  groups: dict = collections.defaultdict(list)
  for c in collectives:
    groups[(c.kind, c.axes)].append(c)
  lines = []
  for (kind, axes), members in sorted(groups.items(), key=str):
    unknown = any(c.calls is None for c in members)
    calls = sum(c.calls or 0 for c in members)
    mib = sum(c.bytes_per_step or 0 for c in members) / 2**20
    wire = sum(c.wire_bytes_per_step or 0 for c in members) / 2**20
    where = ",".join(axes) if axes is not None else "devices outside the mesh's axes"
    lines.append(f"{kind} over {where}: {calls}{'+?' if unknown else ''} calls, {mib:.2f} MiB per step per device, "
                 f"{wire:.2f} MiB sent per device" + (" (some in loops)" if any(c.in_loop for c in members) else ""))
  return lines


# -- parsing ---------------------------------------------------------------------------------------------------


def _parse(hlo_text: str) -> tuple[dict[str, dict[str, tuple[str, str, str, str]]], str]:
  """Computation name -> {instruction name: (name, shape, opcode, text after the opening parenthesis)}, in order,
  and the entry computation's name. The last instruction of a computation is its ROOT."""
  computations: dict[str, dict] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = computations.setdefault(match.group(1), {})
        entry = match.group(1) if line.startswith("ENTRY") else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      current[match.group(1)] = match.groups()
  if entry is None:
    raise ValueError("the HLO text has no ENTRY computation")
  return computations, entry


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction, from the text after its opening parenthesis."""
  depth, end = 0, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    if ch == ")":
      if depth == 0:
        end = i
        break
      depth -= 1
  return re.findall(r"%([\w.-]+)", re.sub(r"/\*.*?\*/", "", rest[:end]))


def _constant(computation: dict, name: str) -> int | None:
  """The integer a scalar resolves to through copies and bitcasts, or None."""
  while name in computation:
    _, _, opcode, rest = computation[name]
    if opcode == "constant":
      match = re.match(r"(-?\d+)\)", rest)
      return int(match.group(1)) if match else None
    if opcode not in ("copy", "bitcast"):
      return None
    name = _operands(rest)[0]
  return None


def _trip_count(rest: str, caller: dict, computations: dict) -> int | None:
  """A while loop's trip count: XLA's known_trip_count annotation where there is one (CPU, GPU); else the
  counted-loop pattern (TPU prints none): the condition's root is `i < N` with N a constant, the body's root
  tuple holds `i + k` at i's index with k a positive constant (k > 1 where the compiler unrolled the body), and
  the loop starts i at a constant. None when any of that does not hold."""
  known = _TRIP_COUNT.search(rest)
  if known:
    return int(known.group(1))
  cond_name = re.search(r"condition=%([\w.-]+)", rest)
  body_name = re.search(r"body=%([\w.-]+)", rest)
  if not (cond_name and body_name):
    return None
  cond, body = computations.get(cond_name.group(1)), computations.get(body_name.group(1))
  if not (cond and body):
    return None
  _, _, opcode, cond_rest = list(cond.values())[-1]
  if opcode != "compare" or "direction=LT" not in cond_rest:
    return None
  counter, limit = _operands(cond_rest)[:2]
  index = _tuple_index(cond, counter)
  bound = _constant(cond, limit)
  _, _, root_op, root_rest = list(body.values())[-1]
  if index is None or bound is None or root_op != "tuple":
    return None
  step = body.get(_operands(root_rest)[index])
  if step is None or step[2] != "add":
    return None
  step_operands = _operands(step[3])
  stride = _constant(body, step_operands[1])
  if _tuple_index(body, step_operands[0]) != index or not stride or stride < 1:
    return None
  init = caller.get(_operands(rest)[0])
  start = _constant(caller, _operands(init[3])[index]) if init and init[2] == "tuple" else None
  return None if start is None else max(-(-(bound - start) // stride), 0)


def _tuple_index(computation: dict, name: str) -> int | None:
  """k where `name` is get-tuple-element(parameter), index=k (through copies), else None."""
  instruction = computation.get(name)
  while instruction is not None and instruction[2] in ("copy", "bitcast"):
    instruction = computation.get(_operands(instruction[3])[0])
  if instruction is None or instruction[2] != "get-tuple-element":
    return None
  source = computation.get(_operands(instruction[3])[0])
  match = re.search(r"index=(\d+)", instruction[3])
  return int(match.group(1)) if match and source and source[2] == "parameter" else None


def _callees(rest: str) -> list[tuple[str, str]]:
  called = [(m.group(1), m.group(2)) for m in _CALLEE.finditer(rest)]
  for branches in _BRANCHES.findall(rest):
    called += [("branch", b.strip().lstrip("%")) for b in branches.split(",") if b.strip()]
  return called


def _collective(kind: str, is_async: bool, shape: str, rest: str, mesh: jax.sharding.Mesh, calls: int | None,
                in_loop: bool, line: str) -> Collective | None:
  leaves = [_array_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(shape) if dtype in _BYTES]
  if is_async:
    # all-gather-start returns (operands, results); collective-permute-start (operand, result, contexts...).
    leaves = leaves[len(leaves) // 2:] if kind == "all-gather" else leaves[1:2] if kind == "collective-permute" \
        else leaves
  if kind == "collective-permute":
    pairs = [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", _field(rest, "source_target_pairs") or "")]
    moves = [(s, t) for s, t in pairs if s != t]
    if not moves:
      return None  # every device keeps its own data
    axes = _permute_axes(moves, mesh)
    return Collective(kind, axes, len(moves), int(sum(leaves)), calls, in_loop, line)
  groups = _replica_groups(rest, mesh.size)
  if max(len(g) for g in groups) <= 1:
    return None  # groups of one device move nothing
  axes = _group_axes(groups, mesh)
  return Collective(kind, axes, max(len(g) for g in groups), int(sum(leaves)), calls, in_loop, line)


def _array_bytes(dtype: str, dims: str) -> float:
  return _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


def _field(rest: str, name: str) -> str | None:
  """The text of attribute `name=...` up to the next attribute at bracket depth 0, or None. (The mesh spelling of
  replica groups carries a `device_ids=(...)` of its own, which belongs to it.)"""
  start = rest.find(name + "=")
  if start < 0:
    return None
  i, depth = start + len(name) + 1, 0
  for j in range(i, len(rest)):
    if rest[j] in "{[(":
      depth += 1
    elif rest[j] in "}])":
      depth -= 1
    elif depth == 0 and re.match(r", (?!device_ids=)[a-z_]+=", rest[j:]):
      return rest[i:j]
  return rest[i:]


def _iota(reshape: list[int], transpose: list[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  return (ids.transpose(transpose) if transpose else ids).reshape(-1)


def _parse_iota(text: str) -> np.ndarray:
  """`[4,2]T(1,0)` or `[8]`: iota over the dims, transposed."""
  match = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
  if not match:
    raise ValueError(f"unrecognised device list {text!r}")
  reshape = [int(d) for d in match.group(1).split(",")]
  return _iota(reshape, [int(d) for d in match.group(2).split(",")] if match.group(2) else None)


def _replica_groups(rest: str, num_devices: int) -> list[frozenset[int]]:
  """The device groups of a collective, from any of XLA's three spellings."""
  text = (_field(rest, "replica_groups") or "").strip()
  if text in ("", "{}"):
    return [frozenset(range(num_devices))]
  if text.startswith("{"):  # explicit: {{0,1},{2,3}}
    return [frozenset(int(d) for d in g.split(",") if d) for g in re.findall(r"\{([\d,]*)\}", text[1:-1])]
  iota = re.fullmatch(r"\[([\d,]+)\]<=(.+)", text)
  if iota:  # [groups, size]<=[reshape]T(perm)
    shape = [int(d) for d in iota.group(1).split(",")]
    return [frozenset(row.tolist()) for row in _parse_iota(iota.group(2)).reshape(shape[0], -1)]
  mesh_form = re.fullmatch(r"mesh\[([^\]]*)\](?:, device_ids=\((.*?)\))? \{([^}]*)\}", text)
  if mesh_form:  # mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}
    names, sizes = zip(*[(n, int(s)) for n, s in re.findall(r"'([^']+)'=(\d+)", mesh_form.group(1))])
    ids = _parse_iota(mesh_form.group(2)) if mesh_form.group(2) else np.arange(math.prod(sizes))
    over = [item.strip() for item in mesh_form.group(3).split(",") if item.strip()]
    if not all(re.fullmatch(r"'[^']+'", item) and item[1:-1] in names for item in over):
      raise ValueError(f"unrecognised replica groups {text!r}")  # e.g. sub-axes like 'axis_0':(1)2
    over = [item[1:-1] for item in over]
    return _groups_over(ids.reshape(sizes), [names.index(n) for n in over])
  raise ValueError(f"unrecognised replica groups {text!r}")


def _groups_over(devices: np.ndarray, axes: list[int]) -> list[frozenset[int]]:
  """The groups of `devices` (an nd array of ids) that vary along `axes` with the other coordinates fixed."""
  rest = [a for a in range(devices.ndim) if a not in axes]
  moved = np.transpose(devices, rest + axes).reshape(-1, math.prod(devices.shape[a] for a in axes) if axes else 1)
  return [frozenset(row.tolist()) for row in moved]


def _group_axes(groups: list[frozenset[int]], mesh: jax.sharding.Mesh) -> tuple[str, ...] | None:
  """The set of mesh axes whose groups are exactly `groups`, or None."""
  ids = np.arange(mesh.size).reshape(mesh.devices.shape)
  wanted = set(groups)
  real = [i for i, size in enumerate(mesh.devices.shape) if size > 1]
  for r in range(1, len(real) + 1):
    for axes in itertools.combinations(real, r):
      if set(_groups_over(ids, list(axes))) == wanted:
        return tuple(mesh.axis_names[a] for a in axes)
  return None


def _permute_axes(moves: list[tuple[int, int]], mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes along which a permute's sources and targets differ."""
  shape = mesh.devices.shape
  differ = set()
  for s, t in moves:
    differ |= {a for a, (x, y) in enumerate(zip(np.unravel_index(s, shape), np.unravel_index(t, shape))) if x != y}
  return tuple(mesh.axis_names[a] for a in sorted(differ))
