"""The wings of docs/architecture.md: each imports only from its own wing and the wings below it (imports inside
functions count), no module imports itself back through others, and the top of the package holds only what a
user touches."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "detrax"
# from the bottom; `errors` (the exceptions a user catches) is read by every wing
WINGS = ["errors", "config", "models", "criterion", "data", "weights", "serving", "evaluation", "training", "top"]
TOP = {"__init__", "__main__", "api", "cli", "commands", "errors"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC).with_suffix("").parts): p for p in SRC.rglob("*.py")}


def _wing(module: str) -> str:
    head = module.split(".")[0]
    if head == "errors":
        return "errors"
    if head in TOP:
        return "top"
    assert head in WINGS, f"detrax.{module} is in no wing: add its wing here and to docs/architecture.md"
    return head


def _imports(path: Path, modules) -> set[str]:
    """The detrax modules that `path` imports (a package's name counts as its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "detrax":
            base = node.module.removeprefix("detrax").lstrip(".")
            names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
            names = [n if n in modules or f"{n}.__init__" in modules else base for n in names]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("detrax.") for a in node.names if a.name.startswith("detrax.")]
        for name in names:
            found.add(name if name in modules else f"{name}.__init__".lstrip("."))
    return found


def test_the_top_holds_only_what_a_user_touches():
    top = {p.stem for p in SRC.glob("*.py")}
    assert top <= TOP, f"modules at the top of detrax that belong in a wing: {sorted(top - TOP)}"


def test_no_module_imports_a_wing_above_its_own():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        mine = WINGS.index(_wing(module))
        for target in _imports(path, modules):
            if WINGS.index(_wing(target)) > mine:
                wrong.append(f"{module} ({WINGS[mine]}) imports {target} ({_wing(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m, "__init__"} for m, p in modules.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m, trail):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                circles.append(" -> ".join([*trail[trail.index(n):], n]))
            elif n not in state:
                visit(n, [*trail, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_the_map_names_every_module_and_wing():
    """docs/architecture.md names every module (as `wing/module` or by its name) and every wing in its table."""
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    missing = [m for m in _modules() if not m.endswith("__init__") and f"`{m.split('.')[-1]}`" not in doc
               and f"{m.replace('.', '/')}" not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"
    assert all(f"| `{w}" in doc for w in WINGS if w not in ("top", "errors")), "a wing is missing from the table"
