"""Verified checkpoints: every saved step gets an integrity record after it commits; a damaged step (flipped bytes,
truncated or missing files, an empty directory) is moved aside as `<step>.corrupt-<time>` and the previous good step
restores; a step without a record restores with a note; a failed save leaves no partial directory behind."""

import json
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax.checkpoints import checkpoint
from npp_jax.checkpoints import integrity

STEPS = (1, 2, 3)


def state_at(step: int) -> dict:
  """A small train-state-like tree whose values say which step it is."""
  return {"step": jnp.asarray(step, jnp.int32),
          "params": {"w": jnp.full((32, 16), float(step), jnp.float32), "b": jnp.arange(16.0) * step},
          "opt_state": {"nu": jnp.full((32, 16), step / 10, jnp.float32)}}


def abstract() -> dict:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state_at(0))


def save_steps(workdir, steps=STEPS):
  mngr = checkpoint.manager(str(workdir), keep=5)
  try:
    for step in steps:
      checkpoint.save(mngr, step, state_at(step), {"step": step})
    checkpoint.finish(mngr)
  finally:
    mngr.close()


def restore_newest(workdir):
  lines = []
  mngr = checkpoint.manager(str(workdir), keep=5)
  try:
    return checkpoint.restore_newest(mngr, abstract(), lines.append), lines
  finally:
    mngr.close()


def step_dir(workdir, step) -> pathlib.Path:
  return pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR / str(step)


def set_aside(workdir) -> list[str]:
  return sorted(p.name for p in (pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR).iterdir()
                if checkpoint.CORRUPT_MARK in p.name)


def largest_data_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)


def test_every_step_has_a_record_of_every_file(tmp_path):
  save_steps(tmp_path)
  for step in STEPS:
    record = json.loads((step_dir(tmp_path, step) / integrity.record_name(0)).read_text())
    files = {str(p.relative_to(step_dir(tmp_path, step))) for p in step_dir(tmp_path, step).rglob("*")
             if p.is_file() and not p.name.startswith(integrity.RECORD_PREFIX)}
    assert set(record["files"]) == files and "state/_METADATA" in files and "meta/metadata" in files
    for rel, (size, crc) in record["files"].items():  # an independent CRC of each file
      data = (step_dir(tmp_path, step) / rel).read_bytes()
      assert (size, crc) == (len(data), zlib.crc32(data))
  (state, meta, step), lines = restore_newest(tmp_path)
  assert step == 3 and meta == {"step": 3} and lines == []
  np.testing.assert_array_equal(state["params"]["w"], np.full((32, 16), 3.0))


def flip_bytes(workdir):
  path = largest_data_file(step_dir(workdir, 3))
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  return "differs from what was written"


def truncate(workdir):
  path = largest_data_file(step_dir(workdir, 3))
  path.write_bytes(path.read_bytes()[:-17])
  return "bytes,"


def remove_metadata(workdir):
  (step_dir(workdir, 3) / "state" / "_METADATA").unlink()
  return "_METADATA is missing"


def remove_meta_item(workdir):
  for path in sorted((step_dir(workdir, 3) / "meta").rglob("*"), reverse=True):
    path.unlink()
  (step_dir(workdir, 3) / "meta").rmdir()
  return "/meta/commit_success.txt is missing"


def empty_step_directory(workdir):
  step_dir(workdir, 4).mkdir()
  return "it does not restore"


@pytest.mark.parametrize("damage", [flip_bytes, truncate, remove_metadata, remove_meta_item, empty_step_directory])
def test_a_damaged_step_is_moved_aside_and_the_previous_one_restores(tmp_path, damage):
  save_steps(tmp_path)
  reason = damage(tmp_path)
  bad = 4 if damage is empty_step_directory else 3
  good = 3 if damage is empty_step_directory else 2
  (state, meta, step), lines = restore_newest(tmp_path)
  assert step == good and meta == {"step": good} and int(state["step"]) == good
  np.testing.assert_array_equal(state["opt_state"]["nu"], np.full((32, 16), good / 10, np.float32))
  moved = set_aside(tmp_path)
  assert len(moved) == 1 and moved[0].startswith(f"{bad}{checkpoint.CORRUPT_MARK}")
  assert not step_dir(tmp_path, bad).exists()
  damaged_lines = [line for line in lines if "damaged" in line]
  assert len(damaged_lines) == 1 and moved[0] in damaged_lines[0] and reason in damaged_lines[0], lines
  # Nothing was deleted: the moved step still holds its files.
  assert any((pathlib.Path(tmp_path) / checkpoint.CHECKPOINT_DIR / moved[0]).iterdir()) or bad == 4


