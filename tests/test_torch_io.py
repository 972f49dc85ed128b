"""torch_io: torch.save files without torch (round trips, strided storages, refusal of globals, containers)."""

import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from npp_jax.model_files import torch_io


def _assert_same(a, b):
  """Equal structure, types, dtypes, shapes and bytes."""
  assert type(a) is type(b), (type(a), type(b))
  if isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      _assert_same(x, y)
  elif isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()
  else:
    assert a == b


# ----------------------------------------------------------------------------------------------------------------------
# A hand-written protocol-2 pickle in torch's layout, independent of torch_io.save.


def _str(s: str) -> bytes:
  data = s.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(n: int) -> bytes:
  return pickle.BININT + struct.pack("<i", n)


def _tuple(items) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tensor(key: str, storage: str, numel: int, offset: int, size, stride) -> bytes:
  """`_rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())`."""
  pid = _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel)])
  args = _tuple([pid + pickle.BINPERSID, _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)),
                 pickle.NEWFALSE, _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE])
  return _global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def _dict(entries: dict[str, bytes]) -> bytes:
  body = b"".join(_str(k) + v for k, v in entries.items())
  return pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS


def _write_torch_zip(path, pickled: bytes, records: dict[str, bytes]):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("ckpt/data.pkl", pickle.PROTO + b"\x02" + pickled + pickle.STOP)
    archive.writestr("ckpt/byteorder", b"little")
    for key, data in records.items():
      archive.writestr(f"ckpt/data/{key}", data)
    archive.writestr("ckpt/version", b"3\n")


# ----------------------------------------------------------------------------------------------------------------------


def test_round_trip_every_dtype_and_container(tmp_path):
  rng = np.random.default_rng(0)
  obj = {
      "f32": rng.normal(size=(3, 4)).astype(np.float32),
      "f16": rng.normal(size=(5,)).astype(np.float16),
      "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
      "i64": np.array([-(2 ** 40), 0, 7], np.int64),
      "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
      "bool": np.array([True, False, True]),
      "scalar": np.array(2.5, np.float32),
      "empty": np.zeros((0, 3), np.float32),
      "nested": {"list": [np.ones(2, np.float64), 3, 2.5, "text", None, True], "tuple": (1, "a")},
      "step": 7,
  }
  path = tmp_path / "x.pt"
  torch_io.save(obj, path)
  _assert_same(torch_io.load(path), obj)


