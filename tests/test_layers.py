"""The packages import only downwards: utils -> models, schedulers -> pipelines, dataset -> trainer -> scripts.
Read from the source (every import statement, also inside functions), so a lazy import cannot hide a cycle."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("utils", "models", "schedulers", "pipelines", "dataset", "toy_world", "trainer", "scripts", "benchmarks")
ALLOWED = {
    "utils": {"utils"},
    "models": {"utils", "models"},
    "schedulers": {"utils", "schedulers"},
    "pipelines": {"utils", "models", "schedulers", "pipelines"},
    "dataset": {"utils", "dataset"},
    "trainer": {"utils", "models", "schedulers", "pipelines", "dataset", "trainer"},
}


def project_imports(path):
    """The top-level project packages a file imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PROJECT)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_from_its_layer_and_below(package):
    offenders = {}
    for root, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                above = project_imports(path) - ALLOWED[package]
                if above:
                    offenders[os.path.relpath(path, REPO)] = sorted(above)
    assert not offenders, f"imports from a layer above {package}: {offenders}"


def test_the_check_sees_lazy_imports(tmp_path):
    path = tmp_path / "lazy.py"
    path.write_text("import os\n\ndef f():\n    from pipelines.open_sora import cli\n    import trainer.setup\n")
    assert project_imports(str(path)) == {"pipelines", "trainer"}
