"""The layout's promise: imports run one way, down the pipeline, and no two modules import
each other. Read from the source (ast), so it runs in milliseconds."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tfrs_coldstart"

# Lowest first; a module may import modules of its own layer or below, never above.
LAYERS = [
    ("tfrs_coldstart", "tfrs_coldstart.errors", "tfrs_coldstart.fileio",
     "tfrs_coldstart.console"),
    ("tfrs_coldstart.config",),
    ("tfrs_coldstart.data",),
    ("tfrs_coldstart.features",),
    ("tfrs_coldstart.modeling",),
    ("tfrs_coldstart.evaluation",),
    ("tfrs_coldstart.scoring",),
    ("tfrs_coldstart.runs",),
    ("tfrs_coldstart.training",),
    ("tfrs_coldstart.serving",),
    ("tfrs_coldstart.batch",),
    ("tfrs_coldstart.finetune", "tfrs_coldstart.pipeline"),
    ("tfrs_coldstart.cli",),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    assert rank >= 0, f"{module} is in no layer of tests/test_layout.py: add it"
    return rank


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found = out.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("tfrs_coldstart"):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("tfrs_coldstart"))
    return out


def test_imports_run_down_the_layers() -> None:
    upward = []
    for module, targets in _imports().items():
        for target in targets:
            if "tfrs_coldstart" in (target, module):
                # the package itself only sets the environment, and its lazy
                # ``tfrs_coldstart.load_model`` is a convenience re-export
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_no_two_modules_import_each_other() -> None:
    imports = _imports()
    pairs = sorted({tuple(sorted((a, b))) for a, ts in imports.items() for b in ts
                    if a in imports.get(b, set()) and a != b
                    and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not pairs, f"modules importing each other: {pairs}"


def test_serving_and_batch_never_import_training_code() -> None:
    training = ("tfrs_coldstart.training", "tfrs_coldstart.pipeline", "tfrs_coldstart.finetune")
    bad = [f"{m} -> {t}" for m, ts in _imports().items() for t in ts
           if m.startswith(("tfrs_coldstart.serving", "tfrs_coldstart.batch")) and t in training]
    assert not bad, bad
