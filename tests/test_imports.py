"""Imports flow one way (DESIGN.md): paths, errors → io, quant → models, data → search, export, eval → report,
workflow. The package-level import graph of vlmquant/, read with ast from the sources (imports inside functions
included), has no circle and no edge against that order. The scripts of the jobs that need no model import no torch
or transformers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# the order of DESIGN.md; a package may import its own level or any level below. The packages DESIGN.md does not
# name sit where their imports put them: compile (torch only) under quant, methods (the torch-free registry) and
# demo (demo data and sizes) beside io, spec (a run's settings: methods + quant.scheme) beside models, organism
# (the trained tiny VLM: models + export) beside export. The workflow package's modules import one way too:
# inputs ← resources, checks; joblog and jobserver import none of them (WORKFLOW_LEVELS).
LEVELS = {
    "paths": 0, "errors": 0, "compile": 0,
    "io": 1, "quant": 1, "methods": 1, "demo": 1,
    "models": 2, "data": 2, "spec": 2,
    "search": 3, "export": 3, "eval": 3, "organism": 3,
    "report": 4, "workflow": 4,
}
WORKFLOW_LEVELS = {"joblog": 0, "inputs": 0, "jobserver": 0, "resources": 1, "checks": 1}


def package_of(module):
    """'vlmquant.search.grid' → 'search'; 'vlmquant.paths' → 'paths'; the package root itself → None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "vlmquant" and len(parts) > 1 else None


def import_graph(root):
    """{package: {imported package: first 'file:line' importing it}} over every .py file under `root` (vlmquant/)."""
    graph = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        source = package_of(".".join(rel.parts))
        if source in (None, "__init__"):
            continue
        edges = graph.setdefault(source, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from vlmquant import paths` imports vlmquant.paths
                targets = [f"{node.module}.{a.name}" if node.module == "vlmquant" else node.module for a in node.names]
            else:
                continue
            for target in map(package_of, targets):
                if target not in (None, source):
                    edges.setdefault(target, f"{rel}.py:{node.lineno}")
    return graph


def cycle(graph):
    """One circle of the graph as a list of packages, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, trail + [nxt])):
                return found
        state[node] = "done"

    for node in graph:
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_graph_reader_sees_upward_imports_and_circles(tmp_path):
    pkg = tmp_path / "vlmquant"
    for name, text in {"paths.py": "", "models/stream.py": "from vlmquant.search.capture import x\n",
                       "search/capture.py": "def f():\n    from vlmquant.models import stream\n",
                       "io/atomic.py": "from vlmquant import paths, errors\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {"io": {"paths": "vlmquant/io/atomic.py:1", "errors": "vlmquant/io/atomic.py:1"}, "paths": {},
                     "models": {"search": "vlmquant/models/stream.py:1"},
                     "search": {"models": "vlmquant/search/capture.py:2"}}
    assert cycle(graph) in (["models", "search", "models"], ["search", "models", "search"])
    assert cycle({"a": {"b": ""}, "b": {}}) is None


def test_every_package_has_a_level():
    packages = {package_of(".".join(p.relative_to(REPO).with_suffix("").parts)) for p in (REPO / "vlmquant").glob("*")
                if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert packages - {"__init__"} <= set(LEVELS), "place the new package in LEVELS (and DESIGN.md's order)"


@pytest.mark.parametrize("package", sorted(LEVELS))
def test_no_upward_import(package):
    upward = {target: where for target, where in import_graph(REPO / "vlmquant").get(package, {}).items()
              if LEVELS[target] > LEVELS[package]}
    assert not upward, f"{package} (level {LEVELS[package]}) imports packages above it: {upward}"


def test_no_circle_between_packages():
    assert cycle(import_graph(REPO / "vlmquant")) is None


def test_workflow_modules_import_one_way():
    """Inside vlmquant/workflow/: a module imports only modules of a lower level (WORKFLOW_LEVELS); __init__
    re-exports them all."""
    folder = REPO / "vlmquant" / "workflow"
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert modules == set(WORKFLOW_LEVELS), "place the new module in WORKFLOW_LEVELS (and DESIGN.md's order)"
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {node.module.split(".")[2] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module and node.module.startswith("vlmquant.workflow.")}
        assert all(WORKFLOW_LEVELS[m] < WORKFLOW_LEVELS[name] for m in imported), (name, imported)


# What each light script's imports (the lines above its `with script_logging`) may not load: these jobs start in
# well under a second instead of the ~5 CPU seconds of torch + transformers.modeling_utils (issue 30).
LIGHT_SCRIPTS = {
    "calib": ("torch", "transformers", "pandas", "matplotlib"),
    "demo_data": ("torch", "transformers", "pandas"),
    "summary": ("torch", "transformers", "matplotlib"),
    "plots": ("torch", "transformers"),
    "merge": ("transformers", "pandas", "matplotlib"),
    "lmms_eval": ("torch", "transformers", "pandas"),
}


def script_imports(name):
    """The import statements of scripts/<name>.py, in order."""
    tree = ast.parse((REPO / "scripts" / f"{name}.py").read_text())
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("name", sorted(LIGHT_SCRIPTS))
def test_light_scripts_import_no_heavy_module(name):
    code = "; ".join([*script_imports(name), "import sys", f"print(sorted(m for m in {LIGHT_SCRIPTS[name]!r} "
                                                            "if m in sys.modules))"])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", f"scripts/{name}.py imports {res.stdout.strip()}"


def test_the_import_check_sees_a_heavy_module():
    code = "; ".join([*script_imports("merge"), "import sys", "print('torch' in sys.modules)"])
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout == "True\n"


def test_loading_the_workflow_imports_no_heavy_module():
    """The module-level imports of the Snakefile and rules/*.smk, which every snakemake call (a dry run, a no-op
    rerun) runs before any job, load no torch, transformers or pandas (torch alone costs ~1.5 s there)."""
    lines = [line for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
             for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert any("vlmquant" in line for line in lines)
    code = "; ".join([*(line.split("#")[0].strip() for line in lines), "import sys",
                      "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))"])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", f"loading the workflow imports {res.stdout.strip()}"
