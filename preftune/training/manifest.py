"""A checkpoint's manifest: every file's size and SHA-256, written last, checked before a resume.

``manifest.json`` lists the files of a checkpoint directory (paths relative to it). It is written after
every other file, so a checkpoint without one is incomplete; a file that is missing, shorter or longer, or
whose bytes changed since makes ``problem`` name it.
"""

from __future__ import annotations

import json
from pathlib import Path

from preftune.data.sources import file_digest

MANIFEST = "manifest.json"


def write_manifest(directory: Path) -> int:
    """Write ``directory/manifest.json`` for every file under ``directory``; return their total bytes."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": file_digest(path),
        }
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    return sum(entry["size"] for entry in files.values())


def manifest_bytes(directory: Path) -> int:
    """Total bytes of the files ``directory``'s manifest lists."""
    files = json.loads((directory / MANIFEST).read_text())["files"]
    return sum(entry["size"] for entry in files.values())


def problem(directory: Path) -> str | None:
    """None if every file of the manifest is there with its size and checksum; else what is wrong."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written"
        if file_digest(path) != entry["sha256"]:
            return f"{name} has changed since it was written (checksum mismatch)"
    return None
