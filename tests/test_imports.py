"""The package's import graph has no cycles, counting the imports inside functions too (a lazy
import that closes a cycle only hides it), and function-level imports stay rare."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def _modules() -> dict:
  """'tdjax.data.codes' -> path, for every module of the package."""
  out = {}
  for dirpath, _, names in os.walk(os.path.join(ROOT, "tdjax")):
    for n in names:
      if n.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, n), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, n)
  return out


def import_graph() -> tuple[dict, dict]:
  """(module -> the package modules it imports, module -> its function-level imports).  `from X
  import Y` is an edge to X.Y when that is a module (a submodule), else to X (a name of X)."""
  mods = _modules()
  edges, lazy = {m: set() for m in mods}, {m: 0 for m in mods}
  for m, path in mods.items():
    tree = ast.parse(open(path).read())
    package = m if path.endswith("__init__.py") else m.rpartition(".")[0]
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
      else:
        continue
      edges[m].update(t for t in targets if t in mods and t != m)
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lazy[m] += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(fn))
  return edges, lazy


def cycles(edges: dict) -> list:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  edges, _ = import_graph()
  assert cycles(edges) == []


def test_the_checker_finds_a_lazy_cycle():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(edges) == [["a", "b", "c"]]


def test_nothing_below_the_trainer_imports_it():
  """Tasks and data build on other runs through `tdjax.checkpoint`, not the training loop."""
  edges, _ = import_graph()
  for m, targets in edges.items():
    if m.startswith(("tdjax.tasks", "tdjax.data", "tdjax.nn", "tdjax.generators",
                     "tdjax.tokenizers", "tdjax.losses", "tdjax.diffusion")):
      assert not targets & {"tdjax.trainer", "tdjax.runs"}, (m, targets)


@pytest.mark.parametrize("limit", [45])
def test_function_level_imports_are_few(limit):
  """Imports inside functions are for start-up time only (jax before the fake device count,
  torch / safetensors / tensorflow-datasets / matplotlib when a path needs them)."""
  _, lazy = import_graph()
  assert sum(lazy.values()) <= limit, sorted(lazy.items(), key=lambda kv: -kv[1])[:8]


def _requirements() -> set:
  """Normalised distribution names of setup.cfg's install_requires."""
  import configparser
  import re
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  lines = [ln.split("#")[0].strip() for ln in cfg["options"]["install_requires"].splitlines()]
  return {re.split(r"[\[<>=!~ ]", ln)[0].lower().replace("_", "-") for ln in lines if ln}


def _third_party_imports(module_level_only: bool) -> set:
  import sys
  out = set()
  for path in _modules().values():
    tree = ast.parse(open(path).read())
    for node in (tree.body if module_level_only else ast.walk(tree)):
      if isinstance(node, ast.Import):
        out |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and not node.level:
        out.add(node.module.split(".")[0])
  return out - set(sys.stdlib_module_names) - {"tdjax", "__future__"}


def test_every_imported_distribution_is_declared_and_every_declared_one_used():
  """A module-level import of a package setup.cfg does not declare works here only because
  something else installed it (etils was such a one); a declared package no module imports is
  dead weight (einops was).  importlib_resources is declared for tfds (its comment says why)."""
  import importlib.metadata as md
  dists = md.packages_distributions()
  name = lambda m: dists.get(m, [m])[0].lower().replace("_", "-")
  required = _requirements()
  undeclared = sorted(m for m in _third_party_imports(True) if name(m) not in required)
  assert not undeclared, f"imported at module level but not in install_requires: {undeclared}"
  used = {name(m) for m in _third_party_imports(False)}
  unused = sorted(required - used - {"importlib-resources"})
  assert not unused, f"declared in install_requires, imported by no module: {unused}"
