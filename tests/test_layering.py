"""House rules of the encoder_jax package, checked statically with `ast` (nothing is imported).

Rules: no import cycles (lazy imports inside functions count), imports point only down the
LAYERS table below, task modules do not import each other, the library never imports
experiments/tests/benchmarks, modules stay under 400 lines and functions under 80.

The checkers are small pure functions (module_imports, find_cycles, layer_violations,
task_cross_imports, forbidden_imports, oversized_modules, long_functions); the tests after
them run each rule on the real package, and the self-tests at the end run the checkers
on synthetic graphs and on temporary packages to show they do fail when a rule is broken.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
from typing import Iterable, Mapping, NamedTuple

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "encoder_jax"
FORBIDDEN = ("experiments", "tests", "benchmarks")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# A module may import modules of its own layer and of the layers below it, never above.
#
#   launch.py                                     (outside the package: imports anything)
#       |
#   8   api                                       (the public front door: may use anything)
#       |
#   7   search   export   serve
#       |
#   6   train
#       |
#   5   interop   tasks.*   monitor   step        (tasks.* import tasks.base, not each other)
#       |
#   4   pretrained
#       |
#   3   workdir   reporting   artifact   serve_engine   serve_app
#       |
#   2   data.*  optim  parallel  checkpoint  hf_bert  metrics  decode  losses  batcher  hub  preemption
#       serve_metrics  budget  baselines  static_embeddings  encoder_jax (__init__)
#       |
#   1   models   seq2seq
#       |
#   0   layers   configs   errors   wide   topk
#
# A module's rank is that of the longest entry equal to it or a dotted prefix of it
# ("encoder_jax.data" covers "encoder_jax.data.tokenizer"); an entry without a dot (the
# package's own __init__) covers only itself, so a new top-level module is unranked.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("encoder_jax.layers", "encoder_jax.decoder_block", "encoder_jax.dropout", "encoder_jax.configs", "encoder_jax.config_types", "encoder_jax.errors",
        "encoder_jax.wide", "encoder_jax.topk"),
    1: ("encoder_jax.models", "encoder_jax.seq2seq", "encoder_jax.topic_models", "encoder_jax.electra"),
    2: ("encoder_jax.data", "encoder_jax.optim", "encoder_jax.parallel", "encoder_jax.checkpoint",
        "encoder_jax.hf_bert", "encoder_jax.metrics", "encoder_jax.decode", "encoder_jax.losses", "encoder_jax.batcher", "encoder_jax.hub",
        "encoder_jax.preemption", "encoder_jax.gmm", "encoder_jax.clustering", "encoder_jax.embeddings",
        "encoder_jax.serve_metrics", "encoder_jax.budget", "encoder_jax.baselines", "encoder_jax.static_embeddings",
        "encoder_jax"),
    3: ("encoder_jax.workdir", "encoder_jax.reporting", "encoder_jax.artifact",
        "encoder_jax.serve_engine", "encoder_jax.serve_app"),
    4: ("encoder_jax.pretrained",),
    5: ("encoder_jax.interop", "encoder_jax.tasks", "encoder_jax.monitor", "encoder_jax.step"),
    6: ("encoder_jax.train",),
    7: ("encoder_jax.search", "encoder_jax.export", "encoder_jax.serve"),
    8: ("encoder_jax.api",),
}
TASKS_PACKAGE = "encoder_jax.tasks"
TASKS_SHARED = ("encoder_jax.tasks.base",)


# ----------------------------------------------------------------------------- import graph

class ImportSite(NamedTuple):
    module: str   # importing module, e.g. "encoder_jax.tasks.mlm"
    target: str   # a module of the package, or a top-level name outside it ("jax", "experiments")
    line: int
    lazy: bool    # inside a function: runs on call, not on import


def package_modules(package_dir) -> dict[str, pathlib.Path]:
    """{"pkg.sub.mod": path} for every .py under package_dir; "pkg/sub/__init__.py" is "pkg.sub"."""
    package_dir = pathlib.Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Mapping[str, object], root: str) -> str:
    """A dotted name as the longest existing module of the package, or its top-level name outside."""
    if name.split(".")[0] != root:
        return name.split(".")[0]
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: Mapping[str, object], root: str):
        self.module, self.is_package, self.modules, self.root = module, is_package, modules, root
        self.depth = 0
        self.sites: set[ImportSite] = set()

    def _add(self, name: str, node: ast.AST) -> None:
        target = _resolve(name, self.modules, self.root)
        self.sites.add(ImportSite(self.module, target, node.lineno, self.depth > 0))

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".")
            if not self.is_package:
                package = package[:-1]
            keep = len(package) - (node.level - 1)
            if keep <= 0:
                raise ValueError(f"{self.module} line {node.lineno}: relative import beyond the package")
            base = ".".join(package[:keep] + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            is_module = base.split(".")[0] == self.root and submodule in self.modules
            self._add(submodule if is_module else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("literal") / __import__("literal"): a dynamic import of a known name
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value and not node.args[0].value.startswith(".")):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def import_sites(package_dir) -> list[ImportSite]:
    """Every import of every module, module-level and inside functions, with its line."""
    package_dir = pathlib.Path(package_dir)
    modules = package_modules(package_dir)
    sites: set[ImportSite] = set()
    for module, path in modules.items():
        visitor = _ImportVisitor(module, path.name == "__init__.py", modules, package_dir.name)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        sites |= visitor.sites
    return sorted(sites)


def module_imports(package_dir) -> dict[str, set[str]]:
    """{module: {imported module of the package, or top-level external name}} for every module."""
    graph: dict[str, set[str]] = {module: set() for module in package_modules(package_dir)}
    for site in import_sites(package_dir):
        graph[site.module].add(site.target)
    return graph


def import_locations(sites: Iterable[ImportSite]) -> dict[tuple[str, str], str]:
    """{(module, target): "line 12, line 40 (lazy)"}: where each edge of the graph comes from."""
    lines: dict[tuple[str, str], list[str]] = {}
    for site in sorted(sites):
        lines.setdefault((site.module, site.target), []).append(
            f"line {site.line}" + (" (lazy)" if site.lazy else ""))
    return {edge: ", ".join(found) for edge, found in lines.items()}


def _at(where: Mapping[tuple[str, str], str] | None, module: str, target: str) -> str:
    found = (where or {}).get((module, target))
    return f"  [{found}]" if found else ""


# ----------------------------------------------------------------------------- checkers

def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules importing themselves.

    Edges to names that are not keys of graph (external packages) are ignored. Each cycle is
    sorted and the list of cycles is sorted, whatever the order of graph."""
    succ = {v: sorted(w for w in set(graph[v]) if w in graph) for v in graph}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def enter(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)

    for start in sorted(graph):   # iterative Tarjan: no recursion limit on deep graphs
        if start in index:
            continue
        enter(start)
        work = [(start, iter(succ[start]))]
        while work:
            v, successors = work[-1]
            for w in successors:
                if w not in index:
                    enter(w)
                    work.append((w, iter(succ[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in succ[v]:
                        cycles.append(sorted(component))
    return sorted(cycles)


def describe_cycles(graph: Mapping[str, Iterable[str]], cycles: list[list[str]],
                    where: Mapping[tuple[str, str], str] | None = None) -> list[str]:
    """One line per cycle, then one indented line per import inside it (the edges to cut)."""
    lines = []
    for cycle in cycles:
        members = set(cycle)
        lines.append("cycle: " + " <-> ".join(cycle))
        for module in cycle:
            for target in sorted(set(graph[module]) & members):
                lines.append(f"    {module} -> {target}{_at(where, module, target)}")
    return lines


def layer_rank(module: str, layers: Mapping[int, Iterable[str]]) -> int | None:
    """Rank of the longest LAYERS entry equal to module or a dotted prefix of it (see LAYERS)."""
    best, rank = -1, None
    for layer, names in layers.items():
        for name in names:
            covers = module == name or ("." in name and module.startswith(name + "."))
            if covers and len(name) > best:
                best, rank = len(name), layer
    return rank


def layer_violations(graph: Mapping[str, Iterable[str]], layers: Mapping[int, Iterable[str]],
                     where: Mapping[tuple[str, str], str] | None = None) -> list[str]:
    """Imports of a higher layer than the importer's, and modules of the package without a layer."""
    roots = {module.split(".")[0] for module in graph}
    problems: list[str] = []
    unranked: set[str] = set()

    def flag_unranked(module: str) -> None:
        if module not in unranked:
            unranked.add(module)
            problems.append(f"unranked module {module}: place it in LAYERS")

    for module in sorted(graph):
        rank = layer_rank(module, layers)
        if rank is None:
            flag_unranked(module)
            continue
        for target in sorted(set(graph[module])):
            if target.split(".")[0] not in roots:
                continue   # outside the package
            target_rank = layer_rank(target, layers)
            if target_rank is None:
                flag_unranked(target)
            elif target_rank > rank:
                problems.append(f"{module} (layer {rank}) imports {target} (layer {target_rank})"
                                f"{_at(where, module, target)}")
    return problems


def task_cross_imports(graph: Mapping[str, Iterable[str]], tasks: str = TASKS_PACKAGE,
                       shared: Iterable[str] = TASKS_SHARED,
                       where: Mapping[tuple[str, str], str] | None = None) -> list[str]:
    """Imports from one task module (tasks.<name>[.*]) of another; tasks.base and tasks itself are fine."""
    shared = tuple(shared)

    def task_of(name: str) -> str:
        return name[len(tasks) + 1:].split(".")[0]

    problems = []
    for module in sorted(graph):
        if not module.startswith(tasks + "."):
            continue
        for target in sorted(set(graph[module])):
            if (not target.startswith(tasks + ".")
                    or any(target == s or target.startswith(s + ".") for s in shared)
                    or task_of(target) == task_of(module)):
                continue
            problems.append(f"{module} imports sibling task {target}{_at(where, module, target)}")
    return problems


def forbidden_imports(graph: Mapping[str, Iterable[str]], forbidden: Iterable[str] = FORBIDDEN,
                      where: Mapping[tuple[str, str], str] | None = None) -> list[str]:
    """Imports by the library of the top-level packages it must never depend on."""
    forbidden = set(forbidden)
    return [f"{module} imports {target}{_at(where, module, target)}"
            for module in sorted(graph) for target in sorted(set(graph[module]))
            if target.split(".")[0] in forbidden]


def oversized_modules(package_dir, max_lines: int = MAX_MODULE_LINES) -> list[str]:
    """Modules over max_lines lines, largest first."""
    sizes = [(len(path.read_text(encoding="utf-8").splitlines()), module)
             for module, path in package_modules(package_dir).items()]
    return [f"module {module}: {n} lines (limit {max_lines})"
            for n, module in sorted(sizes, key=lambda s: (-s[0], s[1])) if n > max_lines]


def function_sizes(package_dir) -> list[tuple[str, int]]:
    """(qualified name, end_lineno - lineno + 1) of every function and method; nested ones too."""
    sizes = []

    class Visitor(ast.NodeVisitor):
        def __init__(self, prefix: str):
            self.prefix = [prefix]

        def _scope(self, node, is_function: bool) -> None:
            self.prefix.append(node.name)
            if is_function:
                sizes.append((".".join(self.prefix), node.end_lineno - node.lineno + 1))
            self.generic_visit(node)
            self.prefix.pop()

        def visit_ClassDef(self, node):
            self._scope(node, False)

        def visit_FunctionDef(self, node):
            self._scope(node, True)

        visit_AsyncFunctionDef = visit_FunctionDef

    for module, path in package_modules(package_dir).items():
        Visitor(module).visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return sizes


def long_functions(package_dir, max_lines: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions and methods over max_lines lines, longest first."""
    return [f"function {name}: {n} lines (limit {max_lines})"
            for name, n in sorted(function_sizes(package_dir), key=lambda s: (-s[1], s[0]))
            if n > max_lines]


# ----------------------------------------------------------------------------- the real package

def _fail(title: str, offenders: list[str], count: int | None = None) -> None:
    """Fails with the title, the number of offenders and every offender on its own line."""
    if offenders:
        pytest.fail(f"{title} ({len(offenders) if count is None else count}):\n" + "\n".join(f"  {o}" for o in offenders),
                    pytrace=False)


@pytest.fixture(scope="module")
def sites():
    return import_sites(PACKAGE_DIR)


@pytest.fixture(scope="module")
def graph():
    return module_imports(PACKAGE_DIR)


@pytest.fixture(scope="module")
def where(sites):
    return import_locations(sites)


def test_layers_table_is_well_formed():
    names = [name for layer in LAYERS.values() for name in layer]
    assert sorted(LAYERS) == list(range(len(LAYERS)))
    assert len(names) == len(set(names)), "a module is in two layers"
    assert all(name == "encoder_jax" or name.startswith("encoder_jax.") for name in names)


def test_no_import_cycles(graph, where):
    cycles = find_cycles(graph)
    _fail("import cycles (module-level and lazy imports; the imports inside each are listed)",
          describe_cycles(graph, cycles, where), count=len(cycles))


def test_layers_import_only_downwards(graph, where):
    problems = layer_violations(graph, LAYERS, where)
    if problems:
        missing = [name for layer in LAYERS.values() for name in layer
                   if not any(m == name or m.startswith(name + ".") for m in graph)]
        if missing:
            problems.append("(note: LAYERS entries with no module yet: " + ", ".join(missing) + ")")
    _fail("imports against the layering (a module may import only its own layer or lower)",
          problems)


def test_tasks_do_not_import_each_other(graph, where):
    _fail("task modules importing each other (share code through encoder_jax.tasks.base)",
          task_cross_imports(graph, where=where))


def test_library_never_imports_experiments_tests_benchmarks(graph, where):
    _fail("library imports of experiments/tests/benchmarks", forbidden_imports(graph, where=where))


def test_module_and_function_sizes():
    _fail(f"modules over {MAX_MODULE_LINES} lines / functions over {MAX_FUNCTION_LINES} lines",
          oversized_modules(PACKAGE_DIR) + long_functions(PACKAGE_DIR))


# ----------------------------------------------------------------------------- self-tests

def write_package(root: pathlib.Path, files: Mapping[str, str], name: str = "pkg") -> pathlib.Path:
    """Writes {"sub/mod.py": source} under root/name (an empty __init__.py in every folder)."""
    package = root / name
    for relative, source in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return package


def test_module_imports_resolves_every_form(tmp_path):
    package = write_package(tmp_path, {
        "core.py": "",
        "sub/__init__.py": "from . import leaf\nfrom .leaf import thing\n",
        "sub/leaf.py": """
            import numpy as np
            import jax.numpy as jnp
            from pkg import core, VERSION
            from pkg.sub import leaf as t
            from .. import core as c
            from ..core import helper
            from . import other
            """,
        "sub/other.py": """
            def later():
                import pkg.sub.leaf
                from experiments.foo import bar
                import importlib
                return importlib.import_module("benchmarks.step")
            """,
    })
    graph = module_imports(package)
    assert set(graph) == {"pkg", "pkg.core", "pkg.sub", "pkg.sub.leaf", "pkg.sub.other"}
    assert graph["pkg"] == set() and graph["pkg.core"] == set()
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    # `from pkg import VERSION`: not a module, so the package; `from . import other`: the sibling
    assert graph["pkg.sub.leaf"] == {"numpy", "jax", "pkg", "pkg.core", "pkg.sub.leaf", "pkg.sub.other"}
    assert graph["pkg.sub.other"] == {"pkg.sub.leaf", "experiments", "importlib", "benchmarks"}
    lazy = {(s.target, s.lazy) for s in import_sites(package) if s.module == "pkg.sub.other"}
    assert ("pkg.sub.leaf", True) in lazy and ("experiments", True) in lazy


def test_find_cycles_on_synthetic_graph():
    edges = {"a": {"b", "numpy"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"},
             "f": {"f"}, "g": {"a"}, "h": set()}
    expected = [["a", "b", "c"], ["d", "e"], ["f"]]
    assert find_cycles(edges) == expected
    assert find_cycles(dict(reversed(list(edges.items())))) == expected
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    chain = {f"m{i:04d}": {f"m{i + 1:04d}"} for i in range(3000)}   # deep: no recursion limit
    chain["m3000"] = {"m0000"}
    assert find_cycles(chain) == [sorted(chain)]
    assert describe_cycles(edges, [["d", "e"]], {("d", "e"): "line 3 (lazy)"}) == [
        "cycle: d <-> e", "    d -> e  [line 3 (lazy)]", "    e -> d"]


def test_find_cycles_sees_a_cycle_through_a_lazy_import(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from pkg import b\n",
        "b.py": "def use():\n    from pkg.a import something\n    return something\n",
        "c.py": "from pkg import a\n",
    })
    graph = module_imports(package)
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
    lines = describe_cycles(graph, find_cycles(graph), import_locations(import_sites(package)))
    assert "    pkg.b -> pkg.a  [line 2 (lazy)]" in lines


LAYERS_FOR_TEST = {0: ("pkg.low",), 1: ("pkg.mid", "pkg"), 2: ("pkg.high",)}


def test_layer_violations_flags_an_upward_import():
    graph = {"pkg.low": {"pkg.mid", "numpy"}, "pkg.mid": {"pkg.low", "pkg.mid.x"},
             "pkg.mid.x": {"pkg.high"}, "pkg.high": {"pkg.low", "pkg"}, "pkg": set()}
    assert layer_violations(graph, LAYERS_FOR_TEST) == [
        "pkg.low (layer 0) imports pkg.mid (layer 1)",
        "pkg.mid.x (layer 1) imports pkg.high (layer 2)",
    ]
    assert layer_violations({"pkg.high": {"pkg.low"}, "pkg.low": set()}, LAYERS_FOR_TEST) == []


def test_layer_violations_flags_an_unranked_module_and_uses_the_longest_prefix():
    graph = {"pkg.low": set(), "pkg.stray": {"pkg.low"}, "pkg.high": {"pkg.other"}}
    assert layer_violations(graph, LAYERS_FOR_TEST) == [
        "unranked module pkg.other: place it in LAYERS",
        "unranked module pkg.stray: place it in LAYERS",
    ]
    layers = {0: ("pkg.data.special",), 2: ("pkg.data",), 1: ("pkg",)}
    assert layer_rank("pkg.data.special.x", layers) == 0
    assert layer_rank("pkg.data.tokenizer", layers) == 2
    assert layer_rank("pkg", layers) == 1
    assert layer_rank("pkg.new_module", layers) is None   # the package entry covers only __init__
    assert layer_rank("pkg.database", layers) is None     # a prefix of dotted parts, not of letters


def test_layer_violations_on_a_temporary_package(tmp_path):
    package = write_package(tmp_path, {"low.py": "def f():\n    from pkg import high\n",
                                       "high.py": "", "mid/__init__.py": "", "mid/x.py": ""})
    assert layer_violations(module_imports(package), LAYERS_FOR_TEST) == [
        "pkg.low (layer 0) imports pkg.high (layer 2)"]


def test_task_cross_imports_flags_a_sibling_task():
    graph = {"p.tasks": {"p.tasks.mlm"},
             "p.tasks.base": set(),
             "p.tasks.mlm": {"p.tasks", "p.tasks.base", "p.models"},
             "p.tasks.classify": {"p.tasks.base", "p.tasks.mlm"},
             "p.tasks.ner": {"p.tasks.ner.heads"}, "p.tasks.ner.heads": {"p.tasks.ner"}}
    assert task_cross_imports(graph, tasks="p.tasks", shared=("p.tasks.base",)) == [
        "p.tasks.classify imports sibling task p.tasks.mlm"]
    assert task_cross_imports({"encoder_jax.tasks.classify": {"encoder_jax.tasks.mlm"}}) == [
        "encoder_jax.tasks.classify imports sibling task encoder_jax.tasks.mlm"]


def test_forbidden_imports_flags_experiments_tests_benchmarks(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "import experiments.foo\nimport experimental\n",
        "b.py": "def f():\n    from tests import helpers\n",
        "c.py": "import importlib\nimportlib.import_module('benchmarks.step')\n",
        "d.py": "from pkg import tests\n",   # a module of the package named tests is fine
        "tests.py": "",
    })
    assert forbidden_imports(module_imports(package)) == [
        "pkg.a imports experiments", "pkg.b imports tests", "pkg.c imports benchmarks"]


def test_size_checkers_flag_a_long_function_and_a_long_module(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(8))
    body8 = "".join(f"        x{i} = {i}\n" for i in range(8))
    package = write_package(tmp_path, {
        "m.py": ("def short():\n    return 1\n\n"
                 "def outer():\n" + body + "    def inner():\n" + body8 + "        return 1\n"
                 "    return inner\n\n"
                 "class K:\n    async def method(self):\n" + body8 + "        return 1\n"),
        "small.py": "x = 1\n",
    })
    sizes = dict(function_sizes(package))
    assert sizes["pkg.m.short"] == 2 and sizes["pkg.m.outer.inner"] == 10
    assert sizes["pkg.m.outer"] == 20 and sizes["pkg.m.K.method"] == 10
    assert long_functions(package, max_lines=9) == [
        "function pkg.m.outer: 20 lines (limit 9)",
        "function pkg.m.K.method: 10 lines (limit 9)",
        "function pkg.m.outer.inner: 10 lines (limit 9)",
    ]
    assert long_functions(package, max_lines=20) == []
    assert oversized_modules(package, max_lines=5) == ["module pkg.m: 35 lines (limit 5)"]
    assert oversized_modules(package, max_lines=35) == []
