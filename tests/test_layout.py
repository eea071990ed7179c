"""The package's shape: `psoft_deploy.converters` and `psoft_deploy.serve` are the top-level folders
(mapped by pyproject.toml's package-dir), and no module imports one that imports it back (imports
inside functions included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"psoft_deploy": "psoft_deploy", "psoft_deploy.converters": "converters", "psoft_deploy.serve": "serve"}


# The layers, bottom first: each module imports only modules of its own layer or those below.
LAYERS = ("psoft_deploy.core", "psoft_deploy.converters", "psoft_deploy.serve", "psoft_deploy")


def module_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Each of our modules and the modules of ours it imports, anywhere in its body."""
    files = {}
    for package, folder in PACKAGES.items():
        for file in (root / folder).rglob("*.py"):
            parts = [part for part in file.relative_to(root / folder).with_suffix("").parts if part != "__init__"]
            files[".".join([package, *parts])] = file
    graph = {}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *filter(None, [base])])
                imported |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = module_imports()
    assert len(graph) > 40 and graph["psoft_deploy.converters.pipeline"], "the walk found our modules and imports"

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for name in graph[todo.pop()] - seen:
                if name == target:
                    return True
                seen.add(name)
                todo.append(name)
        return False

    cycles = sorted(f"{module} -> {other}" for module, imports in graph.items() for other in imports
                    if reaches(other, module))
    assert not cycles, cycles


def layer(module: str) -> int:
    return next(index for index, package in enumerate(LAYERS) if module == package or module.startswith(package + "."))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {other}" for module, imports in graph.items() for other in imports
                  if layer(other) > layer(module))


def test_each_layer_imports_only_its_own_and_those_below():
    """core < converters < serve < the commands (cli, demo, train, train_jobs) and the test kit."""
    graph = module_imports()
    assert {layer(module) for module in graph} == set(range(len(LAYERS))), "every layer holds modules"
    assert any(layer(other) < layer(module) for module, imports in graph.items() for other in imports)
    assert upward_imports(graph) == []


def test_the_layering_check_fails_on_a_planted_upward_import(tmp_path):
    import shutil

    for folder in PACKAGES.values():
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "psoft_deploy" / "core" / "psoft.py", "a") as planted:
        planted.write("\n\ndef planted():\n    from ..converters import pipeline\n    from psoft_deploy import cli\n")
    assert upward_imports(module_imports(tmp_path)) == [f"psoft_deploy.core.psoft -> {name}" for name in (
        "psoft_deploy", "psoft_deploy.cli", "psoft_deploy.converters", "psoft_deploy.converters.pipeline")]


def test_the_subpackages_are_the_top_level_folders_mapped_by_pyproject_without_symlinks():
    import importlib
    import subprocess

    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert mapping == PACKAGES
    for package, folder in PACKAGES.items():  # as installed (editable here): each package is its folder
        assert Path(importlib.import_module(package).__file__).resolve() == (ROOT / folder / "__init__.py").resolve()
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    entries = tracked.splitlines()
    assert any(line.startswith("100644 ") for line in entries), "the walk reads git's modes"
    links = [line.split("\t", 1)[1] for line in entries if line.startswith("120000 ")]
    assert not links, f"symlinks in the tree: {links}"


def test_the_repository_holds_source_no_large_files_outside_test_data():
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [Path(name) for name in tracked.decode().split("\0") if name]
    assert any(path.parts[:2] == ("tests", "data") for path in paths), "the walk sees test data"
    large = [str(path) for path in paths if path.parts[:2] != ("tests", "data") and (ROOT / path).is_file()
             and (ROOT / path).stat().st_size > 1 << 20]
    assert not large, f"tracked files over 1 MiB outside tests/data: {large}"


def test_safetensors_files_are_read_and_written_in_one_module():
    users = sorted(str(file.relative_to(ROOT)) for folder in PACKAGES.values() for file in (ROOT / folder).rglob("*.py")
                   if any(isinstance(node, (ast.Import, ast.ImportFrom)) and "safetensors" in (
                       getattr(node, "module", None) or " ".join(alias.name for alias in node.names))
                          for node in ast.walk(ast.parse(file.read_text()))))
    assert users == ["psoft_deploy/core/tensorfile.py"]
