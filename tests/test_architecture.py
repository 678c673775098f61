"""The import graph follows docs/architecture.md: downward only, no cycles.

Every module under mambaeye_jax/, kernels/ and configs/ is parsed (ast, so
nothing is imported) and its imports of project modules become edges. The
checks:

* no import cycle;
* no function-level import of a project module (a function-level import is
  how a cycle hides), and function-level imports of third-party modules only
  for the optional dependencies in `OPTIONAL_DEPS`;
* every edge goes from a layer to the same or a lower one (`LAYERS`), and
  the layers that must stay light never import the heavy libraries
  (`FORBIDDEN_EXTERNAL`: the data workers never import JAX);
* no module edits sys.path.

The checker is a pure function of {module: source}, so the synthetic cases
at the bottom show that it does fail.
"""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mambaeye_jax", "kernels", "configs")

# The layers, lowest first (docs/architecture.md draws them). A module may
# import modules of its own layer or of lower ones. A module belongs to the
# layer of the longest prefix that names it.
LAYERS = (
    # Plain Python used by every layer above (no project imports).
    ("base", ("mambaeye_jax.progress", "mambaeye_jax.cli", "mambaeye_jax.files")),
    ("ops", ("kernels",)),
    ("data", ("mambaeye_jax.data",)),
    ("model", ("mambaeye_jax.glimpse", "mambaeye_jax.device_augment", "mambaeye_jax.layers",
               "mambaeye_jax.ssd", "mambaeye_jax.mamba2", "mambaeye_jax.model",
               "mambaeye_jax.loss", "mambaeye_jax.mambaout")),
    ("io", ("mambaeye_jax.model_dir", "mambaeye_jax.official", "mambaeye_jax.torch_io",
            "mambaeye_jax.work_dir", "mambaeye_jax.checkpoint")),
    ("train", ("mambaeye_jax.optim", "mambaeye_jax.metrics", "mambaeye_jax.sharding",
               "mambaeye_jax.config_fields", "mambaeye_jax.train_data",
               "mambaeye_jax.train_config", "mambaeye_jax.train_step",
               "mambaeye_jax.train_checkpoint", "mambaeye_jax.train_loop",
               "mambaeye_jax.train_lib",
               "mambaeye_jax.mambaout_train")),
    ("eval", ("mambaeye_jax.eval_data", "mambaeye_jax.eval_workers", "mambaeye_jax.plots",
              "mambaeye_jax.eval_reports", "mambaeye_jax.eval_lib",
              "mambaeye_jax.eval_image")),
    # Command lines and benchmark entry points: import anything below.
    ("entry", ("mambaeye_jax", "mambaeye_jax.convert", "mambaeye_jax.bench_eval",
               "mambaeye_jax.data.bench")),
    ("configs", ("configs",)),
)

# Third-party modules a layer must never import: the data workers run
# numpy and PIL only (no JAX start-up in every worker), the kernels know
# nothing of Flax or of the project.
FORBIDDEN_EXTERNAL = {
    "ops": ("flax", "optax", "orbax", "grain", "PIL", "mambaeye_jax", "configs"),
    "data": ("jax", "flax", "optax", "orbax", "kernels"),
    "model": ("optax", "orbax", "grain"),
}

# Function-level imports allowed, third-party only: dependencies that are
# optional (extras in setup.cfg, or not installable everywhere) and heavy,
# imported where the one feature that needs them runs.
OPTIONAL_DEPS = frozenset({
    "torch",  # extra "torch": reading checkpoints without it is the default.
    "tensorflow_datasets",  # extra "tfds": only the tfds: data sources.
    "matplotlib",  # extra "plots": only the evaluator's plots.
    "tensorboardX",  # extra "tensorboard": metrics go to JSON lines without it.
    "mamba_ssm",  # the official kernels, in benchmarks beside ours only.
})

# Violations tolerated while the layout was being fixed, one (importer,
# imported) per entry; all fixed, so empty. Keep them empty: a new entry
# needs a reason in docs/architecture.md.
ALLOWED_UPWARD: frozenset[tuple[str, str]] = frozenset()
ALLOWED_LOCAL_IMPORTS: frozenset[tuple[str, str]] = frozenset()
ALLOWED_EXTERNAL: frozenset[tuple[str, str]] = frozenset()


@dataclasses.dataclass
class Graph:
  edges: dict[str, set[str]]  # project module -> project modules it imports
  local: set[tuple[str, str]]  # (module, imported) inside a function or class body
  external: dict[str, set[str]]  # module -> top-level third-party names
  sys_path_edits: set[str]


def module_sources(root: str = REPO_ROOT) -> dict[str, str]:
  """{dotted module name: source} of every module of PACKAGES."""
  sources = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for filename in filenames:
        if not filename.endswith(".py"):
          continue
        path = os.path.join(dirpath, filename)
        name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        name = name.removesuffix(".__init__")
        with open(path) as f:
          sources[name] = f.read()
  return sources


def _is_package(name: str, sources: dict[str, str]) -> bool:
  return any(other.startswith(name + ".") for other in sources)


