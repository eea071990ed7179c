"""Checks of another library's internals that psoft-deploy relies on: the whole signature (names and
kinds, in order) of each method or function it overrides or calls, and each attribute it reads. What
changed is said in one line, so that a new release is refused rather than misused (vLLM's in
`psoft_deploy.serve.vllm_shared`, transformers' and TRL's in `psoft_deploy.train_jobs`)."""

from __future__ import annotations

import inspect
import re


def missing(library: str, relied_on: dict, reads: dict) -> str | None:
    """What ``library`` lacks or changed of ``relied_on`` (``{(owner, name): signature}``) and ``reads``
    (``{class: attribute names}``), in one line; None: nothing."""
    for (owner, name), expected in relied_on.items():
        if inspect.getattr_static(owner, name, None) is None:
            return f"{library}'s {owner.__name__}.{name} is gone"
        found = bare_signature(getattr(owner, name))
        if found != expected:
            return f"{library}'s {owner.__name__}.{name} is now {found}, psoft-deploy was checked on {expected}"
    for owner, names in reads.items():
        for name in names:
            if not has_attribute(owner, name):
                return f"{library}'s {owner.__name__} no longer has {name}"
    return None


def bare_signature(function) -> str:
    """``function``'s parameters, names and kinds in order, without annotations or defaults: ``(self, x, *, y)``."""
    signature = inspect.signature(function)
    return str(signature.replace(parameters=[p.replace(annotation=p.empty, default=p.empty)
                                             for p in signature.parameters.values()],
                                 return_annotation=signature.empty))


def has_attribute(owner: type, name: str) -> bool:
    """Whether instances of ``owner`` have ``name``: a class member, a declared field, or assigned as
    ``self.name`` in the source of a class it derives from."""
    if inspect.getattr_static(owner, name, None) is not None:
        return True
    assigned = re.compile(rf"\bself\.{name}\s*(:[^=\n]+)?=(?!=)")
    for klass in owner.__mro__[:-1]:
        if name in inspect.get_annotations(klass):
            return True
        try:
            if assigned.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):  # no source: built in
            continue
    return False
