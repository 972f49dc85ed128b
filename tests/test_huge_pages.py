"""huge_pages: a program of this package runs under glibc's huge-page tunable, restarting itself once to get it."""

import os
import subprocess
import sys
import textwrap

import pytest

from npp_jax import huge_pages

ON = huge_pages.available(huge_pages.glibc_version(), huge_pages.kernel_mode())
NEEDS_HUGE_PAGES = pytest.mark.skipif(not ON, reason="needs glibc >= 2.35 and transparent huge pages (madvise/always)")


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "npp_jax.main", "--config", "c.py"], True),
    (["python", "-u", "-X", "importtime", "-m", "npp_jax.sample"], True),
    (["python", "-mnpp_jax.study"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "bench/train_throughput.py", "-m", "npp_jax.main"], False),
    (["python", "-c", "import npp_jax", "-m", "npp_jax.main"], False),
    (["python"], False),
])
def test_only_modules_of_this_package_run_with_m_count_as_its_programs(argv, expected):
  assert huge_pages.started_as_package_program(argv) is expected


def test_environment_adds_the_tunable_and_keeps_the_users_choices():
  assert huge_pages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert (huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == \
      "glibc.malloc.hugetlb=0"
  assert "GLIBC_TUNABLES" not in huge_pages.environment({"NPP_JAX_HUGE_PAGES": "0"})


@pytest.mark.parametrize("before", [{}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {"PATH": "/bin"}])
def test_without_added_restores_the_environment_the_user_gave(before):
  """Other programs (a benchmark's baseline) get the user's environment back, tunable included if the user set it."""
  assert huge_pages.without_added(huge_pages.environment(before)) == before


def test_availability_needs_glibc_2_35_and_a_kernel_that_grants_huge_pages(tmp_path):
  assert huge_pages.available((2, 36), "madvise") and huge_pages.available((2, 35), "always")
  assert not huge_pages.available((2, 34), "madvise")
  assert not huge_pages.available((2, 36), "never")
  assert not huge_pages.available(None, "always")
  mode_file = tmp_path / "enabled"
  mode_file.write_text("always [madvise] never\n")
  assert huge_pages.kernel_mode(str(mode_file)) == "madvise"
  assert huge_pages.kernel_mode(str(tmp_path / "missing")) is None


# Runs at interpreter start-up in the child (sitecustomize) and reports, at exit, the tunable the process ended with
# and the page faults of touching a fresh 64 MiB block from malloc: 16,384 with 4 KiB pages, a few dozen with 2 MiB.
_PROBE = textwrap.dedent("""
    import atexit, ctypes, os
    def _report():
      libc = ctypes.CDLL(None)
      libc.malloc.restype = ctypes.c_void_p
      faults = lambda: int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
      size = 64 << 20
      block = libc.malloc(size)
      before = faults()
      ctypes.memset(block, 1, size)
      print("PROBE", os.environ.get("GLIBC_TUNABLES", "-"), faults() - before, flush=True)
    atexit.register(_report)
""")


def _probe(tmp_path, env_overrides: dict[str, str]) -> tuple[str, int]:
  (tmp_path / "sitecustomize.py").write_text(_PROBE)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "NPP_JAX_HUGE_PAGES")}
  env.update(PYTHONPATH=str(tmp_path), **env_overrides)
  done = subprocess.run([sys.executable, "-m", "npp_jax.main", "--help"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  probes = [line.split() for line in done.stdout.splitlines() if line.startswith("PROBE")]
  assert len(probes) == 1, done.stdout[-2000:]  # one process at exit: the first one was replaced, not forked
  return probes[0][1], int(probes[0][2])


@NEEDS_HUGE_PAGES
def test_a_program_of_the_package_restarts_once_onto_huge_pages(tmp_path):
  tunables, faults = _probe(tmp_path, {})
  assert tunables == "glibc.malloc.hugetlb=1"
  assert faults < 2_000, faults  # 64 MiB in 2 MiB pages (4 KiB pages: 16,384 faults)


@NEEDS_HUGE_PAGES
def test_the_opt_out_keeps_small_pages(tmp_path):
  tunables, faults = _probe(tmp_path, {"NPP_JAX_HUGE_PAGES": "0"})
  assert tunables == "-"
  if huge_pages.kernel_mode() == "madvise":  # in `always` mode the kernel hands out huge pages unasked
    assert faults > 10_000, faults