def _targets(module: str, node: ast.Import | ast.ImportFrom,
             sources: dict[str, str]) -> list[str]:
  """The modules an import statement loads, as dotted names."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if node.level:
    parts = module.split(".")
    if not _is_package(module, sources):
      parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    base = ".".join(parts + ([node.module] if node.module else []))
  else:
    base = node.module
  # `from package import submodule` loads the submodule; otherwise the names
  # are attributes of `base`.
  submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in sources]
  return submodules or [base]


def _project_module(name: str, sources: dict[str, str]) -> str | None:
  """The longest project module that `name` starts with, or None."""
  while name:
    if name in sources:
      return name
    name = name.rpartition(".")[0]
  return None


def build_graph(sources: dict[str, str]) -> Graph:
  graph = Graph({m: set() for m in sources}, set(), {m: set() for m in sources}, set())
  for module, text in sources.items():
    tree = ast.parse(text)
    # Top-level statements (including `if`/`try` at module level) vs
    # statements inside a function or class body.
    local_nodes = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        for inner in ast.walk(node):
          if isinstance(inner, (ast.Import, ast.ImportFrom)):
            local_nodes.add(id(inner))
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr == "path" and \
          isinstance(node.value, ast.Name) and node.value.id == "sys":
        graph.sys_path_edits.add(module)
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      is_local = id(node) in local_nodes
      for target in _targets(module, node, sources):
        project = _project_module(target, sources)
        if project is None:
          top = target.split(".")[0]
          if is_local:
            graph.local.add((module, top))
          else:
            graph.external[module].add(top)
          continue
        if is_local:
          graph.local.add((module, project))
        if project != module:
          graph.edges[module].add(project)
  return graph


def layer_of(module: str) -> str:
  best, best_len = None, -1
  for layer, prefixes in LAYERS:
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
        best, best_len = layer, len(prefix)
  if best is None:
    raise ValueError(f"{module} is in no layer of LAYERS; add it")
  return best


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, result = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        result.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return result


def violations(sources: dict[str, str], allowed_upward=frozenset(),
               allowed_local=frozenset(), allowed_external=frozenset()) -> dict[str, list]:
  """Every rule broken by `sources`, by rule name (empty lists: none)."""
  graph = build_graph(sources)
  rank = {layer: i for i, (layer, _) in enumerate(LAYERS)}
  upward, external = [], []
  for module, targets in graph.edges.items():
    for target in targets:
      # Package __init__ files above a module are loaded with it; they hold
      # no code of their own (the root one resolves exports lazily).
      if module.startswith(target + "."):
        continue
      if rank[layer_of(target)] > rank[layer_of(module)] and \
          (module, target) not in allowed_upward:
        upward.append((module, target))
  for module in sources:
    forbidden = FORBIDDEN_EXTERNAL.get(layer_of(module), ())
    names = graph.external[module] | {t for m, t in graph.local if m == module}
    names |= {t.split(".")[0] for t in graph.edges[module]}
    for name in sorted(names & set(forbidden)):
      if (module, name) not in allowed_external:
        external.append((module, name))
  local = sorted((m, t) for m, t in graph.local
                 if t not in OPTIONAL_DEPS and (m, t) not in allowed_local)
  return {
      "cycles": find_cycles(graph.edges),
      "upward": sorted(upward),
      "local_imports": local,
      "forbidden_external": sorted(external),
      "sys_path_edits": sorted(graph.sys_path_edits),
  }


@pytest.fixture(scope="module")
def found():
  return violations(module_sources(), ALLOWED_UPWARD, ALLOWED_LOCAL_IMPORTS,
                    ALLOWED_EXTERNAL)


def test_every_module_has_a_layer():
  for module in module_sources():
    layer_of(module)


def test_no_import_cycle(found):
  assert found["cycles"] == []


def test_imports_point_downward(found):
  assert found["upward"] == [], "see the layers in docs/architecture.md"


def test_no_function_level_imports(found):
  assert found["local_imports"] == [], (
      "import at module level; a function-level import of a project module "
      "hides a cycle (third-party: only OPTIONAL_DEPS)")


def test_light_layers_stay_light(found):
  assert found["forbidden_external"] == []


def test_no_sys_path_edits(found):
  assert found["sys_path_edits"] == []


def test_allowlists_hold_no_stale_entries():
  # An entry that no longer matches a real import must go, so that the
  # allowlists only shrink.
  unrestricted = violations(module_sources())
  assert set(ALLOWED_UPWARD) <= set(unrestricted["upward"])
  assert set(ALLOWED_LOCAL_IMPORTS) <= set(unrestricted["local_imports"])
  assert set(ALLOWED_EXTERNAL) <= set(unrestricted["forbidden_external"])


# The checker fails where it should.


def test_checker_finds_a_cycle():
  sources = {
      "mambaeye_jax": "",
      "mambaeye_jax.model": "from mambaeye_jax import loss\n",
      "mambaeye_jax.loss": "import mambaeye_jax.model\n",
  }
  assert violations(sources)["cycles"] == [["mambaeye_jax.loss", "mambaeye_jax.model"]]


def test_checker_finds_a_function_level_import():
  sources = {
      "mambaeye_jax": "",
      "mambaeye_jax.model": "def f():\n  from mambaeye_jax import loss\n"
                            "  import torch\n  import grain\n",
      "mambaeye_jax.loss": "",
  }
  assert violations(sources)["local_imports"] == [("mambaeye_jax.model", "grain"),
                                                  ("mambaeye_jax.model", "mambaeye_jax.loss")]


def test_checker_finds_upward_and_heavy_imports():
  sources = {
      "mambaeye_jax": "",
      "mambaeye_jax.data": "",
      "mambaeye_jax.data.sources": "import jax.numpy as jnp\nfrom mambaeye_jax import model\n",
      "mambaeye_jax.model": "",
      "kernels": "",
      "kernels.ssd": "import sys\nsys.path.insert(0, '.')\n",
  }
  found = violations(sources)
  assert found["upward"] == [("mambaeye_jax.data.sources", "mambaeye_jax.model")]
  assert found["forbidden_external"] == [("mambaeye_jax.data.sources", "jax")]
  assert found["sys_path_edits"] == ["kernels.ssd"]
