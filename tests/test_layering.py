"""No import in ``src/hypereal`` runs upward through the layers.

A request flows down ``api`` → ``engine`` → ``webhooks`` → ``domain`` → ``backends`` →
``media`` → ``store``, and a module may import only from its own layer or one below it. The
packages outside that flow have these places:

- ``app``, ``cli``, ``cli_keys``: the entry points, above everything; they may import any part.
- ``observability.middleware`` and ``observability.readiness``: the HTTP side of operations
  (the timing middleware, the readiness probe), in the ``api`` layer.
- ``services``: the composition root the API and the entry points hold (settings, database,
  catalogue, backends, media store), just below ``api``; the engine is handed its parts
  (``engine/context.py``) instead of importing it.
- ``observability`` (``logs``, ``metrics``): instrumentation every layer may use, just above
  ``store`` (the metrics read the database at scrape time).
- ``settings`` and ``console`` (static files): leaves at the bottom, importing no other part.
- ``client``: the Python client, apart from the server: it imports only itself, and only the
  entry points (the ``hypereal`` CLI) import it.

Imports under ``if TYPE_CHECKING:`` count too: an annotation that names a higher layer is a
dependency on it all the same.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import hypereal

SRC = Path(hypereal.__file__).parent

#: Module prefixes, highest layer first; a module takes the rank of its longest prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hypereal.app", "hypereal.cli", "hypereal.cli_keys"),
    ("hypereal.api", "hypereal.observability.middleware", "hypereal.observability.readiness"),
    ("hypereal.services",),
    ("hypereal.engine",),
    ("hypereal.webhooks",),
    ("hypereal.domain",),
    ("hypereal.backends",),
    ("hypereal.media",),
    ("hypereal.observability",),
    ("hypereal.store",),
    ("hypereal.settings", "hypereal.console"),
)
ENTRY_POINTS = LAYERS[0]
CLIENT = "hypereal.client"


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rank(module: str) -> int:
    """The layer of ``module`` (0 is the top). Raises KeyError for a module with no layer."""
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if _within(module, prefix)
    ]
    if not matches:
        raise KeyError(f"{module} has no layer: give it one in {__name__}.LAYERS")
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.Module, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every import of a ``hypereal`` module anywhere in ``tree``; a
    ``from package import name`` that names a submodule counts as that submodule."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                is_module = (SRC.parent / submodule.replace(".", "/")).with_suffix(".py").exists()
                is_package = (SRC.parent / submodule.replace(".", "/") / "__init__.py").exists()
                yield node.lineno, submodule if is_module or is_package else base


def violation(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target``, or None when it may."""
    if _within(importer, CLIENT) or _within(target, CLIENT):
        allowed = _within(importer, CLIENT) == _within(target, CLIENT) or any(
            _within(importer, entry) for entry in ENTRY_POINTS
        )
        return None if allowed else "the client and the server import nothing of each other"
    if rank(target) < rank(importer):
        return "imports a higher layer"
    return None


def upward_imports() -> list[str]:
    found: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        importer = module_name(path)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for line, target in imported(ast.parse(path.read_text()), package):
            if not _within(target, "hypereal") or target == "hypereal":
                continue
            why = violation(importer, target)
            if why is not None:
                found.append(f"{path.relative_to(SRC.parent)}:{line}: {target} ({why})")
    return found


def test_no_import_runs_upward() -> None:
    assert upward_imports() == []


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("hypereal.backends.registry", "hypereal.domain.catalogue"),
        ("hypereal.domain.admin_actions", "hypereal.webhooks.secrets"),
        ("hypereal.observability.logs", "hypereal.domain.keys"),
        ("hypereal.engine.runner", "hypereal.services"),
        ("hypereal.domain.keys", "hypereal.client"),
    ],
)
def test_the_check_refuses_an_upward_import(importer: str, target: str) -> None:
    assert violation(importer, target) is not None


def test_every_module_has_a_layer() -> None:
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        if name != "hypereal" and not _within(name, CLIENT):
            rank(name)
