"""The allowed imports, read from the source (nothing is imported): the layers stay layers.

* torch_ref never imports JAX, Flax or Optax, not even through a jaxbench module it loads;
* the framework-neutral modules (NEUTRAL) import neither JAX nor PyTorch, at module level
  or in a function, nor load a module that does when they are imported;
* no circle of imports among jaxbench, torch_ref and parity (a deferred import in a
  function included);
* no private name (`_x`) of one module used by another, tests included: neither
  `from m import _x` nor `m._x`.

KNOWN_VIOLATIONS lists what breaks these rules today, each to be removed with its fix;
anything not on it fails, and so does an entry that no longer happens.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxbench", "torch_ref", "parity")
JAX = frozenset({"jax", "jaxlib", "flax", "optax", "orbax"})
TORCH = frozenset({"torch", "torchvision"})

# Modules that run the same for both frameworks: the recipe's numbers, the data, the run
# folder, the command line.
NEUTRAL = (
    "jaxbench",
    "jaxbench.bench.budget",
    "jaxbench.bench.flops",
    "jaxbench.bench.records",
    "jaxbench.checkpoint",
    "jaxbench.cli",
    "jaxbench.command",
    "jaxbench.configs",
    "jaxbench.data",
    "jaxbench.driver",
    "jaxbench.muon",
    "jaxbench.progress",
    "jaxbench.report",
    "jaxbench.schedule",
    "jaxbench.stats",
    "jaxbench.stream",
    "jaxbench.sweep",
    "jaxbench.sweep_workers",
    "jaxbench.whitening",
    "torch_ref",
)

KNOWN_VIOLATIONS = frozenset(
    {
        # report.environment() and numeric_settings() import the frameworks a run used, to
        # record their versions and settings
        "neutral: jaxbench.report imports flax",
        "neutral: jaxbench.report imports jax",
        "neutral: jaxbench.report imports optax",
        "neutral: jaxbench.report imports torch",
    }
)


@dataclass
class Module:
    """What one source file imports: project modules and top-level packages."""

    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # modules imported when this one is
    anywhere: set[str] = field(default_factory=set)  # module level or in a function
    private: set[str] = field(default_factory=set)  # "module._name" used from here


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    """Whether `name` is a module or package of this project (not a function or class)."""
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _ours(source: str, root: Path) -> bool:
    """Whether an imported module is this project's (a package module or a test helper)."""
    return source.split(".")[0] in PACKAGES or (root / "tests" / f"{source}.py").is_file()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST, top: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it runs on import (not in a function or under TYPE_CHECKING)."""
    for child in ast.iter_child_nodes(node):
        inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if _type_checking(child):
            continue  # never runs
        yield child, inner
        yield from _walk(child, inner)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def parse(path: Path, root: Path = ROOT) -> Module:
    """The imports of one file, and the private names of other modules it uses."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    mod = Module(name, path)
    aliases: dict[str, str] = {}  # a local name bound to a project module -> that module
    for node, top in _walk(ast.parse(path.read_text()), True):
        found: list[str] = []
        if isinstance(node, ast.Import):
            for a in node.names:
                found.append(a.name)
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top_name = a.name.split(".")[0]
                    aliases[top_name] = top_name
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{source}" if source else base
            found.append(source)
            for a in node.names:
                sub = f"{source}.{a.name}"
                if _is_module(sub, root):
                    found.append(sub)
                    aliases[a.asname or a.name] = sub
                elif _private(a.name) and source != name and _ours(source, root):
                    mod.private.add(f"{source}.{a.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = _dotted(node.value)
            if owner is not None:
                head, _, rest = owner.partition(".")
                full = f"{aliases[head]}.{rest}".rstrip(".") if head in aliases else None
                if full is not None and _is_module(full, root) and full != name:
                    mod.private.add(f"{full}.{node.attr}")
        for imported in found:
            mod.anywhere.add(imported)
            if top:
                mod.top.add(imported)
    return mod


def project(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the packages and the tests under `root`, by dotted name."""
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    files += list((root / "tests").glob("*.py"))
    return {m.name: m for m in (parse(p, root) for p in sorted(files))}


def _loaded(mods: dict[str, Module], name: str) -> set[str]:
    """Every module and package that importing `name` loads (module-level imports)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        parts = n.split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
            prefix = ".".join(parts[:i])
            if prefix not in seen:
                seen.add(prefix)
                if prefix in mods:
                    todo.extend(mods[prefix].top)
    return seen


def _roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def _cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Circles of imports among the packages, at module level or in a function (a deferred
    import hides a circle, it does not remove it): Tarjan's strongly connected sets."""
    graph = {
        n: sorted({t for t in m.anywhere if t in mods and t != n and not n.startswith(f"{t}.")})
        for n, m in mods.items()
        if n.split(".")[0] in PACKAGES
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(mods: dict[str, Module]) -> set[str]:
    """Every broken rule, one line each (the form KNOWN_VIOLATIONS uses)."""
    out: set[str] = set()
    for name, m in mods.items():
        if name.split(".")[0] == "torch_ref":
            out |= {f"torch_ref: {name} imports {r}" for r in _roots(m.anywhere) & JAX}
            out |= {f"torch_ref: {name} loads {r}" for r in _roots(_loaded(mods, name)) & JAX}
        if name in NEUTRAL:
            out |= {f"neutral: {name} imports {r}" for r in _roots(m.anywhere) & (JAX | TORCH)}
            loads = _roots(_loaded(mods, name)) & (JAX | TORCH)
            out |= {f"neutral: {name} loads {r}" for r in loads}
        out |= {f"private: {name} uses {p}" for p in m.private}
    out |= {"cycle: " + " ".join(group) for group in _cycles(mods)}
    return out


def test_only_known_violations_remain() -> None:
    mods = project()
    assert set(NEUTRAL) <= set(mods), "a neutral module is missing: update NEUTRAL"
    found = violations(mods)
    assert sorted(found - KNOWN_VIOLATIONS) == [], "new import violations"
    assert sorted(KNOWN_VIOLATIONS - found) == [], "fixed: remove them from KNOWN_VIOLATIONS"


def _violations_of(tmp_path: Path, files: dict[str, str]) -> set[str]:
    """The rules applied to a made-up project written under `tmp_path`."""
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return violations(project(tmp_path))


def test_each_rule_catches_its_violation(tmp_path: Path) -> None:
    """The checker itself: each kind of violation, planted in a small project, is found."""
    found = _violations_of(
        tmp_path,
        {
            "jaxbench/__init__.py": "",
            "jaxbench/configs.py": "def f():\n    from jaxbench import checkpoint\n",
            "jaxbench/checkpoint.py": "import jaxbench.configs as c\n\ndef f():\n    c._x()\n",
            "jaxbench/train.py": "import jax\n",
            "jaxbench/data.py": "def f():\n    import torch\n",
            "jaxbench/stream.py": "from jaxbench.train import step\n",
            "jaxbench/whitening.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jax\n"
            ),
            "torch_ref/__init__.py": "",
            "torch_ref/train.py": "from jaxbench import train\n\ndef f():\n    import optax\n",
            "parity/__init__.py": "",
            "parity/checks/__init__.py": "",
            "parity/checks/trainer.py": "import torch_ref.train\ntorch_ref.train._stats()\n",
            "tests/test_x.py": "from jaxbench.configs import _pad\n",
        },
    )
    assert found == {
        "cycle: jaxbench.checkpoint jaxbench.configs",
        "private: jaxbench.checkpoint uses jaxbench.configs._x",
        "neutral: jaxbench.data imports torch",
        "neutral: jaxbench.stream loads jax",
        "torch_ref: torch_ref.train loads jax",
        "torch_ref: torch_ref.train imports optax",
        "private: parity.checks.trainer uses torch_ref.train._stats",
        "private: tests.test_x uses jaxbench.configs._pad",
    }, sorted(found)
