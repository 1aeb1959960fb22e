"""The import contract: first-party modules form layers, launcher -> tools -> train -> tasks -> losses -> model/data
-> config/io, and a module imports only from its own layer or the ones below; no two modules import each other,
directly or round a cycle. Every import counts, at the top of a file, inside a function or under TYPE_CHECKING: an
import moved into a function still ties the two modules together, it only hides the cycle until the function runs."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Highest layer first. A module belongs to the first layer with a prefix that names it or a package above it (the
# longest prefix wins, so a module can sit below its package's layer).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("launcher", ("launcher",)),
    ("tools", ("ftcore.export", "ftcore.tools.plan", "ftcore.tools.generate", "ftcore.evaluation.command")),
    ("train", ("ftcore.train",)),
    # One module per task (ftcore/tasks/); the recipe, evaluation, plan and export ask the run's task.
    ("tasks", ("ftcore.tasks",)),
    # The objectives the tasks build, and the chunked head that computes them.
    ("losses", ("ftcore.losses",)),
    ("model/data", ("ftcore.data", "ftcore.model", "ftcore.model_files", "ftcore.model_geometry", "ftcore.builtin",
                    "ftcore.gguf_base", "ftcore.preflight", "ftcore.checkpoint", "ftcore.resume", "ftcore.ds_config",
                    "ftcore.launch_settings", "ftcore.metrics", "ftcore.tracking", "ftcore.evaluation.generation",
                    "ftcore.evaluation.scoring", "ftcore.rewards", "ftcore.sampling", "ftcore.nf4", "ftcore.assets")),
    # ftcore.tools.plot only reads metrics.jsonl (the run draws its curves at the end, `ft plot` on demand);
    # ftcore.export.st_io is the safetensors reader/writer the model files and the export both use; the tasks'
    # registry (ftcore/tasks/__init__.py) imports nothing first-party, so config validation can ask the run's task;
    # ftcore.errors is the run's error type, raised from the losses up.
    ("config/io", ("ftcore", "ftcore.config", "ftcore.durable", "ftcore.dtypes", "ftcore.quiet", "ftcore.dist_env",
                   "ftcore.preemption", "ftcore.tools.plot", "ftcore.cache", "ftcore.run_dir", "ftcore.export.st_io",
                   "ftcore.errors")),
]
# A package's own __init__ that sits in another layer than its modules.
PACKAGE_LAYERS = {"ftcore.tasks": "config/io"}
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}  # 0 = highest


def first_party_modules() -> dict[str, Path]:
    modules = {}
    for package in ("ftcore", "launcher"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def layer_of(module: str) -> str:
    if module in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[module]
    best = max(((prefix, name) for name, prefixes in LAYERS for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=lambda pair: len(pair[0]))
    return best[1]


def owning_module(name: str, modules: dict[str, Path]) -> str:
    """The first-party module an imported name is or lives in ("" for a third-party name)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The first-party modules `module` imports anywhere in its file (a name imported from a package counts as
    its submodule when it is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {owning_module(name, modules) for name in names}
    return found - {"", module}


def import_graph() -> dict[str, set[str]]:
    modules = first_party_modules()
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def test_every_module_has_a_layer():
    for module in first_party_modules():
        assert layer_of(module), f"{module}: add it to a layer in tests/test_layering.py"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
                  for module, targets in graph.items() for target in targets
                  if RANK[layer_of(target)] < RANK[layer_of(module)])


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: each component of more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_from_a_layer_above_its_own():
    upward = upward_imports(import_graph())
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_contract_sees_an_upward_import_and_the_cycle_it_closes():
    """The checks can fail: the model module importing the recipe (which imports it) is both."""
    graph = import_graph()
    graph["ftcore.model"] = graph["ftcore.model"] | {"ftcore.train.recipe"}
    assert upward_imports(graph) == ["ftcore.model (model/data) imports ftcore.train.recipe (train)"]
    assert any({"ftcore.model", "ftcore.train.recipe"} <= set(cycle) for cycle in import_cycles(graph))


def top_level_imports(path: Path) -> list[str]:
    """What a file imports when it is imported: its top-level statements, not functions or TYPE_CHECKING."""
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def torch_free_modules() -> set[str]:
    """First-party modules whose import does not import torch, directly or through what they import at the top."""
    modules = first_party_modules()
    edges: dict[str, set[str]] = {}
    direct_torch = set()
    for module, path in modules.items():
        names = top_level_imports(path)
        direct_torch.update([module] if any(n == "torch" or n.startswith("torch.") for n in names) else [])
        targets = {owning_module(name, modules) for name in names} - {"", module}
        parent = module.rpartition(".")[0]  # importing a submodule runs its package's __init__ first
        if parent in modules:
            targets.add(parent)
        edges[module] = targets
    heavy = set(direct_torch)
    while True:
        more = {m for m, targets in edges.items() if m not in heavy and targets & heavy}
        if not more:
            return set(modules) - heavy
        heavy |= more


def test_first_party_imports_sit_at_the_top_unless_the_module_stays_torch_free():
    """An import inside a function hides a dependency; the one reason kept is a module that must import without
    torch (the CLI's commands, config, preflight, plan, GGUF reading), whose heavy work imports on use."""
    modules = first_party_modules()
    light = torch_free_modules()
    hidden = []
    for module, path in modules.items():
        if module in light:
            continue
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.relative_to(ROOT)}:{node.lineno} ({function.name}) imports {node.module}"
                           for node in ast.walk(function) if isinstance(node, ast.ImportFrom)
                           and (node.module or "").split(".")[0] in ("ftcore", "launcher")]
    assert not hidden, "move to the top of the file:\n" + "\n".join(hidden)


def test_the_command_line_and_the_config_import_without_torch():
    light = torch_free_modules()
    for module in ("launcher.cli", "launcher.app", "launcher.run_commands", "launcher.tool_commands",
                   "ftcore.config", "ftcore.preflight", "ftcore.tools.plan", "ftcore.gguf_base", "ftcore.builtin"):
        assert module in light, f"{module} imports torch when imported"


def test_a_run_directory_file_is_named_only_by_run_dir():
    """ftcore/run_dir.py spells the run directory's layout; elsewhere a path into a run asks RunDir for it."""
    import re

    from ftcore.run_dir import RunDir

    run = RunDir("/run")
    names = sorted({getattr(run, attr).name for attr in dir(RunDir)
                    if isinstance(getattr(RunDir, attr), property)})
    joined = re.compile(r"/\s*[\"'](" + "|".join(re.escape(n) for n in names) + r")[\"']")
    spelled = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
               for module, path in first_party_modules().items() if module != "ftcore.run_dir"
               for number, line in enumerate(path.read_text().splitlines(), start=1) if joined.search(line)]
    assert not spelled, "use RunDir:\n" + "\n".join(spelled)
    assert {"checkpoints", "final", "metrics.jsonl", "config.yaml", "logs"} <= set(names)
