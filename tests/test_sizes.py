"""The sizes a reader relies on, read from the source: each trainer reads in one sitting, and
no function runs past 80 lines unless its docstring says why ("Over 80 lines because ...")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxbench", "torch_ref", "parity")
TRAINERS = ("jaxbench/train.py", "torch_ref/train.py")
TRAINER_LINES = 450
FUNCTION_LINES = 80
WHY = "Over 80 lines because"


def long_functions(source: str, name: str = "<source>") -> list[str]:
    """`name:line function (N lines)` for each function over FUNCTION_LINES without a WHY."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1  # decorators excluded, docstring included
        said = any(
            line.strip().startswith(WHY) for line in (ast.get_docstring(node) or "").splitlines()
        )
        if length > FUNCTION_LINES and not said:
            found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_each_trainer_reads_in_one_sitting() -> None:
    lengths = {t: len((ROOT / t).read_text().splitlines()) for t in TRAINERS}
    assert all(n <= TRAINER_LINES for n in lengths.values()), lengths


def test_no_function_runs_past_80_lines_without_saying_why() -> None:
    found = [
        hit
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in long_functions(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, f"split these, or say why in their docstring ({WHY!r}): {found}"


def test_the_length_rule_catches_a_long_function_and_takes_a_reason() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}") == ["<source>:1 f (81 lines)"]
    assert long_functions(f"def f():\n{body[: body.rindex('    x')]}") == []  # 80 lines
    reason = f'    """{WHY} it is one table."""\n'
    assert long_functions(f"def f():\n{reason}{body}") == []
