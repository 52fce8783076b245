"""No import cycle among t5x_adapt's modules.

A cycle works only while every module in it happens to need the others'
names after loading (a function-level import, an attribute looked up at
call time); the next module-level import turns it into an ImportError
about a partially initialised module. The graph is read with `ast`, nothing
imported: every `import` statement of a t5x_adapt module, at module level
or inside a function, is an edge. `from t5x_adapt.x import y` points at the
submodule `t5x_adapt.x.y` when there is one, else at `t5x_adapt.x`. The
implicit import of a package's `__init__` is not an edge: a package that
re-exports its submodules would otherwise be in a cycle with each of them,
which Python resolves (the package object exists before `__init__` runs).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = 't5x_adapt'
ROOT = pathlib.Path(__file__).resolve().parent.parent


def module_files() -> dict[str, pathlib.Path]:
  """{dotted module name: its file} of every module of the package."""
  modules = {}
  for path in sorted((ROOT / PACKAGE).rglob('*.py')):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    modules['.'.join(parts)] = path
  return modules


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The module a `from ... import` statement names, relative ones resolved."""
  if not node.level:
    return node.module or ''
  package = module.split('.')
  if not is_package:
    package.pop()
  package = package[:len(package) - node.level + 1]
  return '.'.join(package + ([node.module] if node.module else []))


def imported_modules(module: str, path: pathlib.Path,
                     known: set[str]) -> set[str]:
  """The package's modules that `module` imports anywhere in its file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(node, module, path.name == '__init__.py')
      for alias in node.names:
        submodule = f'{base}.{alias.name}'
        found.add(submodule if submodule in known else base)
  return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
  """{module: the package's modules it imports}."""
  files = module_files()
  known = set(files)
  return {module: imported_modules(module, path, known)
          for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle as [a, b, ..., a], or [] when the graph is acyclic."""
  done, stack, on_stack = set(), [], set()

  def visit(node: str) -> list[str]:
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(graph[node]):
      if nxt in on_stack:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in done:
        cycle = visit(nxt)
        if cycle:
          return cycle
    on_stack.discard(stack.pop())
    done.add(node)
    return []

  for start in sorted(graph):
    if start not in done:
      cycle = visit(start)
      if cycle:
        return cycle
  return []


def test_graph_sees_function_level_and_submodule_imports():
  graph = import_graph()
  # Module level, `from package import submodule`:
  assert 't5x_adapt.kernels.masks' in graph['t5x_adapt.kernels.blocked']
  # Inside a function (`dot_product_attention` picks its kernel):
  assert 't5x_adapt.kernels.splash' in graph['t5x_adapt.kernels.attention']


def test_find_cycle_reports_the_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a', 'b', 'c', 'a']
  assert not find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()})


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert not cycle, 'import cycle: ' + ' -> '.join(cycle)
