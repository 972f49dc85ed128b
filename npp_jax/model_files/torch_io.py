"""PyTorch checkpoint files without torch: read and write `torch.save` zip files, read legacy ones, and safetensors.

A `torch.save` file is a zip archive holding `<prefix>/data.pkl` (a protocol-2 pickle of the object, in which every
tensor is a call to `torch._utils._rebuild_tensor_v2` over a storage named by a persistent id) and one record
`<prefix>/data/<key>` of raw bytes per storage. `load` reads it with an unpickler that knows only tensors, storages
and plain containers and refuses every other global, so a checkpoint cannot run code. `save` writes the same layout,
which `torch.load(path, weights_only=True)` accepts. The legacy (pre-1.6) format, a sequence of pickles followed by the
storages' bytes, is read with the same unpickler. Both refuse tensors that read outside their storage or expand it
(stride 0 over a dimension of several elements) and containers nested more than MAX_NESTING deep.

`load_state_dict` / `save_state_dict` deal in flat `{name: np.ndarray}` state dicts and know the containers the
reference training scripts write (`{"model": sd}`, `{"ema": sd}`, ...).
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from npp_jax import errors
from npp_jax import fileio

PathLike = str | os.PathLike

# torch storage class name <-> numpy dtype (little-endian).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

# The magic number that starts a legacy (pre-1.6, non-zip) torch.save file, pickled as a protocol-2 long.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ALIGNMENT = 64  # torch aligns storage records so that they can be memory-mapped.

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_CONTAINER_PREFERENCE = ("model", "module", "state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------------------------------
# Reading.


class _StorageType:
  """Stands for a `torch.<Name>Storage` class inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _NamespaceDict(dict):
  """An `argparse.Namespace` read back as a dict (pickle sets its attributes through `__setstate__`)."""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError("argparse.Namespace state is not a dict")
    self.update(state)


MAX_NESTING = 100  # containers inside containers; real checkpoints nest a handful deep


class _LazyStorage:
  """A legacy-format storage, whose bytes follow the pickle that names it; `array` is set once they are read."""

  def __init__(self, storage_type: _StorageType, numel: int, root: "_LazyStorage | None" = None, offset: int = 0):
    self.storage_type, self.numel, self.root, self.offset = storage_type, numel, root, offset
    self.array: np.ndarray | None = None

  def resolve(self) -> np.ndarray:
    if self.root is not None:
      return self.root.resolve()[self.offset:self.offset + self.numel]
    if self.array is None:
      raise pickle.UnpicklingError("a tensor refers to a storage whose data is not in the file")
    return self.array


class _PendingTensor:
  """A tensor over a `_LazyStorage`: built by `_plain` once the storages are read."""

  def __init__(self, storage: _LazyStorage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def resolve(self) -> np.ndarray:
    return _strided(self.storage.resolve(), self.offset, self.size, self.stride)


def _rebuild_tensor(storage, offset: int, size, stride, *unused):
  """`torch._utils._rebuild_tensor_v2`: a strided view of a flat storage, copied out."""
  del unused  # requires_grad, backward hooks, metadata.
  if not isinstance(storage, (np.ndarray, _LazyStorage)) or not isinstance(offset, int):
    raise pickle.UnpicklingError("a tensor is not built over a storage")
  size, stride = _layout(size), _layout(stride)
  if isinstance(storage, _LazyStorage):
    _check_layout(storage.numel, offset, size, stride)  # refused now, before any data is read
    return _PendingTensor(storage, offset, size, stride)
  return _strided(storage, offset, size, stride)


def _layout(values) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) for v in values):
    raise pickle.UnpicklingError(f"a tensor's size or stride is not a tuple of integers: {values!r}")
  return tuple(values)


def _check_layout(storage_size: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
  """Refuses layouts that read outside the storage or that expand it (a crafted file could ask for terabytes)."""
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"invalid tensor layout: offset {offset}, size {size}, stride {stride}")
  if 0 in size:
    return
  if any(n > 1 and s == 0 for n, s in zip(size, stride)):
    raise pickle.UnpicklingError(f"a tensor of size {size} repeats its storage along a dimension (stride "
                                 f"{stride}); torch.save never writes such a broadcast tensor")
  numel = int(np.prod(size, dtype=object))
  if numel > storage_size:
    raise pickle.UnpicklingError(f"a tensor of size {size} has {numel} elements, more than its storage of "
                                 f"{storage_size}")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage_size:
    raise pickle.UnpicklingError(
        f"tensor of size {size}, stride {stride}, offset {offset} overruns its storage of {storage_size} elements")


