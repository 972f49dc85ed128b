"""Transparent huge pages under glibc's large allocations, for the programs of this package.

XLA:CPU allocates each execution's temporaries as one block (253 MiB for the default run's next-token step) from a
worker thread. glibc maps a block that large afresh on every call and unmaps it afterwards, so the kernel faults in
and zeroes it 4 KiB at a time on every step: 66,000 page faults per step of the default run, 145,000 at GPT-B width.
glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 on) has malloc ask the kernel for 2 MiB pages for such blocks,
which the kernel grants where its transparent huge pages are in `madvise` or `always` mode: 650 and 930 faults per
step, the default run's step 1.1-1.2x faster and GPT-B width's about 1.05x, peak RSS unchanged.

glibc reads its tunables once, when a process starts. So a program of this package started as `python -m npp_jax.X`
runs itself again, once, with the tunable added, from npp_jax/__init__.py: before anything heavy is imported or any
output written, in the same process (exec), with the same arguments; the benchmarks in bench/ do the same from their
main blocks. NPP_JAX_HUGE_PAGES=0 turns this off; a GLIBC_TUNABLES that already sets glibc.malloc.hugetlb is left as
it is. Child processes inherit the variable; `without_added` gives the environment without it, for other programs.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "NPP_JAX_HUGE_PAGES"
_ADDED = "NPP_JAX_HUGE_PAGES_ADDED"  # marks a tunable `environment` added, so that `without_added` can take it out
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library when it is glibc, None otherwise."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


def kernel_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode (always, madvise or never), None where it has none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def available(glibc: tuple[int, int] | None, mode: str | None) -> bool:
  """Whether glibc can ask for huge pages (2.35 on) and the kernel would grant them."""
  return glibc is not None and glibc >= (2, 35) and mode in ("always", "madvise")


def environment(environ: Mapping[str, str]) -> dict[str, str]:
  """environ with the tunable added to GLIBC_TUNABLES, unless it sets it already or opts out."""
  env = dict(environ)
  tunables = env.get("GLIBC_TUNABLES", "")
  if env.get(OPT_OUT) == "0" or TUNABLE + "=" in tunables:
    return env
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
  env[_ADDED] = "1"
  return env


def without_added(environ: Mapping[str, str]) -> dict[str, str]:
  """environ as it was before `environment` added the tunable: for other programs this package starts, such as the
  baseline a benchmark times, which should run as their own users run them."""
  env = dict(environ)
  if env.pop(_ADDED, None):
    kept = [entry for entry in env.get("GLIBC_TUNABLES", "").split(":") if entry and entry != f"{TUNABLE}=1"]
    if kept:
      env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
      env.pop("GLIBC_TUNABLES", None)
  return env


def started_as_package_program(argv: Sequence[str]) -> bool:
  """Whether the interpreter's command line (sys.orig_argv) runs a module of this package: `python -m npp_jax.X`."""
  args = iter(argv[1:])
  for arg in args:
    if arg == "-m":
      return next(args, "").startswith("npp_jax.")
    if arg.startswith("-m"):
      return arg[2:].startswith("npp_jax.")
    if arg in ("-X", "-W", "--check-hash-based-pycs"):  # the interpreter options that take a separate value
      next(args, None)
    elif not arg.startswith("-") or arg.startswith("-c"):  # a script, or code: not a module of this package
      return False
  return False


def restart_with_huge_pages(this_program: bool = False) -> None:
  """Replaces this process with itself under the tunable, when it is a program of this package (`python -m
  npp_jax.X`, or any program whose main block says so with this_program) started without it, on a system where it
  takes effect; returns otherwise."""
  argv = getattr(sys, "orig_argv", None)
  program = this_program or (argv and started_as_package_program(argv))
  if not argv or not program or not available(glibc_version(), kernel_mode()):
    return
  env = environment(os.environ)
  if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
    return  # set already, or opted out
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(argv), env)
