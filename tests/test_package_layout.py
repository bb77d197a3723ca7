"""Package layout (issue 14, item 7): no import cycle among part_distill.engine modules (lazy imports
included), engine and the library never import the drivers, benchmark code lives in benchmarks/."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "part_distill"


def _imports(path):
    """Absolute names of the part_distill modules ``path`` imports anywhere in it (lazy ones too)."""
    module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n for n in out if n.startswith("part_distill")}


def test_engine_modules_form_no_import_cycle():
    modules = {f"part_distill.engine.{p.stem}": p for p in (PKG / "engine").glob("*.py") if p.stem != "__init__"}
    graph = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
    # The cycle that was there: stages <-> one_stage / supervised.
    assert "part_distill.engine.stages" not in graph["part_distill.engine.one_stage"]
    assert "part_distill.engine.stages" not in graph["part_distill.engine.supervised"]


def test_library_does_not_import_drivers_and_benchmarks_moved():
    for path in PKG.rglob("*.py"):
        if path.parts[len(PKG.parts)] in ("drivers", "benchmarks"):
            continue
        bad = {n for n in _imports(path) if n.startswith(("part_distill.drivers", "part_distill.benchmarks"))}
        assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"
    assert not list(PKG.glob("*/benchmark*.py")), "benchmark code belongs in part_distill/benchmarks"
    assert {p.stem for p in (PKG / "drivers").glob("*.py")} >= {
        "demo", "pipeline", "few_shot_table", "zero_shot", "part_awareness_lab", "learning_ablation"}
