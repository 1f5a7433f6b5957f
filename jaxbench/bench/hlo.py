"""Read a StableHLO program's text (`inspect_program`) for what would slow a GPU down or
change what it computes; `jaxbench.bench.program` builds and lowers the programs."""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

import numpy as np

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_ARG_TOKEN = re.compile(rf"{_STRING.pattern}|->|[\s\S]")  # a string, "->" or a character
# generic-form op names are strings ("stablehlo.case"(...)): unquote them before strings go
_GENERIC_OP = re.compile(r'"((?:stablehlo|mhlo|chlo|func|scf|sdy)\.[a-z_][\w.]*)"(?=\s*[(<])')
_FUNC = re.compile(r"\bfunc\.func\s+(?:(?:public|private|nested)\s+)*@([\w$.\-]+)")
_SYM_NAME = re.compile(r'sym_name\s*=\s*"([^"]+)"')
_CALL = re.compile(r"(?<![\w.])(?:func\.)?call\s+@([\w$.\-]+)|\bcallee\s*=\s*@([\w$.\-]+)")
_WHILE = re.compile(r"\b(?:stablehlo|mhlo)\.while\b")
_CONDITIONAL = re.compile(r"\b(?:stablehlo|mhlo|scf)\.(?:case|if)\b")
_HOST_IO = re.compile(r"\b(?:stablehlo|mhlo)\.(?:outfeed|infeed|send|recv)\b")
_CUSTOM_CALL = re.compile(  # @name, @"quoted name" or the generic form's attribute
    r'\bcustom_call\s+@(?:"([^"]+)"|([\w$.\-]+))'
    r'|\b(?:call_target_name|custom_call_target)\s*=\s*"([^"]+)"'
)
_CALLBACK_TARGET = re.compile(r"callback|python", re.IGNORECASE)
_MATMUL = re.compile(r"\b(?:stablehlo|mhlo)\.(convolution|dot_general|dot)\b")
_OPERANDS = re.compile(r":\s*\(\s*(tensor<[^>]*>)\s*,\s*(tensor<[^>]*>)\s*\)\s*->")
_ELEMENT = re.compile(r"tensor<(?:[0-9?]+x)*([a-z][a-z0-9_]*)")
_DONATION = re.compile(r"\btf\.aliasing_output\b|\bjax\.buffer_donor\b")
_NOT_STATE_ARG = re.compile(r"!stablehlo\.token|!mhlo\.token|_platform_index|jax\.global_constant")
_MAX_LISTED = 5
_CONDITIONAL_COST = {  # in a loop body or not: where, and what it costs on a GPU
    True: (
        "inside the loop body",
        "XLA:GPU copies its predicate to the host every iteration (use a select: optim._select)",
    ),
    False: ("outside any loop", "a host round trip per call on a GPU"),
}

MLIR_DTYPES: dict[str, str] = dict(bfloat16="bf16", float16="f16", float32="f32", float64="f64")


def mlir_dtype(dtype: Any) -> str:
    """'bf16' for bfloat16 etc.: an element type as StableHLO spells it."""
    if isinstance(dtype, str) and dtype in MLIR_DTYPES.values():
        return dtype
    name = np.dtype(dtype).name
    if name not in MLIR_DTYPES:
        raise ValueError(f"no StableHLO name for compute dtype {name}")
    return MLIR_DTYPES[name]


def _code(line: str) -> str:
    """The line without string literals (names, locations), generic op names kept."""
    return _STRING.sub('""', _GENERIC_OP.sub(r"\1", line))


@dataclasses.dataclass
class _Parsed:
    raw: list[str]
    code: list[str]
    func_of: list[str | None]  # the function each line belongs to
    in_loop: list[bool]  # inside a while region, or in a function called from one
    loops: int


