"""The code itself: the layers of the package depend one way (the core imports nothing from the
converters or serve), and nothing in it is dead."""

import ast
from pathlib import Path

import vulture

import psoft_deploy

ROOT = Path(psoft_deploy.__file__).resolve().parent.parent
# Modules of psoft_deploy/ that sit above the converters and serve: the commands and the test kit.
ABOVE_THE_CORE = {"__main__", "cli", "demo", "train", "train_jobs", "testing"}


def imported_modules(file: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "psoft_deploy." if node.level else ""
            module = base + (node.module or "")
            names |= {module} | {f"{module}.{alias.name}".replace("..", ".") for alias in node.names}
    return names


def test_the_core_imports_nothing_from_the_converters_or_serve():
    core = [file for file in (ROOT / "psoft_deploy").glob("*.py") if file.stem not in ABOVE_THE_CORE]
    assert len(core) > 15 and {"psoft", "factors", "formats", "base", "architectures"} <= {f.stem for f in core}
    upward = {file.stem: sorted(name for name in imported_modules(file)
                                if name.startswith(("psoft_deploy.converters", "psoft_deploy.serve")))
              for file in core}
    assert {stem: names for stem, names in upward.items() if names} == {}


def test_the_layering_check_sees_lazy_and_relative_imports(tmp_path):
    file = tmp_path / "module.py"
    file.write_text("def f():\n    from .converters.verify import Report\n")
    assert "psoft_deploy.converters.verify" in imported_modules(file)

# Reached by frameworks, not by name: click commands and types, Trainer and callback hooks, vLLM
# middlewares named in serve's command line, signal handlers' and warning hooks' parameters, PEFT
# config fields, the recipe of a test fixture (tests/data/smollm2-answer).
CALLED_BY_FRAMEWORKS = ["*_command", "demo", "convert", "_save", "_load_from_checkpoint", "HideInternalName",
                        "RefuseUnknownTokens", "category", "lineno", "frame", "task_type", "train_answer_adapter"]


def test_no_dead_code():
    """vulture over the package, its tests and benchmarks: every function, class and variable of the
    package is used (attributes are left out: they are set on other libraries' objects)."""
    dead = vulture.Vulture(ignore_names=CALLED_BY_FRAMEWORKS)
    package = [str(file) for file in (ROOT / "psoft_deploy").glob("*.py")]
    dead.scavenge([*package, str(ROOT / "converters"), str(ROOT / "serve"), str(ROOT / "tests"),
                   str(ROOT / "benchmarks")])
    unused = [f"{Path(item.filename).relative_to(ROOT)}:{item.first_lineno} {item.typ} {item.name}"
              for item in dead.get_unused_code(min_confidence=60)
              if item.typ != "attribute" and Path(item.filename).parts[len(ROOT.parts)] in (
                  "psoft_deploy", "converters", "serve")]
    assert unused == []