def _strided(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
  _check_layout(storage.size, offset, size, stride)
  numel = int(np.prod(size))
  if offset == 0 and numel == storage.size and stride == _contiguous_strides(size):
    return storage.reshape(size)  # The usual case: the tensor is its whole storage; no copy.
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False)
  return np.array(view, copy=True, order="C")


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
  strides, step = [], 1
  for n in reversed(size):
    strides.append(step)
    step *= max(n, 1)
  return tuple(reversed(strides))


def _rebuild_parameter(data, *unused):
  """`torch._utils._rebuild_parameter`: a Parameter is just its data here."""
  del unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles tensors, storages and plain containers; refuses every other global by name.

  `load_storage(storage_type, key, numel, view)` gives the storage a persistent id names.
  """

  _GLOBALS = {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      # Released LlamaGen checkpoints pickle their training arguments.
      ("argparse", "Namespace"): _NamespaceDict,
  }

  def __init__(self, file, load_storage=None):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not a tensor or a plain container")

  def persistent_load(self, pid):
    # Zip files: ("storage", type, key, location, numel); legacy files add a view: None or (key, offset, numel).
    if not (self._load_storage and isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    return self._load_storage(pid[1], str(pid[2]), pid[4], pid[5] if len(pid) == 6 else None)


def _check_nesting(obj: Any) -> None:
  """Refuses containers nested deeper than MAX_NESTING or holding themselves, without recursing."""
  heights: dict[int, int] = {}
  on_path: set[int] = set()
  stack = [(obj, False)]
  containers = (dict, list, tuple, set, frozenset)
  children = lambda node: [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
  while stack:
    node, leaving = stack.pop()
    key = id(node)
    if leaving:
      on_path.discard(key)
      heights[key] = 1 + max((heights.get(id(c), 0) for c in children(node)), default=0)
      if heights[key] > MAX_NESTING:
        raise pickle.UnpicklingError(f"the pickle nests containers more than {MAX_NESTING} deep")
      continue
    if key in heights or not isinstance(node, containers):
      continue
    if key in on_path:
      raise pickle.UnpicklingError("the pickle holds a container that contains itself")
    if len(on_path) >= MAX_NESTING:
      raise pickle.UnpicklingError(f"the pickle nests containers more than {MAX_NESTING} deep")
    on_path.add(key)
    stack.append((node, True))
    stack.extend((c, False) for c in children(node) if isinstance(c, containers))


def _plain(obj: Any) -> Any:
  """Turns the `_NamespaceDict`s the unpickler made into plain dicts and builds pending tensors, recursively."""
  if isinstance(obj, _PendingTensor):
    return obj.resolve()
  if isinstance(obj, _NamespaceDict):
    return {k: _plain(v) for k, v in obj.items()}
  if isinstance(obj, dict):
    for k, v in obj.items():
      obj[k] = _plain(v)
  elif isinstance(obj, list):
    obj[:] = [_plain(v) for v in obj]
  elif isinstance(obj, tuple):
    return tuple(_plain(v) for v in obj)
  return obj


def _unpickle(unpickler: _RestrictedUnpickler) -> Any:
  obj = unpickler.load()
  _check_nesting(obj)
  return obj


def load(path: PathLike) -> Any:
  """Reads a `torch.save` file (zip, or the legacy pre-1.6 format): tensors become numpy arrays, containers stay
  containers.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a torch file, is corrupt, references a global other than tensors, storages,
      `collections.OrderedDict` and `argparse.Namespace` (read as a dict), nests containers too deep, or holds a
      tensor whose layout reads outside its storage or expands it.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, "rb") as f:
      head = f.read(16)
    if head.startswith(b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC):
      return _load_legacy(path)
    raise errors.InvalidInput(f"{path} is not a PyTorch checkpoint (neither a torch.save zip file nor the legacy "
                              "format)")
  except pickle.UnpicklingError as e:
    raise errors.InvalidInput(f"cannot read {path}: {e}") from None
  except RecursionError:
    raise errors.InvalidInput(f"cannot read {path}: the pickle nests too deep") from None
  except (zipfile.BadZipFile, EOFError, struct.error, OSError) as e:
    raise errors.InvalidInput(f"{path} is corrupt: {e}") from None


def _load_zip(path: pathlib.Path) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise errors.InvalidInput(f"{path} is a zip file but not a torch.save checkpoint (no single <prefix>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
      if byteorder not in ("little", "big"):
        raise errors.InvalidInput(f"{path} has an unknown byteorder record {byteorder!r}")
    storages: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _StorageType, key: str, numel: int, view) -> np.ndarray:
      del numel, view  # the record's length is the storage's size
      if key not in storages:
        if prefix + f"data/{key}" not in names:
          raise errors.InvalidInput(f"{path} is missing the record {prefix}data/{key}")
        # A bytearray makes the arrays writable, like the tensors they stand for.
        raw = bytearray(archive.read(prefix + f"data/{key}"))
        storages[key] = _storage_array(raw, storage_type, byteorder, path)
      return storages[key]

    return _plain(_unpickle(_RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage)))