def test_saved_records_are_64_byte_aligned(tmp_path):
  # torch.load(mmap=True) needs the storages aligned, as torch's own writer does.
  path = tmp_path / "x.pt"
  torch_io.save({"a": np.ones(3, np.float32), "b": np.ones(5, np.int64)}, path)
  with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
    for info in archive.infolist():
      f.seek(info.header_offset + 26)
      name_len, extra_len = struct.unpack("<HH", f.read(4))
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_reads_torch_written_fixture(fixtures_dir):
  obj = torch_io.load(fixtures_dir / "llamagen_tiny" / "vq.pt")
  assert list(obj) == ["model"]
  sd = obj["model"]
  assert len(sd) == 208
  assert sd["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
  assert sd["encoder.conv_in.weight"].dtype == np.float32
  np.testing.assert_array_equal(sd["quantize.codebook_used"], np.zeros(65536, np.float32))


def test_strided_and_offset_tensors(tmp_path):
  base = np.arange(30, dtype=np.float32)  # one storage shared by three tensors
  pickled = _dict({
      "transposed": _tensor("0", "FloatStorage", 30, 0, (6, 5), (1, 6)),  # a (5, 6) tensor's .t()
      "slice": _tensor("0", "FloatStorage", 30, 7, (2, 3), (5, 2)),
      "whole": _tensor("0", "FloatStorage", 30, 0, (5, 6), (6, 1)),
      "half": _tensor("1", "HalfStorage", 4, 1, (3,), (1,)),
  })
  path = tmp_path / "strided.pt"
  _write_torch_zip(path, pickled, {"0": base.tobytes(), "1": np.arange(4, dtype=np.float16).tobytes()})
  out = torch_io.load(path)
  grid = base.reshape(5, 6)
  np.testing.assert_array_equal(out["transposed"], grid.T)
  np.testing.assert_array_equal(out["slice"], [[base[7 + 5 * i + 2 * j] for j in range(3)] for i in range(2)])
  np.testing.assert_array_equal(out["whole"], grid)
  np.testing.assert_array_equal(out["half"], np.array([1, 2, 3], np.float16))
  assert out["half"].dtype == np.float16


def test_tensor_overrunning_its_storage_is_refused(tmp_path):
  path = tmp_path / "overrun.pt"
  _write_torch_zip(path, _dict({"t": _tensor("0", "FloatStorage", 4, 2, (3,), (1,))}),
                   {"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(ValueError, match="overruns"):
    torch_io.load(path)


def test_arbitrary_global_is_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"
  payload = _global("os", "system") + _tuple([_str(f"touch {marker}")]) + pickle.REDUCE
  path = tmp_path / "evil.pt"
  _write_torch_zip(path, _dict({"x": payload}), {})
  with pytest.raises(ValueError, match=r"os\.system"):
    torch_io.load(path)
  assert not marker.exists()


def test_argparse_namespace_reads_as_dict(tmp_path):
  # What pickle writes for argparse.Namespace(lr=0.0001, image_size=256) at protocol 2.
  namespace = (_global("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
               + _dict({"image_size": _int(256), "name": _str("vq")}) + pickle.BUILD)
  path = tmp_path / "args.pt"
  _write_torch_zip(path, _dict({"args": namespace, "step": _int(3)}), {})
  out = torch_io.load(path)
  assert type(out["args"]) is dict
  assert out == {"args": {"image_size": 256, "name": "vq"}, "step": 3}


def test_legacy_corrupt_and_missing_files(tmp_path):
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".")
  with pytest.raises(ValueError, match="legacy.pt is corrupt"):  # the magic number and nothing after it
    torch_io.load(legacy)
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    torch_io.load(garbage)
  good = tmp_path / "good.pt"
  torch_io.save({"w": np.arange(4096, dtype=np.float32)}, good)
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(good.read_bytes()[:-200])  # the central directory is gone
  with pytest.raises(ValueError):
    torch_io.load(truncated)
  flipped = bytearray(good.read_bytes())
  flipped[flipped.index(np.float32(1000).tobytes())] ^= 0xFF  # inside a storage record: the CRC fails
  corrupt = tmp_path / "corrupt.pt"
  corrupt.write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match="corrupt"):
    torch_io.load(corrupt)
  with pytest.raises(FileNotFoundError):
    torch_io.load(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------------------------------
# State dict containers.


@pytest.fixture()
def two_state_dicts():
  model = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)}
  ema = {k: v + 1 for k, v in model.items()}
  return model, ema


def test_container_selection(tmp_path, two_state_dicts):
  model, ema = two_state_dicts
  path = tmp_path / "ckpt.pt"
  torch_io.save({"ema": ema, "model": model, "steps": 5, "args": {"lr": 1e-4}}, path)
  _assert_same(torch_io.load_state_dict(path), model)  # "model" wins over "ema" by default
  _assert_same(torch_io.load_state_dict(path, key="ema"), ema)
  with pytest.raises(ValueError, match="'ema'.*'model'.*'steps'"):
    torch_io.load_state_dict(path, key="optimizer")
  for container in ("module", "state_dict", None):
    path = tmp_path / f"{container}.pt"
    torch_io.save_state_dict(model, path, container=container)
    _assert_same(torch_io.load_state_dict(path), model)


def test_no_state_dict_found(tmp_path, two_state_dicts):
  path = tmp_path / "odd.pt"
  torch_io.save({"weights": two_state_dicts[0], "steps": 5}, path)
  with pytest.raises(ValueError, match="'weights'"):
    torch_io.load_state_dict(path)
  assert torch_io.load_state_dict(path, key="weights").keys() == two_state_dicts[0].keys()


def test_wrapper_prefixes_are_stripped_only_when_on_every_key(tmp_path, two_state_dicts):
  model = two_state_dicts[0]
  path = tmp_path / "ddp.pt"
  torch_io.save_state_dict({f"module._orig_mod.{k}": v for k, v in model.items()}, path)
  _assert_same(torch_io.load_state_dict(path), model)
  mixed = {"module.a.weight": model["a.weight"], "a.bias": model["a.bias"]}
  torch_io.save_state_dict(mixed, path)
  assert set(torch_io.load_state_dict(path)) == set(mixed)


def test_safetensors_round_trip(tmp_path, two_state_dicts):
  sd = dict(two_state_dicts[0], half=np.ones(3, ml_dtypes.bfloat16), ids=np.arange(3, dtype=np.int64))
  path = tmp_path / "w.safetensors"
  torch_io.save_state_dict(sd, path)
  loaded = torch_io.load_state_dict(path)
  assert set(loaded) == set(sd)
  for k in sd:
    _assert_same(loaded[k], sd[k])
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x01\x02")
  with pytest.raises(ValueError, match="safetensors"):
    torch_io.load_state_dict(bad)


# ----------------------------------------------------------------------------------------------------------------------
# Resource limits and the legacy format.

LEGACY = pathlib.Path(__file__).resolve().parent / "fixtures" / "legacy_pt"
LLAMAGEN_GPT = pathlib.Path(__file__).resolve().parent / "fixtures" / "llamagen_tiny" / "gpt.pt"


def test_a_stride_zero_expansion_is_refused_before_allocating(tmp_path):
  # 64 Gi float32 elements (256 GiB) over a one-element storage: the 700-byte file of the audit.
  path = tmp_path / "expand.pt"
  _write_torch_zip(path, _dict({"t": _tensor("0", "FloatStorage", 1, 0, (1 << 18, 1 << 18), (0, 0))}),
                   {"0": np.zeros(1, np.float32).tobytes()})
  with pytest.raises(ValueError, match=r"repeats its storage along a dimension \(stride \(0, 0\)\)"):
    torch_io.load(path)
  # A size-1 dimension with stride 0 expands nothing and is fine (torch writes such strides).
  _write_torch_zip(path, _dict({"t": _tensor("0", "FloatStorage", 3, 0, (1, 3), (0, 1))}),
                   {"0": np.arange(3, dtype=np.float32).tobytes()})
  np.testing.assert_array_equal(torch_io.load(path)["t"], [[0, 1, 2]])


def test_more_elements_than_the_storage_is_refused(tmp_path):
  path = tmp_path / "overlap.pt"  # overlapping rows: inside the storage, but 16 elements from 5
  _write_torch_zip(path, _dict({"t": _tensor("0", "FloatStorage", 5, 0, (4, 4), (1, 1))}),
                   {"0": np.zeros(5, np.float32).tobytes()})
  with pytest.raises(ValueError, match="has 16 elements, more than its storage of 5"):
    torch_io.load(path)


def _nested_list_pickle(depth: int) -> bytes:
  """[[[...]]] `depth` deep, built through the memo so that the unpickler's stack stays two items high."""
  out = pickle.PROTO + b"\x02" + pickle.EMPTY_LIST + pickle.BINPUT + b"\x00"
  for _ in range(depth):
    out += pickle.POP + pickle.EMPTY_LIST + pickle.BINGET + b"\x00" + pickle.APPEND + pickle.BINPUT + b"\x00"
  return out


def test_deep_nesting_and_self_reference_are_refused(tmp_path):
  path = tmp_path / "deep.pt"
  _write_torch_zip(path, _nested_list_pickle(100_000)[2:], {})
  with pytest.raises(ValueError, match=f"nests containers more than {torch_io.MAX_NESTING} deep"):
    torch_io.load(path)
  _write_torch_zip(path, _nested_list_pickle(10)[2:], {})
  depth, node = 0, torch_io.load(path)
  while node:
    depth, node = depth + 1, node[0]
  assert depth == 10
  looped = pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.BINGET + b"\x00" + pickle.APPEND
  _write_torch_zip(path, looped, {})
  with pytest.raises(ValueError, match="contains itself"):
    torch_io.load(path)


def test_legacy_file_reads_to_exactly_the_expected_arrays():
  obj = torch_io.load(LEGACY / "mixed_legacy.pt")
  assert sorted(obj) == ["epoch", "model"] and obj["epoch"] == 3
  with np.load(LEGACY / "mixed_expected.npz") as expected:
    assert sorted(obj["model"]) == sorted(expected.files)
    for name in expected.files:
      got, want = obj["model"][name], expected[name]
      if name == "bf16":
        assert got.dtype == ml_dtypes.bfloat16
        got = got.astype(np.float32)
      assert got.dtype == want.dtype and got.shape == want.shape, name
      np.testing.assert_array_equal(got, want, err_msg=name)
  np.testing.assert_array_equal(obj["model"]["view_t"], obj["model"]["base"].T)
  np.testing.assert_array_equal(obj["model"]["view_slice"], obj["model"]["base"][1:3, 2:5])


def test_legacy_gpt_converts_to_the_same_model_as_the_zip_file():
  from npp_jax.model_files import param_mapping  # pylint: disable=g-import-not-at-top
  from test_convert_gpt import fixture_cfg  # pylint: disable=g-import-not-at-top
  legacy, current = torch_io.load_state_dict(LEGACY / "gpt_legacy.pt"), torch_io.load_state_dict(LLAMAGEN_GPT)
  assert sorted(legacy) == sorted(current)
  for key in current:
    assert legacy[key].dtype == current[key].dtype, key
    np.testing.assert_array_equal(legacy[key], current[key], err_msg=key)
  exported = param_mapping.gpt_to_torch(param_mapping.gpt_from_torch(LEGACY / "gpt_legacy.pt", fixture_cfg()))
  for key, value in current.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def _legacy_bytes(obj_pickle: bytes, keys: list[str], storages: list[bytes]) -> bytes:
  header = b"".join(pickle.dumps(x, protocol=2) for x in
                    (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
  return header + obj_pickle + pickle.dumps(keys, protocol=2) + b"".join(storages)


def _legacy_tensor(key: str, numel: int, size, stride) -> bytes:
  pid = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel),
                pickle.NONE])
  args = (pickle.MARK + pid + pickle.BINPERSID + _int(0) + _tuple([_int(n) for n in size])
          + _tuple([_int(s) for s in stride]) + pickle.NEWFALSE + _global("collections", "OrderedDict")
          + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE)
  return _global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def test_legacy_files_get_the_same_checks(tmp_path):
  path = tmp_path / "legacy.pt"
  data = np.arange(4, dtype=np.float32)
  storage = (4).to_bytes(8, "little") + data.tobytes()
  good = pickle.PROTO + b"\x02" + _dict({"w": _legacy_tensor("k", 4, (2, 2), (2, 1))}) + pickle.STOP
  path.write_bytes(_legacy_bytes(good, ["k"], [storage]))
  np.testing.assert_array_equal(torch_io.load(path)["w"], data.reshape(2, 2))
  path.write_bytes(_legacy_bytes(good, ["k"], [storage[:-3]]))
  with pytest.raises(ValueError, match="truncated: storage k has 13 of its 16 bytes"):
    torch_io.load(path)
  expand = pickle.PROTO + b"\x02" + _dict({"w": _legacy_tensor("k", 4, (1 << 20, 4), (0, 1))}) + pickle.STOP
  path.write_bytes(_legacy_bytes(expand, ["k"], [storage]))
  with pytest.raises(ValueError, match="repeats its storage"):
    torch_io.load(path)
  marker = tmp_path / "pwned"
  evil = (pickle.PROTO + b"\x02" + _global("os", "system") + _tuple([_str(f"touch {marker}")]) + pickle.REDUCE
          + pickle.STOP)
  path.write_bytes(_legacy_bytes(evil, [], []))
  with pytest.raises(ValueError, match=r"refusing to load global os\.system"):
    torch_io.load(path)
  assert not marker.exists()
