"""Config files are data: they import npp_jax.config (and the asset paths) only and open no file when loaded, other
than a config they build on; and one rule says when a stored run's config differs from the current one."""

import ast
import pathlib
import sys

import pytest

import npp_jax.config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))
ALLOWED_IMPORTS = {"npp_jax.config", "npp_jax.assets", "ml_collections", "pathlib"}


def imported(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.update(f"{node.module}.{alias.name}" if node.module == "npp_jax" else node.module for alias in node.names)
  return names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_config_imports_only_the_config_module_and_asset_paths(path):
  assert imported(path) <= ALLOWED_IMPORTS, imported(path) - ALLOWED_IMPORTS


_opened: list[str] | None = None  # while a config loads: the files it opens


def _audit(event, args):
  if _opened is not None and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
    _opened.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks stay for the process; it records only inside `opened_while`


def opened_while(load) -> list[str]:
  global _opened
  _opened = []
  try:
    load()
    return _opened
  finally:
    _opened = None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_loading_a_config_reads_no_file_but_configs(path):
  assert opened_while(lambda: config_lib.load_file(str(path)))  # the hook sees the config file itself
  others = [name for name in opened_while(lambda: config_lib.load_file(str(path)))
            if not pathlib.Path(name).resolve().is_relative_to(REPO / "configs")
            and "__pycache__" not in name and not name.endswith(".py")]
  assert not others, others


def test_differences_names_changed_and_removed_fields_but_not_new_ones():
  stored = {"seed": 0, "model": {"dim": 4, "old": 1}, "optim": {"lr": 1.0}}
  current = {"seed": 1, "model": {"dim": 8, "new": 2}, "optim": {"lr": 1.0}}
  assert config_lib.differences(stored, current, ("seed", "model", "optim")) == ["seed", "model.dim", "model.old"]
  assert config_lib.differences(stored, current, ("model",), ignore=("dim", "old")) == []
  assert config_lib.differences(stored, stored, ("seed", "model", "optim")) == []
