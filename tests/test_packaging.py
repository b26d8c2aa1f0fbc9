"""Packaging metadata that installs without warnings."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression_for_a_setuptools_that_reads_it():
    """A TOML table in ``project.license`` makes setuptools print a deprecation (BuildBackendWarning) on every
    install; an SPDX string needs setuptools >= 77 (PEP 639). Read as text: tomllib is not in Python 3.10."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2\.0"$', text, re.MULTILINE)
    (version,) = re.findall(r'^requires = \["setuptools>=(\d+)"\]$', text, re.MULTILINE)
    assert int(version) >= 77
