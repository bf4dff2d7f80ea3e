"""The package's imports point one way: down (DESIGN.md, "Layers")."""

import ast
import os


PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "alignax")

# Lower rank = lower layer. A module may import its own rank or lower; a
# sibling of the same rank must not close a cycle (checked separately).
LAYERS = (
    # bottom: arrays and infrastructure, no run config
    ("losses", "models", "policy", "sharding", "checkpoint", "metrics",
     "interop", "interop.hf_config", "cli", "rewards"),
    ("data",),
    ("state",),
    ("step", "interop.hf", "interop.peft"),
    ("init_from",),
    ("objectives", "retrieval", "rollout"),
    ("reference", "defaults", "decorrelation"),
    ("train",),
    # commands: may import anything
    ("onpolicy", "mine", "aot", "generate", "rl", "curriculum", "grace",
     "dpa", "pareto"),
)


def _modules():
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(directory, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
        name = rel.replace(os.sep, ".").removesuffix(".__init__")
        out[name] = path
  return out


def _resolve(name, modules):
  while name not in modules:
    name = name.rpartition(".")[0]
  return name


def _imports(path, modules):
  """Every ``alignax`` module ``path`` imports, at any depth of its code."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    found |= {_resolve(n, modules) for n in names if n.startswith("alignax")}
  return found


def _rank(module):
  """Rank of the longest matching layer prefix (``data.tasks`` -> data)."""
  short = module.removeprefix("alignax").lstrip(".")
  best = None
  for rank, layer in enumerate(LAYERS):
    for prefix in layer:
      if short == prefix or short.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (rank, len(prefix))
  return None if best is None else best[0]


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _upward(graph):
  return [(m, d) for m, deps in graph.items() if m != "alignax"
          for d in deps if _rank(d) > _rank(m)]


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        return stack + [m, d]
      if d not in state:
        found = visit(d, stack + [m])
        if found:
          return found
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m, [])
      if found:
        return found
  return None


def test_every_module_has_a_layer():
  unplaced = [m for m in _graph() if m != "alignax" and _rank(m) is None]
  assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_imports_point_down():
  assert not _upward(_graph()), "imports that point up"


def test_nothing_below_train_imports_train():
  graph = _graph()
  train_rank = _rank("alignax.train")
  users = [m for m, deps in graph.items() if "alignax.train" in deps
           and _rank(m) <= train_rank]
  assert not users


def test_no_import_cycle():
  assert _cycle(_graph()) is None


def test_the_checks_can_fail():
  # The circle issue 10 found: data -> train -> objectives -> data.
  graph = {"alignax.data.reference_cache": {"alignax.train"},
           "alignax.train": {"alignax.objectives.preference"},
           "alignax.objectives.preference": {"alignax.data.reference_cache"}}
  assert _upward(graph) == [("alignax.data.reference_cache", "alignax.train")]
  assert _cycle(graph)[0] == _cycle(graph)[-1] == "alignax.data.reference_cache"
