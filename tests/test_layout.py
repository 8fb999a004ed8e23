"""The package's import structure: no cycle, entry points on top, the layers of architecture.md.

Imports are read from the source (``ast``), every ``deepflow_jax`` import at any
depth of a module, so a lazy import inside a function counts too.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "deepflow_jax")
ENTRY_POINTS = {"deepflow_jax.main", "deepflow_jax.generate", "deepflow_jax.evaluate",
                "deepflow_jax.convert", "deepflow_jax.convert_vae", "deepflow_jax.preprocess",
                "deepflow_jax.plan"}

# docs/architecture.md's layers, bottom up: a module may import its own layer and those below.
LAYERS = [
    ("foundation", ["errors", "signals", "progress", "npy_io", "storage", "locks", "outputs",
                    "torch_io", "sharding", "workdir", "hardware"]),
    ("networks", ["models"]),
    ("numerics", ["losses", "sampling", "images"]),
    ("data", ["data"]),
    ("evaluation", ["evaluation"]),
    ("configs", ["config_lib", "configs", "flags_lib"]),
    ("generation", ["generation"]),
    ("training", ["training"]),
    ("planning", ["planning"]),
]


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, set[str]]:
  """{module: the deepflow_jax modules it imports}."""
  graph = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        graph[_module_name(path)] = _imports(path)
  known = set(graph)
  return {m: _resolve(deps, known) for m, deps in graph.items()}


def _resolve(imports: set[tuple[str, str]], known: set[str]) -> set[str]:
  """``from a.b import c``: ``a.b.c`` when that is a module, else ``a.b`` (c lives there)."""
  out = set()
  for module, name in imports:
    full = f"{module}.{name}" if name else module
    out.add(full if full in known else module)
  return {m for m in out if m in known}


def _imports(path: str) -> set[tuple[str, str]]:
  """(module, name) of every deepflow_jax import (name "" for ``import a.b``)."""
  with open(path, encoding="utf-8") as fh:
    tree = ast.parse(fh.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {(a.name, "") for a in node.names if a.name.startswith("deepflow_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
        "deepflow_jax"):
      out |= {(node.module, a.name) for a in node.names}
  return out


def _layer(module: str) -> int:
  top = module.split(".")[1] if "." in module else ""
  for i, (_, names) in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def test_no_import_cycle():
  graph = _modules()
  state = {}

  def visit(m, stack):
    state[m] = "active"
    for d in sorted(graph[m]):
      if state.get(d) == "active":
        cycle = stack[stack.index(d):] + [d]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d, stack + [d])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_entry_points_are_imported_by_nothing():
  for m, deps in _modules().items():
    assert not deps & ENTRY_POINTS, (m, deps & ENTRY_POINTS)
  known = set(_modules()) | ENTRY_POINTS
  for f in os.listdir(os.path.join(ROOT, "scripts")):
    if f.endswith(".py"):
      bad = _resolve(_imports(os.path.join(ROOT, "scripts", f)), known) & ENTRY_POINTS
      assert not bad, (f, bad)


def test_layers():
  graph = _modules()
  for m, deps in graph.items():
    if m in ENTRY_POINTS or m == "deepflow_jax":
      continue
    for d in deps:
      if d == "deepflow_jax" or d in ENTRY_POINTS:
        continue
      assert _layer(d) <= _layer(m), (f"{m} ({LAYERS[_layer(m)][0]}) imports {d} "
                                      f"({LAYERS[_layer(d)][0]}), a higher layer")
