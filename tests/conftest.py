"""Test set-up: 8 forced CPU devices (so sharding is tested for real), shared fixtures."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("NPP_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """`../shared/fixtures`; CI always has it, so there a missing copy fails."""
  path = SHARED / "fixtures"
  if not path.is_dir():
    if os.environ.get("CI"):
      pytest.fail(f"reference fixtures not found at {path}")
    pytest.skip(f"reference fixtures not found at {path} (set NPP_SHARED)")
  return path