def _storage_array(raw: bytearray, storage_type: _StorageType, byteorder: str, path) -> np.ndarray:
  dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
  if len(raw) % dtype.itemsize:
    raise errors.InvalidInput(f"{path} has a {storage_type.name} of {len(raw)} bytes, not a whole number of elements")
  return np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype, copy=False)


def _load_legacy(path: pathlib.Path) -> Any:
  """The pre-1.6 format: pickles of the magic number, the protocol version (1001), the system info, the object and
  the list of storage keys; then each storage's data as an 8-byte element count and the elements."""
  f = io.BytesIO(path.read_bytes())
  header = lambda: _unpickle(_RestrictedUnpickler(f))  # plain values only: no global, no storage
  header()  # the magic number, already matched
  protocol = header()
  if protocol != 1001:
    raise errors.InvalidInput(f"{path} is a legacy torch file of protocol {protocol!r}; only 1001 is known")
  sys_info = header()
  if not isinstance(sys_info, dict):
    raise errors.InvalidInput(f"{path} has no system info after its protocol version")
  byteorder = "little" if sys_info.get("little_endian", True) else "big"
  roots: dict[str, _LazyStorage] = {}
  views: dict[str, _LazyStorage] = {}

  def load_storage(storage_type: _StorageType, key: str, numel: int, view) -> _LazyStorage:
    if key not in roots:
      roots[key] = _LazyStorage(storage_type, numel)
    root = roots[key]
    if root.storage_type.name != storage_type.name or root.numel != numel:
      raise pickle.UnpicklingError(f"storage {key} is named with two types or sizes")
    if view is None:
      return root
    if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
      raise pickle.UnpicklingError(f"invalid storage view {view!r}")
    view_key, offset, view_numel = str(view[0]), view[1], view[2]
    if offset < 0 or view_numel < 0 or offset + view_numel > numel:
      raise pickle.UnpicklingError(f"storage view {view!r} overruns its storage of {numel} elements")
    views.setdefault(view_key, _LazyStorage(storage_type, view_numel, root, offset))
    return views[view_key]

  obj = _unpickle(_RestrictedUnpickler(f, load_storage))
  keys = header()
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
    raise errors.InvalidInput(f"{path} has no list of storage keys after its object")
  for key in keys:
    if key not in roots:
      raise errors.InvalidInput(f"{path} holds data for storage {key}, which no tensor names")
    storage = roots[key]
    count = int.from_bytes(f.read(8), byteorder)
    if count != storage.numel:
      raise errors.InvalidInput(f"{path}: storage {key} holds {count} elements, its pickle says {storage.numel}")
    nbytes = count * storage.storage_type.dtype.itemsize
    raw = bytearray(f.read(nbytes))
    if len(raw) != nbytes:
      raise errors.InvalidInput(f"{path} is truncated: storage {key} has {len(raw)} of its {nbytes} bytes")
    storage.array = _storage_array(raw, storage.storage_type, byteorder, path)
  return _plain(obj)


# ----------------------------------------------------------------------------------------------------------------------
# Writing.


class _TorchGlobal:
  """A torch global (function or class) that the writer names in the pickle without importing torch."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # The pickler requires a reduce function to be callable.
    raise TypeError(f"{self.module}.{self.name} exists only inside torch")


class _Storage:
  """One array to be written as one storage record."""

  def __init__(self, array: np.ndarray):
    self.array = array


_REBUILD_TENSOR = _TorchGlobal("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {name: _TorchGlobal("torch", name) for name in _STORAGE_DTYPES}


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Protocol-2 pickler that writes arrays as torch tensors over persistent-id storages.

  The pure-Python pickler is used because it lets `_TorchGlobal` be written as a GLOBAL opcode
  without the named module being importable.
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: list[np.ndarray] = []

  def _save_torch_global(self, obj: _TorchGlobal):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    self.memoize(obj)

  dispatch[_TorchGlobal] = _save_torch_global

  def reducer_override(self, obj):
    if isinstance(obj, np.generic) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")
                                       and not isinstance(obj, np.ndarray)):
      obj = np.asarray(obj)  # numpy scalars and jax arrays are written as tensors too.
    if not isinstance(obj, np.ndarray):
      return NotImplemented
    array = _torch_layout(obj)
    args = (_Storage(array), 0, array.shape, _contiguous_strides(array.shape), False, collections.OrderedDict())
    return _REBUILD_TENSOR, args

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    key = str(len(self.storages))
    self.storages.append(obj.array)
    storage_type = _STORAGE_GLOBALS[_DTYPE_STORAGES[obj.array.dtype]]
    return ("storage", storage_type, key, "cpu", obj.array.size)


def _torch_layout(array: np.ndarray) -> np.ndarray:
  """The array as a native little-endian, C-contiguous array of a dtype torch has."""
  dtype = array.dtype.newbyteorder("=")
  if dtype not in _DTYPE_STORAGES:
    raise TypeError(f"cannot save an array of dtype {array.dtype} as a torch tensor")
  # Not np.ascontiguousarray, which turns a 0-d array into a 1-d one.
  return np.asarray(array, dtype=dtype.newbyteorder("<"), order="C")


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes):
  """Writes an uncompressed record whose data starts on a 64-byte boundary, as torch does."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header_end = archive.fp.tell() + 30 + len(name.encode("utf-8")) + 4
  padding = -header_end % _ALIGNMENT
  # A private extra field ("FB" id, as torch's writer uses) made of padding bytes.
  info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding
  archive.writestr(info, data)


