"""The package's import structure, read from the modules' own import statements (also those inside functions):
no import cycle anywhere, and no library module imports a command-line module (one that runs as `python -m`, or
cli.py, their shared flag handling)."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "npp_jax"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules `path` imports (`from a import b` names module a.b where there is one, else a)."""
  found = set()
  base = module_name(path).split(".")
  if path.name != "__init__.py":
    base = base[:-1]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      parent = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level \
          else node.module
      names = [f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in known else parent for alias in node.names]
    else:
      continue
    found.update(name for name in names if name in known)
  return found


def graph() -> dict[str, set[str]]:
  found = modules()
  return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(edges.get(node, ())):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for node in sorted(edges):
    if node not in index:
      visit(node)
  return out


def entry_points() -> set[str]:
  """Modules that run as `python -m npp_jax.X`: they end in an `if __name__ == "__main__":` block."""
  def is_main_guard(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
  return {name for name, path in modules().items() if any(map(is_main_guard, ast.parse(path.read_text()).body))}


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_is_read_from_the_code():
  edges = graph()
  assert "npp_jax.model_files.param_mapping" in edges["npp_jax.model_files.store"]
  assert "npp_jax.checkpoints.checkpoint" in edges["npp_jax.trainers.workdir"]
  assert "npp_jax.models.gpt" in edges["npp_jax.sampling.decoding"]


def test_no_import_cycle_in_the_package():
  assert cycles(graph()) == []


def test_no_library_module_imports_a_command_line_module():
  commands = entry_points() | {"npp_jax.cli"}  # the entry points and the flag handling they share
  assert {"npp_jax.main", "npp_jax.sample", "npp_jax.convert", "npp_jax.demo", "npp_jax.study",
          "npp_jax.train_tokenizer", "npp_jax.train_classifier", "npp_jax.prepare", "npp_jax.evaluate"} <= commands
  edges = graph()
  wrong = {name: sorted(edges[name] & commands) for name in edges if name not in commands and edges[name] & commands}
  assert not wrong, wrong
