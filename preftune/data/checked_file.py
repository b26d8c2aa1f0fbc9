"""Cache files that are checked before they are read: ``<file>`` plus ``<file>.sha256`` (its size and SHA-256).

``save_checked`` writes the tensors' file atomically and then its check; ``load_checked`` returns None,
with a warning, for a file whose check is missing or fails (truncated, altered, never finished), so the
caller rebuilds it instead of reading garbage. Loading is ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from preftune.data.sources import file_digest

logger = logging.getLogger(__name__)


def check_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checked(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    check = {"size": path.stat().st_size, "sha256": file_digest(path)}
    tmp_check = check_path(tmp)
    tmp_check.write_text(json.dumps(check))
    os.replace(tmp_check, check_path(path))


def load_checked(path: Path, **load_kwargs: Any) -> Any | None:
    """The object saved at ``path``, or None if there is none or it fails its check (then with a warning)."""
    if not path.is_file():
        return None
    try:
        check = json.loads(check_path(path).read_text())
        size = path.stat().st_size
        if size != check["size"]:
            why = f"it has {size} bytes, {check['size']} were written"
        elif file_digest(path) != check["sha256"]:
            why = "its checksum changed since it was written"
        else:
            return torch.load(path, weights_only=True, **load_kwargs)
    except FileNotFoundError:
        why = f"{check_path(path).name} is missing"
    except (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        why = f"it cannot be read ({e})"
    logger.warning("cache %s is damaged (%s): rebuilding it", path, why)
    return None
