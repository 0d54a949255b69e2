"""Finding policies and budget rules: built-ins, entry points (group ``sparse_frontier.policies``), single files."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from .base import PolicyInfo
from .budget import BUDGET_RULES
from .validate import PolicyError

ENTRY_POINT_GROUP = "sparse_frontier.policies"
PHASES = ("prefill", "decode")
UNITS = ("token", "page", "block")
SHARING = ("head", "group")

# Built-in policy modules; each Policy class they define is registered under its ``name``. The oracle module
# is imported lazily by path (it belongs to the simulator) and skipped while it does not exist yet.
BUILTIN_MODULES = (
    "sparse_frontier.policies.dense",
    "sparse_frontier.policies.sink_local",
    "sparse_frontier.policies.vertical_slash",
    "sparse_frontier.policies.flexprefill",
    "sparse_frontier.policies.block_sparse",
    "sparse_frontier.policies.snapkv",
    "sparse_frontier.policies.ada_snapkv",
    "sparse_frontier.policies.quest",
    "sparse_frontier.policies.oracle",
)

_extra: dict[str, PolicyInfo] = {}  # policies loaded from files during this process


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


def contract_problems(cls: object) -> list[str]:
    """What a class lacks to be a policy (empty when it is one)."""
    if not inspect.isclass(cls):
        return [f"{cls!r} is not a class"]
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("class attribute `name` (a non-empty str)")
    if getattr(cls, "phase", None) not in PHASES:
        problems.append("class attribute `phase` ('prefill' or 'decode')")
    if not isinstance(getattr(cls, "owns_budget", None), bool):
        problems.append("class attribute `owns_budget` (bool)")
    gran = granularity_of(cls)
    if not (isinstance(gran, tuple) and len(gran) == 3 and gran[0] in UNITS and isinstance(gran[1], int)
            and gran[1] >= 1 and gran[2] in SHARING):
        problems.append("class attribute `granularity` (unit in token/page/block, size >= 1, head/group), "
                        "e.g. ('token', 1, 'head')")
    params = getattr(cls, "Params", None)
    if not (inspect.isclass(params) and dataclasses.is_dataclass(params)):
        problems.append("a `Params` dataclass of its parameters")
    if not callable(getattr(cls, "select", None)):
        problems.append("a method `select(view, budget) -> Selection`")
    return problems


def granularity_of(cls: type):
    """The class's ``granularity``, or, when it is set per instance from parameters, a default instance's."""
    gran = getattr(cls, "granularity", None)
    if gran is None:
        try:
            gran = getattr(cls(), "granularity", None)
        except Exception:
            return None
    return tuple(gran) if isinstance(gran, tuple) else gran


def _is_policy_class(obj: object, module: str) -> bool:
    return (inspect.isclass(obj) and obj.__module__ == module and isinstance(getattr(obj, "name", None), str)
            and callable(getattr(obj, "select", None)) and getattr(obj, "phase", None) in PHASES)


def _module_policies(module_name: str) -> list[type]:
    module = importlib.import_module(module_name)
    return [obj for obj in vars(module).values() if _is_policy_class(obj, module_name)]


def available() -> dict[str, PolicyInfo]:
    """Every known policy by name: built-ins, then entry points, then policy files loaded in this process."""
    found: dict[str, PolicyInfo] = {}
    for module_name in BUILTIN_MODULES:
        try:
            classes = _module_policies(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for cls in classes:
            found[cls.name] = PolicyInfo(cls=cls, source="built-in", summary=_summary(cls))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            warnings.warn(f"policy entry point {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
            continue
        problems = contract_problems(cls)
        if problems:
            warnings.warn(f"policy entry point {ep.name!r} ({ep.value}) is not a policy: lacks "
                          f"{'; '.join(problems)}", stacklevel=2)
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        found[cls.name] = PolicyInfo(cls=cls, source=f"entry point {ep.value} ({dist})", summary=_summary(cls))
    found.update(_extra)
    return found


def policy_class(name: str) -> type:
    """The policy class registered as ``name``; PolicyError listing the known names otherwise."""
    known = available()
    if name not in known:
        raise PolicyError(f"unknown policy {name!r}; known policies: {', '.join(sorted(known))}")
    return known[name].cls


def get_policy(name: str, **params):
    """An instance of policy ``name`` with the given parameters (the rest at the paper's defaults)."""
    cls = policy_class(name)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy {name!r}: {exc}") from exc


def get_budget_rule(name: str, **params):
    """An instance of budget rule ``name`` (uniform, fixed, sublinear, topp) with the given parameters."""
    if name not in BUDGET_RULES:
        raise PolicyError(f"unknown budget rule {name!r}; known budget rules: {', '.join(BUDGET_RULES)}")
    try:
        return BUDGET_RULES[name](**params)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"budget rule {name!r}: {exc}") from exc


def load_policy_file(path: str | Path) -> type:
    """Import a single .py file defining one policy class, register it, and return the class.

    Any error while importing, or a file that defines no policy class or several, is one PolicyError
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {path}: no such file")
    module_name = f"sparse_frontier_user_policy_{path.stem}_{abs(hash(path.resolve())):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PolicyError(f"policy file {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PolicyError(f"policy file {path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    candidates = [obj for obj in vars(module).values()
                  if inspect.isclass(obj) and obj.__module__ == module_name and callable(getattr(obj, "select", None))]
    if len(candidates) != 1:
        what = "no class with a `select` method" if not candidates else \
            f"{len(candidates)} classes with a `select` method ({', '.join(c.__name__ for c in candidates)})"
        raise PolicyError(f"policy file {path}: defines {what}; it must define exactly one policy class")
    cls = candidates[0]
    problems = contract_problems(cls)
    if problems:
        raise PolicyError(f"policy file {path}: class {cls.__name__} lacks {'; '.join(problems)}")
    _extra[cls.name] = PolicyInfo(cls=cls, source=f"file {path}", summary=_summary(cls))
    return cls


def describe(cls: type) -> dict:
    """A JSON-ready description of a policy class: name, phase, budget ownership, granularity, parameters."""
    params = [{"name": f.name, "type": str(f.type), "default": _default(f)} for f in dataclasses.fields(cls.Params)]
    return {"name": cls.name, "phase": cls.phase, "owns_budget": cls.owns_budget,
            "granularity": list(granularity_of(cls) or ()), "summary": _summary(cls), "doc": inspect.getdoc(cls) or "",
            "params": params}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
