"""Test set-up: 8 forced CPU devices (so sharding is tested for real) and the reference fixtures in tests/fixtures."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """tests/fixtures (see its README.md). It is part of the repository, so a missing copy is a failure."""
  if not (FIXTURES / "llamagen_tiny").is_dir() or not (FIXTURES / "fid").is_dir():
    pytest.fail(f"the reference fixtures are missing from {FIXTURES}; they are part of the repository")
  return FIXTURES