def _parse(text: str) -> _Parsed:
    """Functions, while regions and the call graph, from brace depth and a few patterns."""
    raw = text.splitlines()
    code = [_code(line) for line in raw]
    depth_after = list(itertools.accumulate(line.count("{") - line.count("}") for line in code))
    depth_before = [0, *depth_after[:-1]]

    def region_end(start: int) -> int:
        base, opened = depth_before[start], False
        for j in range(start, len(raw)):
            opened = opened or depth_after[j] > base
            if opened and depth_after[j] <= base:
                return j
        return len(raw) - 1

    func_of: list[str | None] = [None] * len(raw)
    i = 0
    while i < len(raw):
        m = _FUNC.search(code[i]) or ("func.func" in code[i] and _SYM_NAME.search(raw[i]) or None)
        end = region_end(i) if m and depth_after[i] > depth_before[i] else i  # to its "}"
        if m:
            func_of[i : end + 1] = [m.group(1)] * (end + 1 - i)
        i = end + 1

    in_region = [False] * len(raw)
    whiles = [i for i, line in enumerate(code) if _WHILE.search(line)]
    for i in whiles:
        end = region_end(i)
        in_region[i : end + 1] = [True] * (end + 1 - i)

    calls: dict[str | None, set[str]] = {}
    from_loops: set[str] = set()
    for i, line in enumerate(code):
        for m in _CALL.finditer(line):
            callee = m.group(1) or m.group(2)
            calls.setdefault(func_of[i], set()).add(callee)
            if in_region[i]:
                from_loops.add(callee)
    todo = list(from_loops)
    while todo:
        for callee in calls.get(todo.pop(), ()):
            if callee not in from_loops:
                from_loops.add(callee)
                todo.append(callee)
    in_loop = [r or (f in from_loops) for r, f in zip(in_region, func_of, strict=True)]
    return _Parsed(raw, code, func_of, in_loop, len(whiles))


def _main_arguments(text: str) -> list[str]:
    """The argument declarations of the public entry function (`@main`), one string each."""
    m = re.search(r"func\.func\s+public\s+@main\s*\(", text) or re.search(
        r"func\.func\s+public\s+@[\w$.\-]+\s*\(", text
    )
    if not m:
        return []
    args, cur, depth = [], "", 0
    for token in _ARG_TOKEN.finditer(text, m.end()):
        t = token.group()
        if depth == 0 and t in (")", ","):
            if t == ")":
                break
            args.append(cur)
            cur = ""
            continue
        depth += (t in "({[<") - (t in ")}]>")  # "->" is one token: no bracket
        cur += t
    return [a.strip() for a in (args + [cur] if cur.strip() else args)]


