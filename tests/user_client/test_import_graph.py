"""The SDK stands alone: no module of user_client imports a service package or the demo.

Read with ast (imports inside functions count too), so a lazy import cannot hide an arrow."""

import ast
from pathlib import Path

import user_client

FORBIDDEN = ("developer_service", "cloud_service", "stip_demo", "attack_lab", "bench", "benchmarks", "tests")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_sdk_imports_no_service_and_no_demo() -> None:
    root = Path(user_client.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10  # the whole SDK, gateway included
    arrows = {
        f"{path.relative_to(root.parent)} -> {name}"
        for path in files
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN
    }
    assert not arrows, sorted(arrows)


def test_the_check_sees_an_arrow(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from developer_service.client import DeveloperAdminClient\n")
    assert "developer_service.client" in _imports(module)