def save(obj: Any, path: PathLike) -> None:
  """Writes nested dicts/lists/tuples of numpy arrays and Python scalars/strings as a `torch.save` zip file.

  `torch.load(path, weights_only=True)` reads the result (arrays become tensors); `load(path)` gives back `obj`.
  """
  path = pathlib.Path(path)
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer)
  pickler.dump(obj)
  prefix = "archive/"  # torch uses the file stem; any single directory name is accepted.

  def write(tmp):
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
      _write_aligned(archive, prefix + "data.pkl", buffer.getvalue())
      _write_aligned(archive, prefix + "byteorder", b"little")
      for key, array in enumerate(pickler.storages):
        _write_aligned(archive, f"{prefix}data/{key}", array.tobytes())
      _write_aligned(archive, prefix + "version", b"3\n")

  fileio.write_atomically(path, write)


# ----------------------------------------------------------------------------------------------------------------------
# State dicts.


def _is_safetensors(path: pathlib.Path) -> bool:
  return path.suffix == ".safetensors"


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  try:
    return dict(safetensors.numpy.load_file(path))
  except Exception as e:  # safetensors raises its own SafetensorError on a bad file.
    raise errors.InvalidInput(f"{path} is not a valid safetensors file: {e}") from None


def _describe_keys(keys) -> str:
  keys = [repr(k) for k in keys]
  return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "") if keys else "none"


def _is_flat_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def _strip_wrapper_prefixes(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes `module.` (DDP) / `_orig_mod.` (torch.compile) when every key carries it."""
  changed = True
  while changed and sd:
    changed = False
    for prefix in _WRAPPER_PREFIXES:
      if all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        changed = True
  return sd


def load_state_dict(path: PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a flat `{name: array}` state dict from a .pt/.pth/.bin/.ckpt (torch zip) or .safetensors file.

  Args:
    path: the file.
    key: the container entry to use (e.g. "ema"). None picks "model", then "module", then "state_dict", then the
      file itself when it is a raw (e.g. FSDP-consolidated) state dict. "ema" is used only when asked for.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable file, absent `key`, or no state dict in the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  obj = _load_safetensors(path) if _is_safetensors(path) else load(path)
  if not isinstance(obj, Mapping):
    raise errors.InvalidInput(f"{path} holds a {type(obj).__name__}, not a state dict")
  if key is not None:
    if key not in obj or not isinstance(obj[key], Mapping):
      raise errors.InvalidInput(f"{path} has no state dict under {key!r}; its entries are {_describe_keys(obj.keys())}")
    sd = obj[key]
  else:
    found = [k for k in _CONTAINER_PREFERENCE if isinstance(obj.get(k), Mapping)]
    if found:
      sd = obj[found[0]]
    elif _is_flat_state_dict(obj):
      sd = obj
    else:
      raise errors.InvalidInput(f"{path} holds no state dict under 'model', 'module' or 'state_dict' and is not one "
                                f"itself; its entries are {_describe_keys(obj.keys())} (choose one with key=...)")
  bad = [k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
  if bad:
    raise errors.InvalidInput(f"{path}: the state dict has entries that are not named tensors: {_describe_keys(bad)}")
  return _strip_wrapper_prefixes(dict(sd))


def save_state_dict(sd: Mapping[str, np.ndarray], path: PathLike, *, container: str | None = "model") -> None:
  """Writes a state dict: `{container: sd}` as a torch file, or a .safetensors file (by suffix; no container).

  container=None writes the raw state dict to a torch file.
  """
  path = pathlib.Path(path)
  sd = {k: np.asarray(v) for k, v in sd.items()}
  if _is_safetensors(path):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    fileio.write_atomically(path, lambda tmp: safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp))
  else:
    save(sd if container is None else {container: sd}, path)