def _listed(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return "; ".join(items[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _where(p: _Parsed, i: int) -> str:
    return " (in the loop body)" if p.in_loop[i] else ""


def _host_callbacks(p: _Parsed) -> tuple[dict[str, int], list[str]]:
    """(custom calls by target, host callbacks and transfers with their lines): check (a)."""
    custom_calls: dict[str, int] = {}
    callbacks: list[str] = []
    for i, (raw, code) in enumerate(zip(p.raw, p.code, strict=True)):
        for m in _CUSTOM_CALL.finditer(raw):
            target = m.group(1) or m.group(2) or m.group(3)
            custom_calls[target] = custom_calls.get(target, 0) + 1
            if _CALLBACK_TARGET.search(target):
                callbacks.append(f"custom_call @{target} at line {i + 1}" + _where(p, i))
        for m in _HOST_IO.finditer(code):
            callbacks.append(f"{m.group(0)} at line {i + 1}" + _where(p, i))
    return custom_calls, callbacks


def _conditionals(p: _Parsed) -> tuple[list[dict[str, Any]], list[str]]:
    """(every conditional, the problems they make): check (b)."""
    conditionals = [
        {"op": m.group(0), "line": i + 1, "function": p.func_of[i], "in_loop": p.in_loop[i]}
        for i, code in enumerate(p.code)
        for m in _CONDITIONAL.finditer(code)
    ]
    problems = []
    for inside, (what, cost) in _CONDITIONAL_COST.items():
        found = [c for c in conditionals if c["in_loop"] == inside]
        if found:
            where = [f"{c['op']} at line {c['line']} (@{c['function']})" for c in found]
            problems.append(f"conditional {what} ({len(found)}): {_listed(where)}; {cost}")
    return conditionals, problems


def _contraction_dtypes(
    p: _Parsed, want: str, dots_in_compute_dtype: bool
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """(operand types of convolutions and dot_generals, counted; problems): check (c)."""
    operand_types: dict[str, dict[str, int]] = {"convolution": {}, "dot_general": {}}
    wrong: list[str] = []
    unread: list[str] = []
    for i, code in enumerate(p.code):
        m = _MATMUL.search(code)
        if not m:
            continue
        op = "convolution" if m.group(1) == "convolution" else "dot_general"
        found = _OPERANDS.search(" ".join(p.code[i : i + 4]))  # its type may wrap lines
        elements = [_ELEMENT.search(t) for t in found.groups()] if found else [None]
        if not all(elements):
            unread.append(f"{op} at line {i + 1}")
            continue
        types = tuple(e.group(1) for e in elements)
        key = " x ".join(types)
        operand_types[op][key] = operand_types[op].get(key, 0) + 1
        checked = op == "convolution" or dots_in_compute_dtype
        if checked and types != (want, want):
            wrong.append(f"{op} at line {i + 1} reads {key}")
    problems = []
    if wrong:
        problems.append(f"not in the compute dtype {want} ({len(wrong)}): {_listed(wrong)}")
    if unread:
        problems.append(f"operand types not found ({len(unread)}): {_listed(unread)}")
    if sum(operand_types["convolution"].values()) == 0 and not unread:
        problems.append(
            "no stablehlo.convolution found: not this trainer's program, "
            "or a text format this parser does not read"
        )
    return operand_types, problems


def _donation(text: str, state_leaves: int | None) -> tuple[list[bool], list[str]]:
    """(donated or not, per entry argument; problems): check (d)."""
    args = [a for a in _main_arguments(text) if not _NOT_STATE_ARG.search(a)]
    donated = [bool(_DONATION.search(a)) for a in args]
    if state_leaves is None:
        return donated, []
    missing = [i for i, d in enumerate(donated[:state_leaves]) if not d]
    if len(donated) < state_leaves:
        return donated, [
            f"the entry function has {len(args)} arguments, fewer than the "
            f"{state_leaves} state leaves"
        ]
    if missing:
        shown = ", ".join(f"%arg{i}" for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        return donated, [
            f"state not donated: {len(missing)} of {state_leaves} state leaves carry no "
            f"tf.aliasing_output / jax.buffer_donor ({shown})"
        ]
    return donated, []


def inspect_program(
    text: str,
    compute_dtype: Any,
    *,
    state_leaves: int | None = None,
    expect_loop: bool = False,
    dots_in_compute_dtype: bool = True,
) -> dict[str, Any]:
    """Findings on a StableHLO program (jax 0.10's or 0.11's text, or MLIR's generic form);
    no `problems` means (a) no host callback or transfer, (b) no conditional, (c) every
    convolution and dot_general (convolutions only with `dots_in_compute_dtype=False`) reads
    `compute_dtype`, (d) the first `state_leaves` arguments donated. A text with no convolution
    (or no loop when `expect_loop`) fails: an unread format must not pass silently."""
    want = mlir_dtype(compute_dtype)
    p = _parse(text)
    problems: list[str] = []
    custom_calls, callbacks = _host_callbacks(p)
    if callbacks:
        problems.append(f"host callback or transfer ({len(callbacks)}): {_listed(callbacks)}")
    conditionals, found = _conditionals(p)
    problems += found
    operand_types, found = _contraction_dtypes(p, want, dots_in_compute_dtype)
    problems += found
    if expect_loop and p.loops == 0:
        problems.append("no stablehlo.while found: the epoch is not one scanned loop")
    donated, found = _donation(text, state_leaves)
    problems += found
    return {
        "ok": not problems,
        "problems": problems,
        "compute_dtype": want,
        "loops": p.loops,
        "conditionals": conditionals,
        "host_callbacks": callbacks,
        "custom_calls": custom_calls,
        "convolutions": sum(operand_types["convolution"].values()),
        "dot_generals": sum(operand_types["dot_general"].values()),
        "operand_types": operand_types,
        "arguments": len(donated),
        "donated": sum(donated),
        "state_leaves": state_leaves,
    }
