"""README.md as a reader's renderer sees it (CommonMark with tables), and every
entry point's `--help`: the first things a new user meets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbench.configs import PRESETS

ROOT = Path(__file__).resolve().parents[1]
markdown_it = pytest.importorskip("markdown_it")


def _tokens() -> list:
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    return md.parse((ROOT / "README.md").read_text())


def _section(tokens: list, title: str) -> list:
    """The tokens from the level-2 heading `title` to the next level-2 heading."""
    start = next(
        i
        for i, t in enumerate(tokens)
        if t.type == "inline" and t.content == title and tokens[i - 1].tag == "h2"
    )
    end = next(
        (i - 1 for i in range(start + 1, len(tokens)) if tokens[i].type == "heading_open"
         and tokens[i].tag == "h2"),
        len(tokens),
    )  # fmt: skip
    return tokens[start:end]


def _tables(tokens: list) -> list[list[list[str]]]:
    """Each rendered table as rows of cell texts (the header row first)."""
    tables, rows, row, inside = [], [], [], False
    for t in tokens:
        if t.type == "table_open":
            rows, inside = [], True
        elif t.type == "table_close":
            tables.append(rows)
            inside = False
        elif inside and t.type == "tr_open":
            row = []
        elif inside and t.type == "tr_close":
            rows.append(row)
        elif inside and t.type == "inline":
            row.append(t.content)
    return tables


def test_the_two_commands_render_as_code_and_ci_runs_them() -> None:
    blocks = [t.content.strip() for t in _section(_tokens(), "The two commands")
              if t.type == "code_block"]  # fmt: skip
    assert len(blocks) == 2, blocks
    install, tests = blocks
    assert install.startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert 'pip install -e ".[dev]"' in install
    assert install.endswith("python -m jaxbench.train --config tiny --out runs/tiny")
    assert tests == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev]"' in ci  # the README's extras
    assert ci.rstrip().splitlines()[-1] == tests  # the README's test command, last


def test_the_presets_table_survives_rendering() -> None:
    tables = _tables(_section(_tokens(), "Training"))
    presets = next(t for t in tables if t[0][0] == "preset" and t[0][1] == "what")
    names = [re.sub(r"[`]| \(default\)", "", row[0]) for row in presets[1:]]
    assert sorted(names) == sorted(PRESETS)
    assert all(len(row) == 3 and all(cell.strip() for cell in row) for row in presets)
    expected = next(t for t in tables if t[0][:2] == ["preset", "published (source)"])
    assert sorted(re.sub(r"[`]", "", row[0]) for row in expected[1:]) == sorted(PRESETS)


def test_no_paragraph_hides_in_a_table_and_links_resolve() -> None:
    tokens = _tokens()
    for table in _tables(tokens):
        width = len(table[0])
        assert all(len(row) == width for row in table), table
        assert not any("Both trainers print" in cell for row in table for cell in row)
    paragraphs = [t.content for i, t in enumerate(tokens) if t.type == "inline"
                  and tokens[i - 1].type == "paragraph_open"]  # fmt: skip
    assert any(p.startswith("Both trainers print a per-epoch table") for p in paragraphs)
    links = re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    missing = [x for x in links if "://" not in x and not (ROOT / x).exists()]
    assert missing == []


ENTRY_POINTS = [
    "jaxbench.train",
    "torch_ref.train",
    "jaxbench.bench",
    "parity",
    "jaxbench.data",
    "jaxbench.microbench",
    "jaxbench.sweep",
    "jaxbench.bench.to94",
]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_of_every_entry_point(module: str) -> None:
    """Exit 0, the command as typed, defaults shown, switches as --x/--no-x."""
    res = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    text = res.stdout
    assert text.startswith(f"usage: python -m {module}")
    assert "(default:" in text
    assert re.search(r"--[a-z-]+ (TRUE|FALSE|[A-Z_]*(NESTEROV|TTA|LOOKAHEAD|TRAINABLE))\b", text) \
        is None  # fmt: skip


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_bad_flag_is_one_line_pointing_at_help(module: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", module, "--no-such-flag"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "--no-such-flag" in lines[0] and lines[0].endswith("(see --help)")
