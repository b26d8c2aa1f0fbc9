"""The documentation renders as written: every Markdown table has one separator row, under its header."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEPARATOR = re.compile(r"^\|( *:?-+:? *\|)+$")


@pytest.mark.parametrize("doc", ["README.md", "docs/LAYOUT.md"])
def test_each_table_has_one_separator_row_under_its_header(doc):
    """A separator row in a table's middle renders as a row of dashes."""
    lines = ["", *(ROOT / doc).read_text().splitlines()]  # lines[n]: line n
    misplaced = [
        n
        for n, line in enumerate(lines)
        if SEPARATOR.match(line) and not (lines[n - 1].startswith("|") and not lines[n - 2].startswith("|"))
    ]
    assert misplaced == [], f"{doc}: separator rows not right under a table's header (lines {misplaced})"
