"""The built wheel is the package: with the source tree off the path, every module imports and the
demo runs (an editable install would hide a module the wheel lacks)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"psoft_deploy": "psoft_deploy", "psoft_deploy.converters": "converters", "psoft_deploy.serve": "serve"}


@pytest.mark.slow
def test_the_built_wheel_imports_every_module_and_runs_the_demo(tmp_path):
    source, wheels, target = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    # built from a copy: setuptools would reuse a stale build/ of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("psoft_deploy-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    # every module of the source tree, as the wheel must hold it
    tree = sorted(".".join([package, *Path(folder, file[:-3]).relative_to(ROOT / top).parts]).removesuffix(".__init__")
                  for package, top in PACKAGES.items() for folder, _, files in os.walk(ROOT / top)
                  for file in files if file.endswith(".py"))
    held = {name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert set(tree) <= held, f"the wheel lacks {sorted(set(tree) - held)}"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    check = ("import importlib\n"
             f"for name in {[name for name in tree if not name.endswith('__main__')]!r}:\n"
             "    module = importlib.import_module(name)\n"
             f"    assert module.__file__.startswith({str(target)!r}), module.__file__\n")
    imported = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-3000:]
    demo = subprocess.run([sys.executable, "-m", "psoft_deploy", "demo", "--output", str(tmp_path / "demo")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    assert (demo.stdout + demo.stderr).count("verification: PASS") == 2


@pytest.mark.slow
def test_the_editable_install_imports_every_module_from_the_three_folders(tmp_path):
    """As installed here (`pip install -e`), away from the repository root: each module of the tree imports, from
    its own folder (package-dir's mapping, no symlinks)."""
    tree = {".".join([package, *Path(folder, file[:-3]).relative_to(ROOT / top).parts]).removesuffix(".__init__"):
            Path(folder, file) for package, top in PACKAGES.items() for folder, _, files in os.walk(ROOT / top)
            if "__pycache__" not in folder for file in files if file.endswith(".py") and file != "__main__.py"}
    check = ("import importlib, pathlib\n"
             f"for name, file in {[(name, str(file)) for name, file in sorted(tree.items())]!r}:\n"
             "    module = importlib.import_module(name)\n"
             "    assert pathlib.Path(module.__file__).resolve() == pathlib.Path(file).resolve(), (name, module.__file__)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    imported = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert len(tree) >= 60 and imported.returncode == 0, imported.stderr[-3000:]