def test_a_step_without_a_record_restores_with_a_note(tmp_path):
  save_steps(tmp_path)
  (step_dir(tmp_path, 3) / integrity.record_name(0)).unlink()  # as written before records existed
  (state, _, step), lines = restore_newest(tmp_path)
  assert step == 3 and int(state["step"]) == 3
  assert len(lines) == 1 and "has no integrity record" in lines[0] and "unchecked" in lines[0]


def test_no_good_step_is_one_sentence(tmp_path):
  save_steps(tmp_path, steps=(1,))
  flip_bytes_in = largest_data_file(step_dir(tmp_path, 1))
  flip_bytes_in.write_bytes(b"\0" * flip_bytes_in.stat().st_size)
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* could be restored.*1\.corrupt-"):
    restore_newest(tmp_path)


def test_an_intact_step_of_another_state_is_refused_not_moved(tmp_path):
  save_steps(tmp_path, steps=(1,))
  wrong = abstract()
  wrong["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=wrong["params"]["b"].sharding)
  mngr = checkpoint.manager(str(tmp_path))
  try:
    with pytest.raises(checkpoint.CheckpointError, match="step 1 .* is intact but does not restore"):
      checkpoint.restore_newest(mngr, wrong, print)
  finally:
    mngr.close()
  assert set_aside(tmp_path) == [] and step_dir(tmp_path, 1).is_dir()


def test_multi_process_records_split_the_files_by_writer(tmp_path):
  """Orbax names per-process files ocdbt.process_<i> / array_metadatas/process_<i>; the rest are process 0's."""
  assert integrity.owner("state/ocdbt.process_3/d/abc") == 3
  assert integrity.owner("state/array_metadatas/process_1") == 1
  assert integrity.owner("state/_METADATA") == integrity.owner("meta/metadata") == 0
  step = tmp_path / "7"
  for rel, text in {"state/_METADATA": "m", "state/ocdbt.process_0/d/a": "x", "state/ocdbt.process_1/d/b": "y"}.items():
    (step / rel).parent.mkdir(parents=True, exist_ok=True)
    (step / rel).write_text(text)
  assert set(integrity.write_record(step, 0, 2)["files"]) == {"state/_METADATA", "state/ocdbt.process_0/d/a"}
  assert integrity.verify(step, 0, 1).endswith("lacks the integrity records of processes [1]; their files are "
                                               "unchecked")
  assert set(integrity.write_record(step, 1, 2)["files"]) == {"state/ocdbt.process_1/d/b"}
  assert integrity.verify(step, 0, 1) is None
  (step / "state/ocdbt.process_1/d/b").write_text("z")
  assert integrity.verify(step, 0, 2) is None  # process 0 of two checks only its share ...
  with pytest.raises(integrity.IntegrityError, match="ocdbt.process_1/d/b differs"):
    integrity.verify(step, 1, 2)  # ... and process 1 finds the damage


def test_a_failed_save_removes_its_partial_directory(tmp_path, monkeypatch):
  save_steps(tmp_path, steps=(1,))
  mngr = checkpoint.manager(str(tmp_path))
  real_save = mngr.save

  def save_then_fail(step, *args, **kwargs):
    real_save(step, *args, **kwargs)
    mngr.wait_until_finished()
    partial = step_dir(tmp_path, step).parent / f"{step}{checkpoint.TMP_MARK}-123"
    step_dir(tmp_path, step).rename(partial)  # as a save cut short by a full disk leaves it
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(mngr, "save", save_then_fail)
  try:
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"could not save step 2 in .*No space left on device; removed its partial directory"):
      checkpoint.save(mngr, 2, state_at(2), {"step": 2})
  finally:
    mngr.close()
  names = sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINT_DIR).iterdir())
  assert names == ["1"]


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
  mngr = checkpoint.manager(str(tmp_path))
  try:
    with pytest.raises(checkpoint.CheckpointError, match=r"not enough free space to save step 1 in .*GiB are free"):
      checkpoint.save(mngr, 1, state_at(1), {"step": 1})
  finally:
    mngr.close()
  assert list((tmp_path / checkpoint.CHECKPOINT_DIR).iterdir()) == []


def test_stale_temporaries_are_removed(tmp_path):
  save_steps(tmp_path, steps=(1,))
  stale = tmp_path / checkpoint.CHECKPOINT_DIR / f"2{checkpoint.TMP_MARK}-99"
  (stale / "state").mkdir(parents=True)
  assert checkpoint.remove_temporaries(tmp_path / checkpoint.CHECKPOINT_DIR) == [str(stale)]
  assert not stale.exists() and step_dir(tmp_path, 1).is_dir()
