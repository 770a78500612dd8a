"""House rules the import contract (lint-imports) cannot see: no borrowed private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> list[Path]:
    return sorted(p for pkg in ("orchestrator", "shards") for p in (ROOT / pkg).rglob("*.py"))


def test_the_scan_sees_the_packages() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"orchestrator/runs.py", "orchestrator/sources/files.py", "shards/protocol.py"} <= names


def test_no_module_imports_another_modules_private_names() -> None:
    borrowed = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] not in ("orchestrator", "shards"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    borrowed.append(f"{where}: {node.module}.{alias.name}")
    assert borrowed == [], "\n".join(borrowed)
