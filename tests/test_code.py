"""The code itself: nothing in it is dead (the layers' direction: tests/test_layout.py)."""

from pathlib import Path

import vulture

import psoft_deploy

ROOT = Path(psoft_deploy.__file__).resolve().parent.parent

# Reached by frameworks, not by name: click commands and types, Trainer and callback hooks, vLLM
# middlewares named in serve's command line, signal handlers' and warning hooks' parameters, PEFT
# config fields, the recipe of a test fixture (tests/data/smollm2-answer).
CALLED_BY_FRAMEWORKS = ["*_command", "demo", "convert", "_save", "_load_from_checkpoint", "HideInternalName",
                        "RefuseUnknownTokens", "category", "lineno", "frame", "task_type", "train_answer_adapter"]


def test_no_dead_code():
    """vulture over the package, its tests and benchmarks: every function, class and variable of the
    package is used (attributes are left out: they are set on other libraries' objects)."""
    dead = vulture.Vulture(ignore_names=CALLED_BY_FRAMEWORKS)
    dead.scavenge([str(ROOT / folder) for folder in ("psoft_deploy", "converters", "serve", "tests", "benchmarks")])
    unused = [f"{Path(item.filename).relative_to(ROOT)}:{item.first_lineno} {item.typ} {item.name}"
              for item in dead.get_unused_code(min_confidence=60)
              if item.typ != "attribute" and Path(item.filename).parts[len(ROOT.parts)] in (
                  "psoft_deploy", "converters", "serve")]
    assert unused == []
