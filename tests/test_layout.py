"""The README's layout section and the package docstring name every module there is, and only those."""

import pathlib
import re

import npp_jax
import test_imports

REPO = pathlib.Path(__file__).resolve().parents[1]


def _layout_section() -> str:
  text = (REPO / "README.md").read_text()
  return text[text.index("## Layout"):]


def test_readme_layout_names_every_module_and_folder():
  layout = _layout_section()
  package = REPO / "npp_jax"
  for path in sorted(package.rglob("*.py")):
    if path.name == "__init__.py" and path.parent == package:
      continue
    name = path.name if path.name != "__init__.py" else f"{path.parent.name}/"
    assert f"`{name}`" in layout or (path.name == "__init__.py" and "`__init__.py`" in layout), path
  for folder in ("npp_jax", "configs", "tests", "bench", "launch", "docs"):
    assert f"`{folder}/`" in layout, folder
  named = set(re.findall(r"`([a-z_0-9]+\.py)`", layout))
  existing = {p.name for p in REPO.glob("npp_jax/**/*.py")} | {p.name for p in REPO.glob("configs/*.py")} | {
      p.name for p in REPO.glob("tests/*.py")} | {p.name for p in REPO.glob("bench/*.py")} | {
      p.name for p in REPO.glob("docs/*.py")}
  assert named <= existing, named - existing  # nothing listed that is not there


def test_package_docstring_names_modules_that_exist():
  doc = npp_jax.__doc__
  for name in ("main", "prepare", "sample", "evaluate", "convert", "train_tokenizer", "train_classifier", "demo"):
    assert re.search(rf"^  {name} ", doc, re.M), name
    assert (REPO / "npp_jax" / f"{name}.py").is_file()


def test_package_docstring_names_every_module_and_folder():
  doc = npp_jax.__doc__
  entry_points = {name.split(".")[-1] for name in test_imports.entry_points()}
  assert set(re.findall(r"^  (\w+) {2,}", doc, re.M)) == entry_points  # the entry-point table, exactly
  package = REPO / "npp_jax"
  for path in sorted(package.rglob("*.py")):
    if path.name == "__init__.py":
      continue
    if path.parent != package:
      assert f"{path.parent.name}/" in doc, path.parent
    assert re.search(rf"\b{path.stem}\b", doc), path
