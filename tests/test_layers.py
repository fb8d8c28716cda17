"""Imports point down: each module of t3d imports only from its own layer or the layers below it.

The layers (docs/architecture.md): the core (store, stage contract, optimizer state, backend
choice) at the bottom; then the building blocks, each using only those before it; then the
stages, the runner, the flows and the CLI. Imports inside functions count; imports under
`if TYPE_CHECKING:` (names for type checkers only) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"t3d": "t3d", "stages": "t3d.stages", "flows": "t3d.flows", "cli": "t3d.cli", "priors": "t3d.priors"}
LAYERS = [
    ["t3d", "t3d.slug", "t3d.store", "t3d.optim", "t3d.backends", "t3d.stage"],
    ["t3d.render"],
    ["t3d.fields"],
    ["t3d.toy"],
    ["t3d.priors"],
    ["t3d.guidance"],
    ["t3d.mesh"],
    ["t3d.stages"],
    ["t3d.runner"],
    ["t3d.flows"],
    ["t3d.cli"],
]


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            out[".".join(p for p in parts if p != "__init__")] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n == "t3d" or n.startswith("t3d.")}


def test_every_import_points_down_or_sideways():
    upward = []
    for module, path in sorted(_modules().items()):
        here = _layer(module)
        for target in sorted(_imports(module, path)):
            if _layer(target) > here:
                upward.append(
                    f"{path.relative_to(ROOT)}: {module} (layer {here}) imports {target} (layer {_layer(target)})"
                )
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import_in_a_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n    from t3d.priors import load_prior\n\nif TYPE_CHECKING:\n    from t3d.cli import main\n"
    )
    assert _imports("t3d.store", path) == {"t3d.priors"}  # the lazy import counts, the type-only one does not
    assert _layer("t3d.priors.loading") > _layer("t3d.store")
