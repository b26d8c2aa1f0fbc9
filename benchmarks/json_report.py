"""What every benchmark ends with: its result printed as JSON and, with ``--output``, written to that file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], output: str | Path | None, indent: int = 2) -> None:
    """Print ``result`` as JSON; write the same text to ``output`` (its folder made) when given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
